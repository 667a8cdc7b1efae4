"""OpenAI's HTTP API over the inference engine, and the web chat page, in one FastAPI app.

    GET  /health                 200 when the model is ready, 503 while it loads (no key needed)
    GET  /v1/models              the one model this server holds (also GET /v1/models/{id})
    POST /v1/chat/completions    chat, plain or streamed (SSE: chat.completion.chunk ... data: [DONE]), with tools
    POST /v1/completions         raw continuation of a prompt, plain or streamed
    POST /v1/embeddings          mean-pooled final hidden states, L2-normalised (float or base64)
    POST /v1/search              posts from the search index (myna serve --index), Top or Latest
    POST /v1/ask                 an answer from the posts a search finds, citing them as [1], [2]
    POST /v1/ads/match           the ad for a context (myna serve --ads): winner, price, every candidate's fate
    POST /v1/ads/click           a click on a recorded impression
    GET  /                       the web page (myna/serve/web)

Requests, responses and errors follow OpenAI's shapes (myna/serve/protocol.py), so its clients work unchanged.
What Myna adds rides in a top-level `myna` field and x-myna-* headers, which those clients ignore:
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
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Annotated

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from myna.infer.chat import CallPrompt, call_prompt, read_call
from myna.infer.engine import Completion, Engine, SamplingParams, set_cpu_threads
from myna.infer.engine import Request as EngineRequest
from myna.moderation import Policy, Report, StreamGuard, moderate_exchange
from myna.progress import log
from myna.runs import Loaded, load_model, resolve
from myna.search.ask import Answer, AskPrompt
from myna.search.index import Embedder
from myna.serve.ads import AdDesk
from myna.serve.config import ServeConfig
from myna.serve.protocol import (
    CHAT_FIELDS,
    CHAT_OFF,
    COMPLETION_FIELDS,
    COMPLETION_OFF,
    EMBEDDING_FIELDS,
    MAX_EMBED_INPUTS,
    APIError,
    Context,
    ReplyForm,
    ToolUse,
    chat_messages,
    chat_tools,
    check_fields,
    choice,
    chunk_choice,
    error_body,
    invalid,
    number_field,
    parse_json,
    read_body,
    reply_form,
    sampling_params,
    sse,
    token_ids,
    tool_call_body,
    usage,
)
from myna.serve.search import Question, Searcher, answer_body, question_of
from myna.template import prompt_budget, render_prompt, turn_stop_ids

WEB_DIR = Path(__file__).with_name("web")


# ---------------------------------------------------------------------------------------------------------------
# The server's state: the model (once loaded), the concurrency slots, counters for /health


@dataclass
class Job:
    """One admitted request: its body, and the generation it submits, if any."""

    body: bytes
    engine: Engine
    generation: EngineRequest | None = None
    finished: bool = False  # the generation was seen to its end: nothing is left to cancel

    def submit(self, ids: list[int], params: SamplingParams) -> EngineRequest:
        try:
            self.generation = self.engine.submit(ids, params)
        except ValueError as e:
            raise invalid(str(e), code="context_length_exceeded") from e
        return self.generation


class Server:
    """The run being served: its model once loaded, the concurrency slots, and the counters /health shows."""

    def __init__(self, ckpt: str | Path, config: ServeConfig, on_load: Callable[[Loaded], None] | None):
        self.config, self.on_load = config, on_load
        self.policy = config.policy if config.policy is not None else Policy.default()
        self.run_dir, self.checkpoint = resolve(ckpt)  # a bad path fails now, not in the loading thread
        self.model_id = self.run_dir.name
        self.aliases = {self.model_id, self.checkpoint.name, f"{self.model_id}/{self.checkpoint.name}"}
        self.created = int(self.checkpoint.stat().st_mtime)
        self.searcher = Searcher(config.index, self.checkpoint) if config.index is not None else None
        self.ads = AdDesk(config.ads, config.ads_log, config.ads_policy) if config.ads is not None else None
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
            loaded = load_model(self.checkpoint, self.config.device)
            if self.on_load is not None:
                self.on_load(loaded)
            if self.policy.model_categories:
                # moderation's example and classifier rules run on the served model (no state between calls)
                self.policy.bind(Embedder.of(loaded))
            if self.searcher is not None:
                self.searcher.attach(loaded)
            if self.ads is not None:
                self.ads.attach(loaded)
            # by default every admitted request decodes in the same batch
            max_batch = self.config.max_batch or self.config.max_concurrency
            self.engine = Engine(
                loaded.model, loaded.tokenizer, max_batch=max_batch, compile=self.config.compile
            ).start()
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
            raise invalid("model: required (see GET /v1/models)", "model")
        if model not in self.aliases:
            raise APIError(
                404,
                f"The model `{model}` does not exist; this server holds `{self.model_id}`",
                code="model_not_found",
                param="model",
            )

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "myna"}

    @contextmanager
    def slot(self, body: bytes) -> Iterator[Job]:
        """A concurrency slot for one request, or 429 when all are taken. However the request ends (answered,
        client gone, stream broken, server shutting down), leaving frees the slot and cancels the job's
        generation unless it was seen to its end: the batch does not decode for no one."""
        limit = self.config.max_concurrency
        if self.active >= limit:
            raise APIError(
                429,
                f"{self.active} requests in flight, this server's limit (max concurrency {limit}); retry shortly",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self.active += 1
        job = Job(body, self.engine)
        try:
            yield job
        finally:
            if job.generation is not None and not job.finished:
                job.generation.cancel()
                self.cancelled += 1
            self.active -= 1

    def health(self) -> dict:
        return {
            "status": self.status,
            "error": self.error or None,
            "model": self.model_id,
            "checkpoint": self.checkpoint.name,
            "context_length": self.max_len if self.engine else None,
            "auth": self.config.api_key is not None,
            "active_requests": self.active,
            "max_concurrency": self.config.max_concurrency,
            "cancelled_requests": self.cancelled,
            "served_requests": self.served,
            "search": self.searcher.describe() if self.searcher else None,
            "ads": self.ads.describe() if self.ads else None,
        }


# ---------------------------------------------------------------------------------------------------------------
# Work on a request's body, done in a worker thread: a long prompt takes a while to parse, tokenize and moderate,
# and the event loop streams every other reply meanwhile


@dataclass
class Generation:
    """A completion request parsed, checked, tokenized and moderated: all that answering it needs."""

    form: ReplyForm
    ids: list[int]
    params: SamplingParams
    prompt_text: str  # what moderation checks: the prompt, or a chat's newest user turn
    report: Report  # moderation of prompt_text
    context: Context
    tools: ToolUse | None = None  # the tools the reply may call
    call: CallPrompt | None = (
        None  # the call the reply must be (tool_choice "required" or named), set to write
    )

    @property
    def echo(self) -> str:
        """The text that opens the reply."""
        return self.prompt_text if self.form.echo else ""


def prepare_chat(server: Server, raw: bytes) -> Generation:
    body = parse_json(raw)
    check_fields(body, CHAT_FIELDS, CHAT_OFF)
    server.check_model(body)
    messages = chat_messages(body)
    tok, max_len = server.loaded.tokenizer, server.max_len
    params = sampling_params(body, tok.vocab_size)
    requested = number_field(body, "max_completion_tokens", None, 1, 2**31, integer=True)
    requested = requested or number_field(body, "max_tokens", None, 1, 2**31, integer=True)
    form = reply_form(body, chat=True)
    # the new user turn is what moderation checks: earlier turns were checked when they were sent
    user_text = next((m["content"] or "" for m in reversed(messages) if m["role"] == "user"), "")
    try:
        prompt = render_prompt(messages, tok, budget=prompt_budget(max_len, requested))
    except ValueError as e:
        raise invalid(str(e), "messages", "context_length_exceeded") from e
    context = Context.fit(
        len(prompt.ids), requested, max_len, dropped_turns=prompt.dropped_turns, truncated=prompt.truncated
    )
    stops, call = turn_stop_ids(tok), None
    if (tools := chat_tools(body)) is not None:
        if (call_id := _call_id(tok)) is None:
            raise invalid("tools: this model's chat format has no tool-call token to call them with", "tools")
        if tools.forced:
            call = call_prompt(tok, [*prompt.ids, call_id], tools.tools)
        # the reply may call a tool: generation stops at the call token, then the call is written
        stops += (call_id,)
    params = replace(params, stop_token_ids=stops, max_tokens=context.max_tokens)
    report = moderate_exchange(server.policy, user_text)
    return Generation(
        form=form,
        ids=prompt.ids,
        params=params,
        prompt_text=user_text,
        report=report,
        context=context,
        tools=tools,
        call=call,
    )


def prepare_completion(server: Server, raw: bytes) -> Generation:
    body = parse_json(raw)
    check_fields(body, COMPLETION_FIELDS, COMPLETION_OFF)
    server.check_model(body)
    tok, max_len = server.loaded.tokenizer, server.max_len
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        # a raw continuation starts a document, as the pre-training shards do
        ids, text = tok.document(prompt), prompt
    elif isinstance(prompt, list):
        ids = token_ids(prompt, tok.vocab_size, "prompt")
        text = tok.decode(ids)
    else:
        raise invalid("prompt: expected a string or a list of token ids (one prompt per request)", "prompt")
    if len(ids) > max_len - 1:
        raise invalid(
            f"This model's maximum context length is {max_len} tokens; the prompt has {len(ids)}",
            "prompt",
            "context_length_exceeded",
        )
    params = sampling_params(body, tok.vocab_size)
    requested = number_field(body, "max_tokens", 16, 1, 2**31, integer=True)  # OpenAI's default is 16
    form = reply_form(body, chat=False)
    context = Context.fit(len(ids), requested, max_len)
    # documents in the shards end where the next <|bos|> starts
    params = replace(params, stop_token_ids=(tok.bos_id,), max_tokens=context.max_tokens)
    report = moderate_exchange(server.policy, text)
    return Generation(form=form, ids=ids, params=params, prompt_text=text, report=report, context=context)


def embed(server: Server, raw: bytes) -> dict:
    """The embeddings response for a request's body."""
    body = parse_json(raw)
    check_fields(body, EMBEDDING_FIELDS, ())
    server.check_model(body)
    tok, max_len = server.loaded.tokenizer, server.max_len
    batch = _embedding_inputs(body.get("input"), tok, max_len)
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise invalid(
            f"encoding_format: expected 'float' or 'base64', got {json.dumps(fmt)}", "encoding_format"
        )
    width = server.loaded.config.n_embd
    if body.get("dimensions") not in (None, width):
        raise invalid(f"dimensions: this model's embeddings have {width} dimensions", "dimensions")
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
        raise invalid("input: expected a string, a list of strings, or token ids", "input")
    if len(value) > MAX_EMBED_INPUTS:
        raise invalid(f"input: at most {MAX_EMBED_INPUTS} inputs per request, got {len(value)}", "input")
    batch = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            if not item:
                raise invalid(f"input[{i}]: empty string", "input")
            ids = tok.document(item)  # a document starts with <|bos|>, as in training
        else:
            ids = token_ids(item, tok.vocab_size, f"input[{i}]")
        if len(ids) > max_len:
            raise invalid(
                f"input[{i}]: {len(ids)} tokens; this model's maximum context length is {max_len}",
                "input",
                "context_length_exceeded",
            )
        batch.append(ids)
    return batch


