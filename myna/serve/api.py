"""OpenAI's HTTP API over the inference engine, and the web chat page, in one FastAPI app.

    GET  /health                 200 when the model is ready, 503 while it loads (no key needed)
    GET  /v1/models              the one model this server holds (also GET /v1/models/{id})
    POST /v1/chat/completions    chat, plain or streamed (SSE: chat.completion.chunk ... data: [DONE])
    POST /v1/completions         raw continuation of a prompt, plain or streamed
    POST /v1/embeddings          mean-pooled final hidden states, L2-normalised (float or base64)
    GET  /                       the web page (myna/serve/web)

Requests, responses and errors follow OpenAI's shapes, so its clients work unchanged. What Myna adds rides in a
top-level `myna` field and x-myna-* headers, which those clients ignore:
- `myna.context`: prompt tokens, oldest turns dropped or the newest message cut to fit the context, and
  max_tokens as granted (clipped to the room the context leaves);
- `myna.moderation`: the operator's policy's report (labels, a refused request, a withheld reply).

The model loads in a background thread once the server is up, so /health and /v1 answer 503 until it is ready.
Every generation goes through one Engine: concurrent requests share its batch. A request beyond max_concurrency
in flight gets 429 at once, before its body is parsed; parsing, tokenizing and moderating run in worker threads,
off the event loop that streams the other replies. A client that disconnects cancels its generation; bodies over
max_body_bytes get 413, bodies slower than body_timeout 408, and a connection that has not sent a request's
headers within header_timeout is closed.

Without an API key the server takes only requests whose Host is a loopback name (or one allowed_hosts names) and
only JSON bodies: a web page the user visits can then neither post to it across sites (a form sends text/plain
at most) nor reach it under its own name by DNS rebinding. With a key, the key is the protection.
"""

import asyncio
import base64
import hmac
import ipaddress
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from myna.infer.engine import Engine, SamplingParams, set_cpu_threads
from myna.infer.engine import Request as EngineRequest
from myna.moderation import Policy, Report, StreamGuard, moderate_exchange
from myna.progress import log
from myna.runs import Loaded, load_model, resolve
from myna.template import check_messages, prompt_budget, render_prompt, turn_stop_ids

WEB_DIR = Path(__file__).with_name("web")
MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_EMBED_INPUTS = 2048  # inputs per embeddings request, as OpenAI allows
MAX_JSON_DEPTH = 32  # lists and objects nested in a body; OpenAI's requests nest a handful deep
TOO_DEEP = f"the body nests lists and objects more than {MAX_JSON_DEPTH} levels deep"

# Fields each endpoint reads. Others that OpenAI defines are accepted only at the value that means "off" (the
# server cannot honour anything else), and an unknown field is refused, as OpenAI refuses it.
SAMPLING_FIELDS = {
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "user",
}
EXTRA_FIELDS = {"top_k", "repetition_penalty"}  # vLLM-style extensions, sent by clients as extra_body
CHAT_FIELDS = SAMPLING_FIELDS | EXTRA_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = SAMPLING_FIELDS | EXTRA_FIELDS | {"prompt", "echo"}
EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}
OFF_VALUES = {
    "n": (1,),
    "best_of": (1,),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "presence_penalty": (0,),  # additive penalties: use repetition_penalty (multiplicative, 1 = off)
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "response_format": ({"type": "text"},),
}
CHAT_OFF = ("n", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "tools")
CHAT_OFF += ("tool_choice", "response_format")
COMPLETION_OFF = ("n", "best_of", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "suffix")


# ---------------------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


