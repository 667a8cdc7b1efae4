"""`myna chat` and `myna generate`: the engine behind a terminal.

A ChatSession holds one conversation (messages in the OpenAI shape), turns each user line into a prompt with the
chat template, streams the reply, and applies the operator's moderation policy to both sides, saying what it did.
Commands: /reset, /system TEXT, /temperature T, /help, /quit.
"""

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from myna.infer.engine import Engine, SamplingParams
from myna.moderation import Policy, StreamGuard, moderate_exchange
from myna.template import prompt_budget, render_prompt, turn_stop_ids

HELP = "commands: /reset (new conversation), /system TEXT, /temperature T, /help, /quit"


@dataclass
class Turn:
    """What happened in one exchange, beside the streamed text."""

    text: str = ""
    finish_reason: str = ""
    notes: list[str] = field(default_factory=list)  # dropped turns, moderation actions: shown, never silent


class ChatSession:
    def __init__(
        self, engine: Engine, params: SamplingParams, policy: Policy | None = None, system: str = ""
    ):
        self.engine, self.params = engine, params
        self.policy = policy or Policy.off()
        self.system = system
        self.messages: list[dict] = []

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
        system = [{"role": "system", "content": self.system}] if self.system else []
        budget = prompt_budget(self.engine.max_len, self.params.max_tokens)
        prompt = render_prompt(system + self.messages, self.engine.tokenizer, budget)
        if prompt.dropped_turns:
            turn.notes.append(f"context full: the oldest {prompt.dropped_turns} message(s) were left out")
        if prompt.truncated:
            turn.notes.append("context full: the start of your message was cut")

        guard = StreamGuard(self.policy)
        stops = (*self.params.stop_token_ids, *turn_stop_ids(self.engine.tokenizer))
        request = self.engine.submit(prompt.ids, replace(self.params, stop_token_ids=stops))
        for delta in request:
            if shown := guard.feed(delta):
                turn.text += shown
                yield shown
            if guard.blocked:
                request.cancel()
                break
        if not guard.blocked and (rest := guard.finish()):
            turn.text += rest
            yield rest
        result = request.result()
        final = moderate_exchange(self.policy, user_text, guard.text)
        if final.blocked == "output":
            turn.finish_reason = "blocked"
            turn.notes.append(f"moderation: {final.message}")
        else:
            turn.finish_reason = result.finish_reason
            if final.output is not None and final.output.action == "label":
                turn.notes.append(f"moderation: the reply is labelled {', '.join(final.output.names())}")
        self.messages.append({"role": "assistant", "content": turn.text})


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