async def moderate(server: Server, prompt_text: str, reply: str) -> Report:
    # the prompt is checked again with the reply, and it may be long
    return await asyncio.to_thread(moderate_exchange, server.policy, prompt_text, reply)


@dataclass
class Asking:
    """A /v1/ask request checked, its question moderated, and (unless the policy refused it) its prompt written."""

    question: Question
    report: Report  # moderation of the question
    prompt: AskPrompt | None  # None when the policy refused the question: nothing is searched or generated


def prepare_ask(server: Server, raw: bytes) -> Asking:
    question = question_of(parse_json(raw))
    report = moderate_exchange(server.policy, question.text)
    if report.blocked:
        return Asking(question, report, None)
    prompt = server.searcher.prompt(question, server.loaded.tokenizer, server.max_len)
    return Asking(question, report, prompt)


# ---------------------------------------------------------------------------------------------------------------
# Answering a completion: the policy's refusal, one JSON object, or an SSE stream


@dataclass
class Reply:
    """The response to one Generation, whole or in chunks."""

    gen: Generation
    head: dict  # what every part of it repeats: OpenAI's id, object, created, model and system_fingerprint

    def whole(
        self, text: str, finish: str, counts: dict, moderation: Report, call: dict | None = None
    ) -> JSONResponse:
        ok = call is not None and "error" not in call
        choices = [
            choice(
                self.gen.form.chat, text, "tool_calls" if ok else finish, tool_call_body(call) if ok else None
            )
        ]
        myna = {"context": asdict(self.gen.context), "moderation": moderation.to_dict()}
        if call is not None and not ok:
            myna["tool_call_error"] = call["error"]
        body = {**self.head, "choices": choices, "usage": counts, "myna": myna}
        return JSONResponse(body, headers=self.gen.context.headers())

    def stream(self, events: AsyncIterator[bytes]) -> EventSourceResponse:
        # no caching, and no buffering by a proxy in front (nginx honours X-Accel-Buffering)
        headers = {**self.gen.context.headers(), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return EventSourceResponse(events, headers=headers)

    def chunk(
        self,
        text: str | None,
        finish: str | None = None,
        first: bool = False,
        tool_calls: list[dict] | None = None,
        **extra,
    ) -> bytes:
        choices = [chunk_choice(self.gen.form.chat, text, finish, first, tool_calls)]
        counts = (
            {"usage": None} if self.gen.form.include_usage else {}
        )  # null until the last chunk, as OpenAI's
        return sse({**self.head, "choices": choices, **counts, **extra})

    def usage_chunk(self, completion_tokens: int) -> bytes:
        return sse({**self.head, "choices": [], "usage": usage(len(self.gen.ids), completion_tokens)})


def head_of(server: Server, gen: Generation) -> dict:
    chat = gen.form.chat
    kind = "chat.completion" if chat else "text_completion"
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": kind + (".chunk" if chat and gen.form.stream else ""),
        "created": int(time.time()),
        "model": server.model_id,
        "system_fingerprint": f"myna-{server.checkpoint.name}",
    }