class APIError(Exception):
    """Answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}


def _error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    kind = {429: "requests"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------------------------------------------
# Reading requests


async def read_body(request: Request, max_bytes: int, timeout: float, json_only: bool) -> bytes:
    """The raw body. 415 unless it is JSON when json_only; 413 past max_bytes, judged by Content-Length and again
    while reading; 408 when it has not all arrived within timeout seconds."""
    if json_only:
        kind = request.headers.get("content-type", "")
        if kind.partition(";")[0].strip().lower() != "application/json":
            raise APIError(
                415,
                f"Content-Type: expected application/json, got {kind or 'none'!r} (a server without an API key "
                "takes only JSON, which a page on another site cannot send it)",
                code="unsupported_media_type",
            )
    too_large = APIError(
        413, f"request body is larger than this server's limit of {max_bytes} bytes", code="request_too_large"
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise too_large
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:  # chunked uploads carry no Content-Length, and a header can lie
                    raise too_large
                chunks.append(chunk)
    except TimeoutError as e:
        raise APIError(
            408,
            f"the request body did not arrive within this server's limit of {timeout:g} s",
            code="request_timeout",
            headers={"Connection": "close"},
        ) from e
    except ClientDisconnect as e:
        # no one is left to answer; uncaught, a client's hang-up would be logged as the server's error
        raise APIError(499, "the client closed the connection while sending the body") from e
    return b"".join(chunks)


def parse_json(raw: bytes) -> dict:
    """The JSON object in a body. Refused too: nesting past MAX_JSON_DEPTH, which Python's json and every step
    that walks the values would recurse into, and lone surrogates, which cannot be written back as UTF-8."""
    try:
        body = json.loads(raw)
    except RecursionError as e:
        raise _invalid(TOO_DEEP) from e
    except ValueError as e:
        raise _invalid(f"the body is not valid JSON: {e}") from e
    # before the type check: whether json.loads itself ran out of stack on a deep body depends on the thread
    level = [body] if isinstance(body, dict | list) else []
    for _ in range(MAX_JSON_DEPTH):
        level = [
            v for c in level for v in (c.values() if isinstance(c, dict) else c) if isinstance(v, dict | list)
        ]
        if not level:
            break
    else:
        raise _invalid(TOO_DEEP)
    if not isinstance(body, dict):
        raise _invalid(f"the body must be a JSON object, got {type(body).__name__}")
    if b"\\u" in raw:  # only an escape can spell a lone surrogate
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError as e:
            char = f"\\u{ord(e.object[e.start]):04x}"
            raise _invalid(f"the body is not valid JSON: a string holds a lone surrogate ({char})") from e
    return body


def _check_fields(body: dict, known: set[str], off: tuple[str, ...]) -> None:
    for name, value in body.items():
        if name in known or (name in off and value is None):
            continue
        if name in off:
            if value not in OFF_VALUES[name]:
                allowed = " or ".join(json.dumps(v) for v in OFF_VALUES[name])
                raise _invalid(f"{name}: not supported by this server (only {allowed})", name)
            continue
        raise _invalid(f"Unrecognized request argument supplied: {name}", name)


def _number(
    body: dict, name: str, default, lo: float, hi: float, integer: bool = False, open_lo: bool = False
):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        kind = "an integer" if integer else "a number"
        raise _invalid(f"{name}: expected {kind}, got {json.dumps(value)}", name)
    if not (lo < value if open_lo else lo <= value) or value > hi:
        bracket = "(" if open_lo else "["
        raise _invalid(f"{name}: {value} is outside {bracket}{lo}, {hi}]", name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise _invalid(f"{name}: expected true or false, got {json.dumps(value)}", name)
    return value


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or not all(isinstance(s, str) and s for s in stops)
        or len(stops) > MAX_STOP
    ):
        raise _invalid(f"stop: expected a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    return tuple(stops)


def _sampling(body: dict, vocab_size: int) -> SamplingParams:
    """Everything but max_tokens, which depends on the prompt."""
    return SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", 1.0, 0, 1, open_lo=True),
        top_k=_number(body, "top_k", 0, 0, vocab_size, integer=True),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0, 10, open_lo=True),
        seed=_number(body, "seed", None, 0, 2**63 - 1, integer=True),
        stop=_stops(body),
    )


def _stream_flags(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise _invalid("stream_options: only allowed when stream is true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _invalid('stream_options: expected {"include_usage": true|false}', "stream_options")
    return stream, _flag(options, "include_usage")


def _messages(body: dict) -> list[dict]:
    """OpenAI messages as the template takes them: text content parts joined, "developer" read as "system"."""
    messages = body.get("messages")
    if isinstance(messages, list):
        out = []
        for i, m in enumerate(messages):
            if isinstance(m, dict):
                m = dict(m)
                if m.get("role") == "developer":
                    m["role"] = "system"
                if isinstance(m.get("content"), list):
                    m["content"] = _text_parts(m["content"], f"messages[{i}].content")
            out.append(m)
        messages = out
    try:
        return check_messages(messages)
    except ValueError as e:
        raise _invalid(str(e), "messages") from e


def _text_parts(parts: list, where: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise _invalid(f"{where}[{j}]: only text parts are supported, got {kind!r}", "messages")
        texts.append(part["text"])
    return "".join(texts)


def _token_list(value, vocab_size: int, where: str) -> list[int]:
    if not value or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in value
    ):
        raise _invalid(
            f"{where}: expected a non-empty list of token ids in [0, {vocab_size})", where.split("[")[0]
        )
    return list(value)


# ---------------------------------------------------------------------------------------------------------------
# The server's state: the model (once loaded), the concurrency slots, counters for /health


class Job:
    """One request holding one concurrency slot until close() (which is safe to call twice), and the generation
    it submits, if any.

    close() cancels that generation unless it was seen to its end: a client that went away, a stream that broke,
    a server shutting down all free the batch slot instead of decoding for no one."""

    def __init__(self, server: "Server"):
        self.server = server
        self.request: EngineRequest | None = None
        self.finished = False
        self.closed = False

    def submit(self, ids: list[int], params: SamplingParams) -> EngineRequest:
        try:
            self.request = self.server.engine.submit(ids, params)
        except ValueError as e:
            raise _invalid(str(e), code="context_length_exceeded") from e
        return self.request

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.request is not None and not self.finished:
            self.request.cancel()
            self.server.cancelled += 1
        self.server.active -= 1


class Server:
    def __init__(
        self,
        ckpt: str | Path,
        *,
        api_key: str | None,
        max_concurrency: int,
        policy: Policy,
        device: str,
        max_batch: int,
        on_load: Callable[[Loaded], None] | None,
    ):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.run_dir, self.checkpoint = resolve(ckpt)  # a bad path fails now, not in the loading thread
        self.model_id = self.run_dir.name
        self.aliases = {self.model_id, self.checkpoint.name, f"{self.model_id}/{self.checkpoint.name}"}
        self.created = int(self.checkpoint.stat().st_mtime)
        self.api_key, self.max_concurrency, self.policy = api_key, max_concurrency, policy
        self.device, self.max_batch, self.on_load = device, max_batch, on_load
        self.status, self.error = "loading", ""
        self.engine: Engine | None = None
        self.loaded: Loaded | None = None
        # counters, touched only on the event loop
        self.active = 0  # requests holding a slot
        self.cancelled = 0  # generations cancelled before their end (client gone, stream broken)
        self.served = 0  # requests answered in full

    def load(self) -> None:
        """Runs in a background thread: load the checkpoint, start the engine, then flip to ready."""
        try:
            loaded = load_model(self.checkpoint, self.device)
            if self.on_load is not None:
                self.on_load(loaded)
            self.engine = Engine(loaded.model, loaded.tokenizer, max_batch=self.max_batch).start()
            self.loaded = loaded
            self.status = "ready"
            log(
                f"serve: {self.model_id} ready ({self.checkpoint.name}, {loaded.model.num_params() / 1e6:.1f}M params)"
            )
        except Exception as e:  # reported by /health and every /v1 call, instead of dying in a thread
            # by its type alone: /health needs no key, and the message can hold the server's paths
            self.error = f"{type(e).__name__} (the server's log has the details)"
            self.status = "error"
            log(f"[red]serve: loading {self.checkpoint} failed: {type(e).__name__}: {e}")

    @property
    def max_len(self) -> int:
        return self.engine.max_len

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _invalid("model: required (see GET /v1/models)", "model")
        if model not in self.aliases:
            raise APIError(
                404,
                f"The model `{model}` does not exist; this server holds `{self.model_id}`",
                code="model_not_found",
                param="model",
            )

    def job(self) -> Job:
        """A concurrency slot for one request, or 429 when all are taken."""
        if self.active >= self.max_concurrency:
            raise APIError(
                429,
                f"{self.active} requests in flight, this server's limit (max concurrency {self.max_concurrency}); "
                "retry shortly",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self.active += 1
        return Job(self)

    def health(self) -> dict:
        return {
            "status": self.status,
            "error": self.error or None,
            "model": self.model_id,
            "checkpoint": self.checkpoint.name,
            "context_length": self.max_len if self.engine else None,
            "auth": self.api_key is not None,
            "active_requests": self.active,
            "max_concurrency": self.max_concurrency,
            "cancelled_requests": self.cancelled,
            "served_requests": self.served,
        }


# ---------------------------------------------------------------------------------------------------------------
# Response pieces


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _context_headers(context: dict) -> dict[str, str]:
    return {
        "x-myna-prompt-tokens": str(context["prompt_tokens"]),
        "x-myna-dropped-turns": str(context["dropped_turns"]),
        "x-myna-truncated": str(context["truncated"]).lower(),
        "x-myna-max-tokens": str(context["max_tokens"]),
    }


def _sse(data: dict | str) -> bytes:
    return format_sse_event(data_str=data if isinstance(data, str) else json.dumps(data, ensure_ascii=False))


def _choice(chat: bool, text: str, finish: str) -> dict:
    """The one choice of a whole (not streamed) response."""
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    message = {"role": "assistant", "content": text, "refusal": None}
    return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}


def _chunk_choice(chat: bool, text: str | None, finish: str | None, first: bool) -> dict:
    """The one choice of a streamed chunk: the first opens the assistant turn, text None carries finish_reason."""
    if not chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    delta = (
        {"role": "assistant", "content": text or ""} if first else {} if text is None else {"content": text}
    )
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


class _Stream(EventSourceResponse):
    """An SSE response that closes its Job however it ends: finished, client gone, error, shutdown."""

    def __init__(self, events: AsyncIterator[bytes], job: Job, headers: dict[str, str]):
        # no caching, and no buffering by a proxy in front (nginx honours X-Accel-Buffering)
        super().__init__(events, headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _wait(request: Request, job: Job):
    """The finished Completion, or None when the client disconnected first (Job.close then cancels it)."""
    result = asyncio.ensure_future(job.request.aresult())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not result.done():
        result.cancel()
        return None
    job.finished = True
    return result.result()


# ---------------------------------------------------------------------------------------------------------------
# Work on a request's body, done in a worker thread: a long prompt takes a while to parse, tokenize and moderate,
# and the event loop streams every other reply meanwhile


@dataclass
class Generation:
    """A completion request parsed, checked, tokenized and moderated: all that respond() needs."""

    chat: bool
    ids: list[int]
    params: SamplingParams
    prompt_text: str  # what moderation checks: the prompt, or a chat's newest user turn
    report: Report  # moderation of prompt_text
    context: dict  # `myna.context` of the response
    stream: bool
    include_usage: bool
    echo: str = ""


def prepare_chat(server: Server, raw: bytes) -> Generation:
    body = parse_json(raw)
    _check_fields(body, CHAT_FIELDS, CHAT_OFF)
    server.check_model(body)
    messages = _messages(body)
    tok, max_len = server.loaded.tokenizer, server.max_len
    params = replace(_sampling(body, tok.vocab_size), stop_token_ids=turn_stop_ids(tok))
    requested = _number(body, "max_completion_tokens", None, 1, 2**31, integer=True)
    requested = requested or _number(body, "max_tokens", None, 1, 2**31, integer=True)
    stream, include_usage = _stream_flags(body)
    # the new user turn is what moderation checks: earlier turns were checked when they were sent
    user_text = next((m["content"] or "" for m in reversed(messages) if m["role"] == "user"), "")
    try:
        prompt = render_prompt(messages, tok, budget=prompt_budget(max_len, requested))
    except ValueError as e:
        raise _invalid(str(e), "messages", "context_length_exceeded") from e
    room = max_len - len(prompt.ids)
    context = {
        "prompt_tokens": len(prompt.ids),
        "dropped_turns": prompt.dropped_turns,
        "truncated": prompt.truncated,
        "max_tokens": min(requested or room, room),
        "max_tokens_requested": requested,
    }
    params = replace(params, max_tokens=context["max_tokens"])
    report = moderate_exchange(server.policy, user_text)
    return Generation(True, prompt.ids, params, user_text, report, context, stream, include_usage)


def prepare_completion(server: Server, raw: bytes) -> Generation:
    body = parse_json(raw)
    _check_fields(body, COMPLETION_FIELDS, COMPLETION_OFF)
    server.check_model(body)
    tok, max_len = server.loaded.tokenizer, server.max_len
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        # a raw continuation starts a document, as the pre-training shards do
        ids, text = [tok.bos_id, *tok.encode(prompt)], prompt
    elif isinstance(prompt, list):
        ids = _token_list(prompt, tok.vocab_size, "prompt")
        text = tok.decode(ids)
    else:
        raise _invalid("prompt: expected a string or a list of token ids (one prompt per request)", "prompt")
    if len(ids) > max_len - 1:
        raise _invalid(
            f"This model's maximum context length is {max_len} tokens; the prompt has {len(ids)}",
            "prompt",
            "context_length_exceeded",
        )
    params = _sampling(body, tok.vocab_size)
    # documents in the shards end where the next <|bos|> starts
    params = replace(params, stop_token_ids=(tok.bos_id,))
    requested = _number(body, "max_tokens", 16, 1, 2**31, integer=True)  # OpenAI's default is 16
    stream, include_usage = _stream_flags(body)
    room = max_len - len(ids)
    context = {
        "prompt_tokens": len(ids),
        "dropped_turns": 0,
        "truncated": False,
        "max_tokens": min(requested, room),
        "max_tokens_requested": requested,
    }
    params = replace(params, max_tokens=context["max_tokens"])
    echo = text if _flag(body, "echo") else ""
    report = moderate_exchange(server.policy, text)
    return Generation(False, ids, params, text, report, context, stream, include_usage, echo)


def embed(server: Server, raw: bytes) -> dict:
    """The embeddings response for a request's body."""
    body = parse_json(raw)
    _check_fields(body, EMBEDDING_FIELDS, ())
    server.check_model(body)
    tok, max_len = server.loaded.tokenizer, server.max_len
    batch = _embedding_inputs(body.get("input"), tok, max_len)
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise _invalid(
            f"encoding_format: expected 'float' or 'base64', got {json.dumps(fmt)}", "encoding_format"
        )
    width = server.loaded.config.n_embd
    if body.get("dimensions") not in (None, width):
        raise _invalid(f"dimensions: this model's embeddings have {width} dimensions", "dimensions")
    vectors = server.engine.embed(batch).float().cpu().numpy()
    data = []
    for i, v in enumerate(vectors):
        value = base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    n = sum(len(ids) for ids in batch)
    return {
        "object": "list",
        "data": data,
        "model": server.model_id,
        "usage": {"prompt_tokens": n, "total_tokens": n},
    }


