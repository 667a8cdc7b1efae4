"""OpenAI's HTTP API as data: errors in its shape, a request's body read and its fields checked, and the pieces
of a response. Nothing here knows the model or the server; myna/serve/api.py does the work between."""

import asyncio
import json
import re
import uuid
from dataclasses import dataclass

from fastapi import Request
from fastapi.sse import format_sse_event
from starlette.requests import ClientDisconnect

from myna.infer.engine import SamplingParams
from myna.template import check_messages

MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_EMBED_INPUTS = 2048  # inputs per embeddings request, as OpenAI allows
MAX_TOOLS = 128  # function tools per request, as OpenAI allows
MAX_JSON_DEPTH = 32  # lists and objects nested in a body; OpenAI's requests nest a handful deep
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
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
CHAT_FIELDS |= {"tools", "tool_choice", "parallel_tool_calls"}
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
    "response_format": ({"type": "text"},),
}
CHAT_OFF = ("n", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias")
CHAT_OFF += ("response_format",)
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


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    kind = {429: "requests"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
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
        raise invalid(TOO_DEEP) from e
    except ValueError as e:
        raise invalid(f"the body is not valid JSON: {e}") from e
    # before the type check: whether json.loads itself ran out of stack on a deep body depends on the thread
    level = [body] if isinstance(body, dict | list) else []
    for _ in range(MAX_JSON_DEPTH):
        level = [
            v for c in level for v in (c.values() if isinstance(c, dict) else c) if isinstance(v, dict | list)
        ]
        if not level:
            break
    else:
        raise invalid(TOO_DEEP)
    if not isinstance(body, dict):
        raise invalid(f"the body must be a JSON object, got {type(body).__name__}")
    if b"\\u" in raw:  # only an escape can spell a lone surrogate
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError as e:
            char = f"\\u{ord(e.object[e.start]):04x}"
            raise invalid(f"the body is not valid JSON: a string holds a lone surrogate ({char})") from e
    return body


def check_fields(body: dict, known: set[str], off: tuple[str, ...]) -> None:
    for name, value in body.items():
        if name in known or (name in off and value is None):
            continue
        if name in off:
            if value not in OFF_VALUES[name]:
                allowed = " or ".join(json.dumps(v) for v in OFF_VALUES[name])
                raise invalid(f"{name}: not supported by this server (only {allowed})", name)
            continue
        raise invalid(f"Unrecognized request argument supplied: {name}", name)


def number_field(
    body: dict, name: str, default, lo: float, hi: float, integer: bool = False, open_lo: bool = False
):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        kind = "an integer" if integer else "a number"
        raise invalid(f"{name}: expected {kind}, got {json.dumps(value)}", name)
    if not (lo < value if open_lo else lo <= value) or value > hi:
        bracket = "(" if open_lo else "["
        raise invalid(f"{name}: {value} is outside {bracket}{lo}, {hi}]", name)
    return value


def flag_field(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise invalid(f"{name}: expected true or false, got {json.dumps(value)}", name)
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
        raise invalid(f"stop: expected a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    return tuple(stops)


def sampling_params(body: dict, vocab_size: int) -> SamplingParams:
    """Everything but max_tokens, which depends on the prompt."""
    return SamplingParams(
        temperature=number_field(body, "temperature", 1.0, 0, 2),
        top_p=number_field(body, "top_p", 1.0, 0, 1, open_lo=True),
        top_k=number_field(body, "top_k", 0, 0, vocab_size, integer=True),
        repetition_penalty=number_field(body, "repetition_penalty", 1.0, 0, 10, open_lo=True),
        seed=number_field(body, "seed", None, 0, 2**63 - 1, integer=True),
        stop=_stops(body),
    )


@dataclass
class ReplyForm:
    """How a completion is answered: as a chat turn or as text, whole or streamed."""

    chat: bool
    stream: bool
    include_usage: bool  # a stream ends with a chunk of token counts
    echo: bool  # a text completion opens with its prompt


def reply_form(body: dict, chat: bool) -> ReplyForm:
    stream = flag_field(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("stream_options: only allowed when stream is true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid('stream_options: expected {"include_usage": true|false}', "stream_options")
        include_usage = flag_field(options, "include_usage")
    return ReplyForm(chat=chat, stream=stream, include_usage=include_usage, echo=flag_field(body, "echo"))


def chat_messages(body: dict) -> list[dict]:
    """OpenAI messages as the template takes them: text content parts joined, "developer" read as "system", an
    assistant's tool calls as {"name", "arguments"} with the arguments parsed."""
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
                if m.get("tool_calls") is not None:
                    m["tool_calls"] = _message_calls(m["tool_calls"], f"messages[{i}].tool_calls")
            out.append(m)
        messages = out
    try:
        return check_messages(messages)
    except ValueError as e:
        raise invalid(str(e), "messages") from e


def _text_parts(parts: list, where: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise invalid(f"{where}[{j}]: only text parts are supported, got {kind!r}", "messages")
        texts.append(part["text"])
    return "".join(texts)


def _message_calls(calls, where: str) -> list[dict]:
    """An assistant message's tool calls, as a client sends them back: [{"id", "type": "function", "function":
    {"name", "arguments": a JSON string}}] -> [{"name", "arguments": an object}], the shape the model was taught."""
    if not isinstance(calls, list):
        raise invalid(f"{where}: expected a list of tool calls", "messages")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(
                f'{where}[{j}]: expected {{"type": "function", "function": {{"name", "arguments"}}}}',
                "messages",
            )
        arguments = fn.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError as e:
                raise invalid(f"{where}[{j}].function.arguments: not JSON ({e})", "messages") from e
        if not isinstance(arguments, dict):
            raise invalid(f"{where}[{j}].function.arguments: expected a JSON object", "messages")
        out.append({"name": fn["name"], "arguments": arguments})
    return out


@dataclass
class ToolUse:
    """The function tools a chat request lets the reply call (OpenAI's tools and tool_choice).

    The tool definitions are not shown to the model: Myna's models learn their tools (search) in SFT, and an
    imported model's template is read without its tool prompt. What the request names decides which calls the model
    may make and how much of the call's JSON is fixed for it (see myna/infer/chat.py CallPrompt)."""

    tools: dict[
        str, str | None
    ]  # name -> its one string argument, which alone the model writes; None: all of them
    required: dict[str, list[str]]  # name -> the arguments its parameters' schema requires
    forced: bool  # tool_choice "required" or a named function: the reply is a call

    def check(self, call: dict) -> dict:
        """The call, or {"error": why} when it lacks an argument its schema requires."""
        missing = [a for a in self.required.get(call.get("name"), []) if a not in call.get("arguments", {})]
        return {"error": f"{call['name']}: missing required argument {missing[0]!r}"} if missing else call


def chat_tools(body: dict) -> ToolUse | None:
    """The request's tools, or None when the reply may call none (no tools, or tool_choice "none")."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice not in (None, "none"):
            raise invalid("tool_choice: only allowed when tools are given", "tool_choice")
        if tools not in (None, []):
            raise invalid(f"tools: expected a list of at most {MAX_TOOLS} function tools", "tools")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise invalid(f"tools: expected a list of at most {MAX_TOOLS} function tools", "tools")
    found: dict[str, str | None] = {}
    required: dict[str, list[str]] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type") != "function":
            raise invalid(
                f'{where}: expected {{"type": "function", "function": {{"name", "parameters"}}}}', "tools"
            )
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise invalid(
                f"{where}.function.name: expected 1-64 letters, digits, _ or -, got {json.dumps(name)}",
                "tools",
            )
        if name in found:
            raise invalid(f"{where}.function.name: {name!r} is named twice", "tools")
        schema = fn.get("parameters", {"type": "object"})
        properties = schema.get("properties", {}) if isinstance(schema, dict) else None
        needs = schema.get("required", []) if isinstance(schema, dict) else None
        if (
            not isinstance(properties, dict)
            or schema.get("type", "object") != "object"
            or not isinstance(needs, list)
            or not all(isinstance(a, str) for a in needs)
        ):
            raise invalid(
                f"{where}.function.parameters: expected a JSON Schema of type object with properties and required",
                "tools",
            )
        ((argument, spec),) = properties.items() if len(properties) == 1 else ((None, None),)
        found[name] = argument if isinstance(spec, dict) and spec.get("type") == "string" else None
        required[name] = needs
    flag_field(body, "parallel_tool_calls")  # either way a reply makes at most one call
    if choice in (None, "auto", "required"):
        return ToolUse(found, required, forced=choice == "required")
    if choice == "none":
        return None
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise invalid(
            'tool_choice: expected "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    if name not in found:
        raise invalid(f"tool_choice: no tool named {name!r} among the tools", "tool_choice")
    return ToolUse({name: found[name]}, required, forced=True)


def tool_call_body(call: dict) -> dict:
    """A call as OpenAI's responses carry it: arguments as a JSON string, and an id the tool message names."""
    arguments = json.dumps(call["arguments"], ensure_ascii=False)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call["name"], "arguments": arguments},
    }


def token_ids(value, vocab_size: int, where: str) -> list[int]:
    if not value or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in value
    ):
        raise invalid(
            f"{where}: expected a non-empty list of token ids in [0, {vocab_size})", where.split("[")[0]
        )
    return list(value)


# ---------------------------------------------------------------------------------------------------------------
# Response pieces


@dataclass
class Context:
    """How a prompt fit the model's context: a response's `myna.context`, and its x-myna-* headers."""

    prompt_tokens: int
    dropped_turns: int  # oldest turns left out to fit
    truncated: bool  # the newest message cut to fit
    max_tokens: int  # as granted: clipped to the room the prompt leaves
    max_tokens_requested: int | None

    @classmethod
    def fit(
        cls,
        prompt_tokens: int,
        requested: int | None,
        max_len: int,
        dropped_turns: int = 0,
        truncated: bool = False,
    ) -> "Context":
        room = max_len - prompt_tokens
        return cls(prompt_tokens, dropped_turns, truncated, min(requested or room, room), requested)

    def headers(self) -> dict[str, str]:
        return {
            "x-myna-prompt-tokens": str(self.prompt_tokens),
            "x-myna-dropped-turns": str(self.dropped_turns),
            "x-myna-truncated": str(self.truncated).lower(),
            "x-myna-max-tokens": str(self.max_tokens),
        }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(data: dict | str) -> bytes:
    return format_sse_event(data_str=data if isinstance(data, str) else json.dumps(data, ensure_ascii=False))


def choice(chat: bool, text: str, finish: str, call: dict | None = None) -> dict:
    """The one choice of a whole (not streamed) response; `call` is a tool call in OpenAI's shape."""
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    message = {"role": "assistant", "content": text, "refusal": None}
    if call is not None:
        message.update(content=text or None, tool_calls=[call])
    return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}


def chunk_choice(
    chat: bool, text: str | None, finish: str | None, first: bool, tool_calls: list[dict] | None = None
) -> dict:
    """The one choice of a streamed chunk: the first opens the assistant turn, text None carries finish_reason
    or the tool calls."""
    if not chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    delta = (
        {"role": "assistant", "content": text or ""} if first else {} if text is None else {"content": text}
    )
    if tool_calls:
        delta = {"tool_calls": tool_calls}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