async def complete(request: Request, job: Job, prepare: Callable[[Server, bytes], Generation]) -> Response:
    """A chat or text completion: the body prepared off the event loop, then answered."""
    server = server_of(request)
    gen = await asyncio.to_thread(prepare, server, job.body)
    reply = Reply(gen, head_of(server, gen))
    if gen.report.blocked:
        return refusal(reply)
    job.submit(*((gen.call.ids, gen.call.params) if gen.call else (gen.ids, gen.params)))
    if gen.form.stream:
        return reply.stream(stream_events(server, reply, job))
    return await whole_reply(request, server, reply, job)


def refusal(reply: Reply) -> Response:
    """The policy refused the prompt before generation: its notice stands in for the reply."""
    gen = reply.gen
    if not gen.form.stream:
        return reply.whole(gen.report.message, "content_filter", usage(len(gen.ids), 0), gen.report)

    async def events() -> AsyncIterator[bytes]:
        myna = {"context": asdict(gen.context), "moderation": gen.report.to_dict()}
        yield reply.chunk(gen.report.message, first=True, myna={"context": myna["context"]})
        yield reply.chunk(None, "content_filter", myna=myna)
        if gen.form.include_usage:
            yield reply.usage_chunk(0)
        yield sse("[DONE]")

    return reply.stream(events())