def _embedding_inputs(value, tok, max_len: int) -> list[list[int]]:
    """input: a string, a list of strings, a list of token ids, or a list of such lists -> token id lists."""
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _invalid("input: expected a string, a list of strings, or token ids", "input")
    if len(value) > MAX_EMBED_INPUTS:
        raise _invalid(f"input: at most {MAX_EMBED_INPUTS} inputs per request, got {len(value)}", "input")
    batch = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item:
                raise _invalid(f"input[{i}]: empty string", "input")
            ids = [tok.bos_id, *tok.encode(item)]  # a document starts with <|bos|>, as in training
        else:
            ids = _token_list(item, tok.vocab_size, f"input[{i}]")
        if len(ids) > max_len:
            raise _invalid(
                f"input[{i}]: {len(ids)} tokens; this model's maximum context length is {max_len}",
                "input",
                "context_length_exceeded",
            )
        batch.append(ids)
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Who may call a server that has no API key


# a Host header: a name or an IPv4 address, or an IPv6 address in brackets, then an optional port
HOST_HEADER = re.compile(r"(?:\[(?P<ip6>[0-9a-f:.]+)\]|(?P<name>[^\[\]:@/\s]+))(?::\d{1,5})?", re.IGNORECASE)


def host_allowed(host: str, allowed: frozenset[str]) -> bool:
    """Whether a Host header names a loopback address, localhost, or one of the allowed names ("*": any)."""
    if "*" in allowed:
        return True
    m = HOST_HEADER.fullmatch(host)
    if m is None:
        return False
    name = (m["ip6"] or m["name"]).lower()
    if name == "localhost" or name in allowed:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass
class HostCheck:
    """ASGI middleware that answers 403 to a request whose Host is not allowed. A web page that reaches this
    server by DNS rebinding (its own name pointed at 127.0.0.1) sends its own name: without a key, nothing else
    would tell its requests from the user's."""

    app: ASGIApp
    allowed: frozenset[str]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host", "")
            if not host_allowed(host, self.allowed):
                message = (
                    f"Host: {host!r} is not a name this server answers to; without an API key it takes "
                    "loopback names (localhost, 127.0.0.1, [::1]) and those named with --allow-host"
                )
                await JSONResponse(_error_body(403, message, "host_not_allowed"), 403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------------------------
# The app


def create_app(
    ckpt: str | Path,
    *,
    api_key: str | None = None,
    max_concurrency: int = 32,
    policy: Policy | None = None,
    device: str = "cpu",
    max_batch: int | None = None,
    max_body_bytes: int = 1 << 20,
    body_timeout: float = 30.0,
    allowed_hosts: tuple[str, ...] = (),
    on_load: Callable[[Loaded], None] | None = None,
) -> FastAPI:
    """The server for one run (or checkpoint). policy None = Policy.default() (labels only); max_batch None =
    max_concurrency, so every admitted request decodes in the same batch. body_timeout: seconds for a request's
    body to arrive. Without an api_key, requests must name a loopback Host or one of allowed_hosts ("*": any),
    and POST only JSON. on_load(loaded) runs in the loading thread before the engine starts (tests hold it to see
    the 503s, or slow the model down)."""
    if body_timeout <= 0:
        raise ValueError(f"body_timeout must be > 0 seconds, got {body_timeout}")
    server = Server(
        ckpt,
        api_key=api_key,
        max_concurrency=max_concurrency,
        policy=policy if policy is not None else Policy.default(),
        device=device,
        max_batch=max_batch or max_concurrency,
        on_load=on_load,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # a daemon thread: uvicorn accepts connections (and answers 503) while the weights load
        threading.Thread(target=server.load, name="myna-serve-load", daemon=True).start()
        yield
        if server.engine is not None:
            server.engine.close()

    app = FastAPI(title="Myna", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    if api_key is None:
        # with a key, the key is the protection: a page on another site cannot send it
        app.add_middleware(HostCheck, allowed=frozenset(h.lower() for h in allowed_hosts))

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(_error_body(e.status, e.message, e.code, e.param), e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        # unknown paths and wrong methods, in the same shape as everything else
        return JSONResponse(_error_body(e.status_code, str(e.detail)), e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        # a bug: the client gets OpenAI's shape, the log the traceback (Starlette raises it on to uvicorn)
        return JSONResponse(_error_body(500, "internal server error; the server's log has the details"), 500)

    def authorized(request: Request) -> None:
        if server.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(
                401,
                "You didn't provide an API key: send it as 'Authorization: Bearer KEY'",
                code="missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(key.strip().encode(), server.api_key.encode()):
            raise APIError(
                401,
                "Incorrect API key provided",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def ready() -> None:
        if server.status == "loading":
            raise APIError(
                503,
                "the model is still loading; retry shortly",
                code="model_loading",
                headers={"Retry-After": "1"},
            )
        if server.status == "error":
            raise APIError(503, f"the model failed to load: {server.error}", code="model_load_failed")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized), Depends(ready)])

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse(server.health(), 200 if server.status == "ready" else 503)

    def model_card() -> dict:
        return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "myna"}

    @v1.get("/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model:path}")
    async def get_model(model: str) -> dict:
        server.check_model({"model": model})
        return model_card()

    async def admit(request: Request) -> tuple[bytes, Job]:
        """The body, and a concurrency slot for the work on it: a request over the limit gets 429 before that work."""
        raw = await read_body(request, max_body_bytes, body_timeout, json_only=server.api_key is None)
        return raw, server.job()

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, prepare_chat)

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, prepare_completion)

    async def generate(request: Request, prepare: Callable[[Server, bytes], Generation]) -> Response:
        raw, job = await admit(request)
        try:
            return await respond(request, await asyncio.to_thread(prepare, server, raw), job)
        except BaseException:
            job.close()
            raise

    async def respond(request: Request, gen: Generation, job: Job) -> Response:
        """Generate, moderate the reply; answer as one JSON object or as an SSE stream. Closes the job."""
        chat, context = gen.chat, gen.context
        kind = "chat.completion" if chat else "text_completion"
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": kind + (".chunk" if chat and gen.stream else ""),
            "created": int(time.time()),
            "model": server.model_id,
            "system_fingerprint": f"myna-{server.checkpoint.name}",
        }
        headers = _context_headers(context)

        def chunk(text: str | None, finish: str | None = None, first: bool = False, **extra) -> bytes:
            usage = (
                {"usage": None} if gen.include_usage else {}
            )  # OpenAI's chunks say null until the last one
            return _sse({**head, "choices": [_chunk_choice(chat, text, finish, first)], **usage, **extra})

        def usage_chunk(completion_tokens: int) -> bytes:
            return _sse({**head, "choices": [], "usage": _usage(len(gen.ids), completion_tokens)})

        async def moderate(reply: str):
            # the prompt is checked again with the reply, and it may be long
            return await asyncio.to_thread(moderate_exchange, server.policy, gen.prompt_text, reply)

        if gen.report.blocked:  # refused before generation: the policy's notice stands in for the reply
            job.close()
            myna = {"context": context, "moderation": gen.report.to_dict()}
            if not gen.stream:
                choice = _choice(chat, gen.report.message, "content_filter")
                return JSONResponse(
                    {**head, "choices": [choice], "usage": _usage(len(gen.ids), 0), "myna": myna},
                    headers=headers,
                )

            async def refusal() -> AsyncIterator[bytes]:
                yield chunk(gen.report.message, first=True, myna={"context": context})
                yield chunk(None, "content_filter", myna=myna)
                if gen.include_usage:
                    yield usage_chunk(0)
                yield _sse("[DONE]")

            return _Stream(refusal(), job, headers)

        generation = job.submit(gen.ids, gen.params)
        if not gen.stream:
            try:
                completion = await _wait(request, job)
            finally:
                job.close()
            if completion is None:  # nobody is listening; the status only shows in the access log
                return Response(status_code=499)
            report = await moderate(completion.text)
            text, finish = gen.echo + completion.text, completion.finish_reason
            if report.blocked:
                text, finish = report.message, "content_filter"
            server.served += 1
            body = {
                **head,
                "choices": [_choice(chat, text, finish)],
                "usage": _usage(completion.prompt_tokens, completion.completion_tokens),
                "myna": {"context": context, "moderation": report.to_dict()},
            }
            return JSONResponse(body, headers=headers)

        async def events() -> AsyncIterator[bytes]:
            yield chunk(gen.echo, first=True, myna={"context": context})
            guard = StreamGuard(server.policy)  # holds back the words a block term could still complete
            try:
                async for delta in generation.astream():
                    if shown := guard.feed(delta):
                        yield chunk(shown)
                    if guard.blocked:
                        generation.cancel()
                        break
                else:
                    if rest := guard.finish():
                        yield chunk(rest)
                completion = await generation.aresult()
            except Exception as e:  # the engine failed mid-stream: say so in OpenAI's streamed-error shape
                yield _sse(_error_body(500, f"generation failed: {type(e).__name__}: {e}"))
                yield _sse("[DONE]")
                return
            job.finished = True
            report = await moderate(guard.text)
            finish = completion.finish_reason
            if report.blocked:  # the held-back words completed a block term: they and the rest are withheld
                finish = "content_filter"
                yield chunk(("\n\n" if guard.sent else "") + report.message)
            yield chunk(None, finish, myna={"moderation": report.to_dict()})
            if gen.include_usage:
                yield usage_chunk(completion.completion_tokens)
            yield _sse("[DONE]")
            server.served += 1

        return _Stream(events(), job, headers)

    @v1.post("/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        raw, job = await admit(request)
        try:
            response = await asyncio.to_thread(embed, server, raw)
        finally:
            job.close()
        server.served += 1
        return JSONResponse(response)

    app.include_router(v1)
    app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")
    return app


class HeaderDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection that has not sent a request's headers within
    header_timeout of opening or of its last response. uvicorn alone times out only a keep-alive connection that
    sends nothing: one that never sends, or stops half-way through its headers, stays open for ever."""

    def __init__(self, *args, header_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.start_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
        super().connection_lost(exc)

    def start_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
        self.header_timer = self.loop.call_later(self.header_timeout, self.headers_late)

    def headers_late(self) -> None:
        # a request whose headers came is being answered, and its body has body_timeout
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()


def header_deadline(header_timeout: float) -> Callable[..., HeaderDeadline]:
    """uvicorn's `http` setting for HeaderDeadline's protocol."""
    if header_timeout <= 0:
        raise ValueError(f"header_timeout must be > 0 seconds, got {header_timeout}")
    return partial(HeaderDeadline, header_timeout=header_timeout)


def serve(
    ckpt: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_concurrency: int = 32,
    policy: Policy | None = None,
    device: str = "cpu",
    max_batch: int | None = None,
    max_body_bytes: int = 1 << 20,
    allowed_hosts: tuple[str, ...] = (),
    header_timeout: float = 10.0,
    body_timeout: float = 30.0,
    log_level: str = "info",
) -> None:
    """Serve a run until interrupted: the OpenAI API under /v1 and the web chat at /."""
    set_cpu_threads(device)
    app = create_app(
        ckpt,
        api_key=api_key,
        max_concurrency=max_concurrency,
        policy=policy,
        device=device,
        max_batch=max_batch,
        max_body_bytes=max_body_bytes,
        body_timeout=body_timeout,
        allowed_hosts=allowed_hosts,
    )
    server: Server = app.state.server
    shown = f"[{host}]" if ":" in host else host
    log(
        f"[bold]myna serve[/bold]: {server.model_id} at http://{shown}:{port}/ (web chat), API base http://{shown}:{port}/v1"
    )
    if api_key is None and not host_allowed(shown, frozenset()):
        log(
            f"[yellow]serve: listening on {host} without --api-key: anyone who reaches it can use the model "
            "(under a loopback name or one given with --allow-host); see the README's security section"
        )
    uvicorn.run(
        app,
        http=header_deadline(header_timeout),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=5,
    )
