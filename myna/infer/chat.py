"""`myna chat` and `myna generate`: the engine behind a terminal.

A ChatSession holds one conversation (messages in the OpenAI shape), turns each user line into a prompt with the
chat template, streams the reply, and applies the operator's moderation policy to both sides, saying what it did.
Commands: /reset, /system TEXT, /temperature T, /help, /quit.

Tools (`myna chat --index`: search): when the model writes the format's tool-call token, generation stops there,
the call ({"name": ..., "arguments": ...}) is generated on its own, the tool runs, and the call and the tool's answer
join the conversation as turns before the model goes on, at most MAX_TOOL_CALLS times a reply.
"""

import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from myna.infer.engine import Engine, SamplingParams
from myna.moderation import Policy, StreamGuard, moderate_exchange
from myna.search.tool import check_citations
from myna.template import prompt_budget, render_prompt, turn_stop_ids

HELP = "commands: /reset (new conversation), /system TEXT, /temperature T, /help, /quit"
MAX_TOOL_CALLS = 2  # tool calls in one reply; after them the model answers with what it has
CALL_TOKENS = 96  # a call's JSON is short: a name and a query


@dataclass
class Tool:
    run: Callable  # (arguments, room: tokens the result may take) -> ToolResult
    argument: str  # the string argument the model writes ("query" for search)


@dataclass
class ToolResult:
    content: str  # the tool turn's text
    items: int = 0  # numbered items in it ([1]..[items]) that the reply may cite
    note: str = ""  # what the terminal shows


@dataclass
class Turn:
    """What happened in one exchange, beside the streamed text."""

    text: str = ""
    finish_reason: str = ""
    notes: list[str] = field(default_factory=list)  # dropped turns, moderation actions: shown, never silent
    tool_calls: list[dict] = field(default_factory=list)  # {"name", "arguments"} of the calls the model made
    cited: list[int] = field(default_factory=list)  # items of the last tool result the reply cites


class ChatSession:
    def __init__(
        self,
        engine: Engine,
        params: SamplingParams,
        policy: Policy | None = None,
        system: str = "",
        tools: dict[str, Tool] | None = None,
    ):
        self.engine, self.params = engine, params
        self.policy = policy or Policy.off()
        self.system = system
        self.messages: list[dict] = []
        self.tool_items: int | None = None  # items of the current reply's last tool result
        tok = engine.tokenizer
        self.tools = tools or {}
        # only a format with a tool-call token can call tools (a bare newline would stop every reply)
        self.call_id = tok.special_ids.get(tok.chat.tool_call) if self.tools and tok.chat.tool_call else None

    def reset(self) -> None:
        self.messages = []

    def command(self, line: str) -> str:
        """Run a /command; returns what to print."""
        name, _, arg = line.strip().partition(" ")
        if name == "/reset":
            self.reset()
            return "(new conversation)"
        if name == "/system":
            self.system = arg.strip()
            return f"(system prompt {'set' if self.system else 'cleared'})"
        if name == "/temperature":
            try:
                value = float(arg)
            except ValueError:
                return f"(/temperature expects a number, got {arg!r})"
            if value < 0:
                return "(/temperature must be >= 0)"
            self.params = replace(self.params, temperature=value)
            return f"(temperature {value})"
        if name == "/help":
            return HELP
        return f"(unknown command {name}; {HELP})"

    def respond(self, user_text: str, turn: Turn) -> Iterator[str]:
        """Stream the assistant's reply to `user_text`; `turn` collects the text and the notes."""
        report = moderate_exchange(self.policy, user_text)
        if report.blocked:
            turn.finish_reason = "blocked"
            turn.notes.append(f"moderation: {report.message}")
            return
        if report.action == "label":
            turn.notes.append(f"moderation: your message is labelled {', '.join(report.input.names())}")
        self.messages.append({"role": "user", "content": user_text})
        self.tool_items = None  # items of this reply's last tool result
        for calls in range(MAX_TOOL_CALLS + 1):
            called = yield from self._reply(user_text, turn, tools=calls < MAX_TOOL_CALLS)
            if not called:
                return

    def _reply(self, user_text: str, turn: Turn, tools: bool) -> Iterator[str]:
        """Stream one generation of the assistant's turn; returns True when it ended in a tool call, which then ran
        and joined the conversation with its result."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        budget = prompt_budget(self.engine.max_len, self.params.max_tokens)
        prompt = render_prompt(system + self.messages, self.engine.tokenizer, budget)
        if prompt.dropped_turns:
            turn.notes.append(f"context full: the oldest {prompt.dropped_turns} message(s) were left out")
        if prompt.truncated:
            turn.notes.append("context full: the start of your message was cut")

        guard = StreamGuard(self.policy)
        calling = (self.call_id,) if tools and self.call_id is not None else ()
        stops = (*self.params.stop_token_ids, *turn_stop_ids(self.engine.tokenizer), *calling)
        request = self.engine.submit(prompt.ids, replace(self.params, stop_token_ids=stops))
        text = ""
        for delta in request:
            if shown := guard.feed(delta):
                text += shown
                yield shown
            if guard.blocked:
                request.cancel()
                break
        if not guard.blocked and (rest := guard.finish()):
            text += rest
            yield rest
        turn.text += text
        result = request.result()
        if calling and not guard.blocked and result.token_ids[-1:] == [self.call_id]:
            self._call_tool(prompt.ids + result.token_ids, text, turn)
            return True
        final = moderate_exchange(self.policy, user_text, guard.text)
        if final.blocked == "output":
            turn.finish_reason = "blocked"
            turn.notes.append(f"moderation: {final.message}")
        else:
            turn.finish_reason = result.finish_reason
            if final.output is not None and final.output.action == "label":
                turn.notes.append(f"moderation: the reply is labelled {', '.join(final.output.names())}")
        if self.tool_items is not None:  # the reply answers from a tool's numbered items: check its citations
            text, turn.cited, removed = check_citations(text, self.tool_items)
            if removed:
                turn.notes.append(f"removed {removed} citation(s) of items the tool did not return")
        self.messages.append({"role": "assistant", "content": text})
        return False

    def _call_tool(self, ids: list[int], text: str, turn: Turn) -> None:
        """The model wrote the tool-call token after `text`: write the call, run it, add both turns."""
        call, written = self._write_call(ids)
        if "error" in call:
            result = ToolResult(f"error: {call['error']}", note=f"tool call not understood: {call['error']}")
        else:
            room = prompt_budget(self.engine.max_len, self.params.max_tokens) - len(ids) - CALL_TOKENS
            result = self.tools[call["name"]].run(call["arguments"], room)
            turn.tool_calls.append(call)
        turn.notes.append(result.note)
        self.tool_items = result.items
        message_call = {"name": call.get("name", "?"), "arguments": call.get("arguments", written)}
        self.messages.append({"role": "assistant", "content": text or None, "tool_calls": [message_call]})
        self.messages.append({"role": "tool", "content": result.content})

    def _write_call(self, ids: list[int]) -> tuple[dict, str]:
        """The call after the tool-call token at the end of `ids`, and its text."""
        spec = call_prompt(self.engine.tokenizer, ids, {n: t.argument for n, t in self.tools.items()})
        return read_call(spec, self.engine.generate(spec.ids, spec.params).text)


@dataclass
class CallPrompt:
    """What the model is given to write a tool call after the tool-call token, and how to read what it writes.

    The JSON the model would only get wrong is fixed, as grammar-constrained decoding would have it (a small model
    gets the name and the braces wrong): with one tool its name, and when that tool takes one string argument, all
    but the argument's value. With several tools the model writes the whole call."""

    ids: list[int]  # the conversation up to the tool-call token, then the fixed prefix
    params: SamplingParams
    prefix: str  # the call's JSON fixed before the model writes
    tools: dict[str, str | None]  # the tools it may call -> the one string argument the model writes, or None