async def whole_reply(request: Request, server: Server, reply: Reply, job: Job) -> Response:
    """The completion once it is done, moderated, in one JSON object."""
    gen = reply.gen
    completion = await _finished(request, job)
    written = await _write_call(server, gen, job, completion, partial(_finished, request, job))
    if completion is None or written is None:  # nobody is listening; the status only shows in the access log
        return Response(status_code=499)
    call, call_tokens = written
    text = "" if gen.call else completion.text
    report = await moderate(server, gen.prompt_text, text)
    text, finish = gen.echo + text, completion.finish_reason
    if report.blocked:
        text, finish, call = report.message, "content_filter", None
    server.served += 1
    counts = usage(len(gen.ids), completion.completion_tokens + call_tokens)
    return reply.whole(text, finish, counts, report, call)


def _call_id(tok) -> int | None:
    return tok.special_ids.get(tok.chat.tool_call) if tok.chat.tool_call else None


async def _write_call(
    server: Server, gen: Generation, job: Job, completion: Completion | None, wait: Callable
) -> tuple[dict | None, int] | None:
    """The tool call a completion is or ends in, written in the shared batch like the reply: (the call or
    {"error": why}, tokens it took), (None, 0) when the reply calls nothing, None when the client left."""
    if completion is None:
        return None
    if gen.call is not None:
        # the completion is the call (tool_choice made the reply one)
        spec, written = gen.call, completion
    elif gen.tools is not None and completion.token_ids[-1:] == [_call_id(server.loaded.tokenizer)]:
        ids = [*gen.ids, *completion.token_ids]
        spec = call_prompt(server.loaded.tokenizer, ids, gen.tools.tools)
        job.submit(spec.ids, spec.params)
        if (written := await wait()) is None:
            return None
    else:
        return None, 0
    call, _ = read_call(spec, written.text)
    extra = 0 if written is completion else written.completion_tokens
    return (call if "error" in call else gen.tools.check(call)), extra


async def stream_events(server: Server, reply: Reply, job: Job) -> AsyncIterator[bytes]:
    """The reply as it is generated, held back by the policy's stream guard; then why it ended (moderation's
    report with it), usage when asked for, and [DONE]."""
    gen, generation = reply.gen, job.generation
    yield reply.chunk(gen.echo, first=True, myna={"context": asdict(gen.context)})
    guard = StreamGuard(server.policy)  # holds back the words a block term could still complete
    try:
        # a reply that must be a call streams no text: the call comes whole, once written
        async for delta in generation.astream() if gen.call is None else _nothing():
            if shown := guard.feed(delta):
                yield reply.chunk(shown)
            if guard.blocked:
                generation.cancel()
                break
        else:
            if rest := guard.finish():
                yield reply.chunk(rest)
        completion = await generation.aresult()
        call, call_tokens = await _write_call(server, gen, job, completion, lambda: job.generation.aresult())
    except Exception as e:  # the engine failed mid-stream: say so in OpenAI's streamed-error shape
        yield sse(error_body(500, f"generation failed: {type(e).__name__}: {e}"))
        yield sse("[DONE]")
        return
    job.finished = True
    report = await moderate(server, gen.prompt_text, guard.text)
    finish, myna = completion.finish_reason, {"moderation": report.to_dict()}
    if report.blocked:  # the held-back words completed a block term: they and the rest are withheld
        finish, call = "content_filter", None
        yield reply.chunk(("\n\n" if guard.sent else "") + report.message)
    if call is not None and "error" in call:
        myna["tool_call_error"] = call["error"]
    elif call is not None:
        finish = "tool_calls"
        yield reply.chunk(None, tool_calls=[{"index": 0, **tool_call_body(call)}])
    yield reply.chunk(None, finish, myna=myna)
    if gen.form.include_usage:
        yield reply.usage_chunk(completion.completion_tokens + call_tokens)
    yield sse("[DONE]")
    server.served += 1


async def _nothing() -> AsyncIterator[str]:
    return
    yield


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _finished(request: Request, job: Job):
    """The finished Completion, or None when the client disconnected first (leaving the slot then cancels it)."""
    result = asyncio.ensure_future(job.generation.aresult())
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
# The endpoints


def server_of(request: Request) -> Server:
    return request.app.state.server