def call_prompt(tok, ids: list[int], tools: dict[str, str | None]) -> CallPrompt:
    params = SamplingParams(max_tokens=CALL_TOKENS, temperature=0, stop_token_ids=turn_stop_ids(tok))
    prefix = ""
    if len(tools) == 1:
        ((name, argument),) = tools.items()
        if argument is None:
            # {"name": "NAME", "arguments":
            prefix = json.dumps({"name": name, "arguments": ""})[:-2]
        else:
            # {"name": "NAME", "arguments": {"ARG": "   and the value ends at its closing quote
            prefix = json.dumps({"name": name, "arguments": {argument: ""}})[:-3]
            params = replace(params, stop=('"}',))
    return CallPrompt(ids + tok.encode(prefix), params, prefix, tools)


def read_call(spec: CallPrompt, written: str) -> tuple[dict, str]:
    """({"name", "arguments"} or {"error": why}, the call's whole JSON text) from what the model wrote."""
    if spec.params.stop:
        ((name, argument),) = spec.tools.items()
        try:
            value = json.loads(f'"{written}"')  # the model's escapes (\" in a phrase query)
        except json.JSONDecodeError:
            value = written
        call = {"name": name, "arguments": {argument: value}}
        return call, json.dumps(call, ensure_ascii=False)
    text = spec.prefix + written
    call = parse_call(text)
    if "error" not in call and call["name"] not in spec.tools:
        call = {"error": f"no tool named {call['name']!r}"}
    return call, text


def parse_call(written: str) -> dict:
    """{"name", "arguments"} from the JSON a model wrote after the tool-call token, or {"error": why}."""
    try:
        call = json.loads(written)
    except json.JSONDecodeError as e:
        return {"error": f"not JSON ({e.msg} at character {e.pos})"}
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return {"error": 'expected {"name": ..., "arguments": {...}}'}
    arguments = call.get("arguments") or {}
    if isinstance(arguments, str):  # OpenAI's clients send arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return {"error": "arguments: not JSON"}
    if not isinstance(arguments, dict):
        return {"error": "arguments: expected an object"}
    return {"name": call["name"], "arguments": arguments}


def run_terminal(session: ChatSession, stdin=sys.stdin, stdout=sys.stdout) -> None:
    """The read-reply loop; reads until /quit or end of input."""
    interactive = stdin.isatty()
    print(f"myna chat: {HELP}", file=stdout)
    while True:
        if interactive:
            print("\nyou> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            return
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            print(session.command(line), file=stdout, flush=True)
            continue
        turn = Turn()
        print("myna> ", end="", file=stdout, flush=True)
        t0 = time.perf_counter()
        for delta in session.respond(line, turn):
            print(delta, end="", file=stdout, flush=True)
        print(file=stdout)
        for note in turn.notes:
            print(f"  [{note}]", file=stdout)
        if turn.finish_reason == "length":
            print(f"  [stopped at the {session.params.max_tokens}-token limit]", file=stdout)
        if interactive:
            print(f"  [{time.perf_counter() - t0:.1f} s]", file=stdout)