def authorized(request: Request) -> None:
    api_key = server_of(request).config.api_key
    if api_key is None:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(
            401,
            "You didn't provide an API key: send it as 'Authorization: Bearer KEY'",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(key.strip().encode(), api_key.encode()):
        raise APIError(
            401, "Incorrect API key provided", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )


def ready(request: Request) -> None:
    server = server_of(request)
    if server.status == "loading":
        raise APIError(
            503,
            "the model is still loading; retry shortly",
            code="model_loading",
            headers={"Retry-After": "1"},
        )
    if server.status == "error":
        raise APIError(503, f"the model failed to load: {server.error}", code="model_load_failed")


async def admit(request: Request) -> AsyncIterator[Job]:
    """The body, and a concurrency slot for the work on it, held until the response is sent (a stream's last
    event, or the client gone): a request over the limit gets 429 before that work starts."""
    server = server_of(request)
    config = server.config
    body = await read_body(request, config.max_body_bytes, config.body_timeout, config.api_key is None)
    with server.slot(body) as job:
        yield job


Admitted = Annotated[Job, Depends(admit)]
public = APIRouter()  # no key needed
v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized), Depends(ready)])


@public.get("/health")
async def health(request: Request) -> JSONResponse:
    server = server_of(request)
    return JSONResponse(server.health(), 200 if server.status == "ready" else 503)


@v1.get("/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [server_of(request).model_card()]}


@v1.get("/models/{model:path}")
async def get_model(request: Request, model: str) -> dict:
    server = server_of(request)
    server.check_model({"model": model})
    return server.model_card()


@v1.post("/chat/completions")
async def chat_completions(request: Request, job: Admitted) -> Response:
    return await complete(request, job, prepare_chat)


@v1.post("/completions")
async def completions(request: Request, job: Admitted) -> Response:
    return await complete(request, job, prepare_completion)


@v1.post("/embeddings")
async def embeddings(request: Request, job: Admitted) -> JSONResponse:
    server = server_of(request)
    response = await asyncio.to_thread(embed, server, job.body)
    server.served += 1
    return JSONResponse(response)


def searchable(request: Request) -> None:
    if server_of(request).searcher is None:
        raise APIError(
            404,
            "this server was started without --index: /v1/search and /v1/ask need a search index "
            "(build one with `myna index build`, then `myna serve --index INDEX`)",
            code="search_not_enabled",
        )


async def json_reply(request: Request, job: Job, handle: Callable[[dict], dict]) -> JSONResponse:
    """A JSON endpoint's work on the parsed body, off the event loop, counted as served."""
    response = await asyncio.to_thread(lambda: handle(parse_json(job.body)))
    server_of(request).served += 1
    return JSONResponse(response)


@v1.post("/search", dependencies=[Depends(searchable)])
async def search_posts(request: Request, job: Admitted) -> JSONResponse:
    return await json_reply(request, job, server_of(request).searcher.search)


@v1.post("/ask", dependencies=[Depends(searchable)])
async def ask_posts(request: Request, job: Admitted) -> Response:
    """Retrieval off the event loop, then the answer generated in the engine's shared batch as a chat reply is,
    with the same limits, cancellation and moderation of the question and of the answer."""
    server = server_of(request)
    asking = await asyncio.to_thread(prepare_ask, server, job.body)
    question, report, prompt = asking.question, asking.report, asking.prompt
    if prompt is None:
        refused = Answer(question.text, "", report.message, [], finish_reason="content_filter")
        return JSONResponse(answer_response(server, refused, usage(0, 0), report))
    job.submit(prompt.ids, prompt.params)
    completion = await _finished(request, job)
    if completion is None:  # nobody is listening
        return Response(status_code=499)
    report = await moderate(server, question.text, completion.text)
    answer = prompt.answer(completion.text, completion.finish_reason)
    if report.blocked:  # the posts stay: they are what /v1/search shows; the model's words are withheld
        answer.text, answer.cited, answer.finish_reason = report.message, [], "content_filter"
    server.served += 1
    counts = usage(completion.prompt_tokens, completion.completion_tokens)
    return JSONResponse(answer_response(server, answer, counts, report))


def advertising(request: Request) -> None:
    if server_of(request).ads is None:
        raise APIError(
            404,
            "this server was started without --ads: /v1/ads needs an inventory (myna serve --ads INVENTORY.jsonl)",
            code="ads_not_enabled",
        )


@v1.post("/ads/match", dependencies=[Depends(advertising)])
async def ads_match(request: Request, job: Admitted) -> JSONResponse:
    return await json_reply(request, job, server_of(request).ads.match)


@v1.post("/ads/click", dependencies=[Depends(advertising)])
async def ads_click(request: Request, job: Admitted) -> JSONResponse:
    return await json_reply(request, job, server_of(request).ads.click)


def answer_response(server: Server, answer: Answer, counts: dict, report: Report) -> dict:
    head = {"id": f"ask-{uuid.uuid4().hex}", "object": "search.answer", "created": int(time.time())}
    body = {**head, "model": server.model_id, **answer_body(answer), "usage": counts}
    return {**body, "myna": {"moderation": report.to_dict()}}


async def api_error(request: Request, e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.code, e.param), e.status, headers=e.headers)


async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    # unknown paths and wrong methods, in the same shape as everything else
    return JSONResponse(error_body(e.status_code, str(e.detail)), e.status_code, headers=e.headers)


async def internal_error(request: Request, e: Exception) -> JSONResponse:
    # a bug: the client gets OpenAI's shape, the log the traceback (Starlette raises it on to uvicorn)
    return JSONResponse(error_body(500, "internal server error; the server's log has the details"), 500)


# ---------------------------------------------------------------------------------------------------------------
# Who may call a server that has no API key, and how long a connection may take to ask


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
                await JSONResponse(error_body(403, message, "host_not_allowed"), 403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
    return partial(HeaderDeadline, header_timeout=header_timeout)


# ---------------------------------------------------------------------------------------------------------------
# The app


@asynccontextmanager
async def lifespan(app: FastAPI):
    server: Server = app.state.server
    # a daemon thread: uvicorn accepts connections (and answers 503) while the weights load
    threading.Thread(target=server.load, name="myna-serve-load", daemon=True).start()
    yield
    if server.engine is not None:
        server.engine.close()
    if server.searcher is not None:
        server.searcher.close()


def create_app(
    ckpt: str | Path, config: ServeConfig, on_load: Callable[[Loaded], None] | None = None
) -> FastAPI:
    """The server for one run (or checkpoint). on_load(loaded) runs in the loading thread before the engine
    starts (tests hold it to see the 503s, or slow the model down)."""
    app = FastAPI(title="Myna", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = Server(ckpt, config, on_load)
    if config.api_key is None:
        # with a key, the key is the protection: a page on another site cannot send it
        app.add_middleware(HostCheck, allowed=frozenset(h.lower() for h in config.allowed_hosts))
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.include_router(public)
    app.include_router(v1)
    app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")
    return app


def serve(ckpt: str | Path, config: ServeConfig) -> None:
    """Serve a run until interrupted: the OpenAI API under /v1 and the web chat at /."""
    set_cpu_threads(config.device)
    app = create_app(ckpt, config)
    host = f"[{config.host}]" if ":" in config.host else config.host
    url = f"http://{host}:{config.port}"
    server = app.state.server
    log(f"[bold]myna serve[/bold]: {server.model_id} at {url}/ (web chat), API base {url}/v1")
    if server.searcher is not None:
        search = server.searcher.describe()
        how = {"served": "the served model", "own": "the index's own model", None: "none: lexical only"}
        log(
            f"serve: search over {search['posts']:,} posts in {config.index} (embedder: {how[search['embedder']]})"
        )
    if config.api_key is None and not host_allowed(host, frozenset()):
        log(
            f"[yellow]serve: listening on {config.host} without --api-key: anyone who reaches it can use the "
            "model (under a loopback name or one given with --allow-host); see the README's security section"
        )
    uvicorn.run(
        app,
        http=header_deadline(config.header_timeout),
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=5,
    )
