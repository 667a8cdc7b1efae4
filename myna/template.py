"""The chat template: OpenAI-shaped messages <-> token ids, the same for training and for inference.

The run's tokenizer carries its chat format (myna/chat_format.py); Myna's own is

    <|bos|> <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...

and an imported model keeps its own (ChatML for SmolLM2). A role's opener starts each turn and the closer ends
it. A tool's answer is a turn of role "tool"; an assistant turn that calls tools holds the format's tool-call token
(<|tool_call|>) and {"name": ..., "arguments": ...} after its text. Only assistant output is learned: the text of
assistant turns and the closer up to its stop token, so the model learns when to stop; everything else (openers
included) is context. A prompt for generation ends with an open assistant turn and decoding stops at the stop
token.

Special tokens enter a sequence only through these functions: `Tokenizer.encode` keeps their strings in user text as
plain text, and only the format's own text goes through `Tokenizer.encode_special`.
"""

import json
from dataclasses import dataclass
from functools import lru_cache

from myna.chat_format import ROLES
from myna.tokenizer import Tokenizer


@dataclass
class Rendered:
    ids: list[int]
    targets: list[bool]  # targets[i]: ids[i] is assistant output the model is trained to produce
    turns: list[
        tuple[int, int, str]
    ]  # (start, end, role) of each turn in ids; ids before the first are the start


@dataclass
class Prompt:
    ids: list[int]
    dropped_turns: int  # oldest non-system messages left out so that the prompt fits the budget
    truncated: bool  # the newest message alone was too long and lost its beginning


def check_messages(messages, where: str = "messages") -> list[dict]:
    """Validate OpenAI-shaped messages; a clear error names the message index and the field."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}[{i}]: expected an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise ValueError(f"{where}[{i}].role: expected one of {ROLES}, got {m.get('role')!r}")
        content = m.get("content")
        if content is None and not m.get("tool_calls"):
            raise ValueError(f"{where}[{i}].content: missing")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"{where}[{i}].content: expected a string, got {type(content).__name__}")
    return messages


def _tool_call_text(call: dict) -> str:
    fn = call.get("function", call)
    return json.dumps({"name": fn.get("name"), "arguments": fn.get("arguments")}, ensure_ascii=False)


@lru_cache(maxsize=64)
def _piece(tok: Tokenizer, text: str) -> tuple[int, ...]:
    """Ids of a piece of the chat format (its openers and closer hold special tokens)."""
    return tuple(tok.encode_special(text))


def _turn(message: dict, tok: Tokenizer) -> tuple[list[int], list[bool]]:
    """One message's ids and target flags: opener, text, tool calls, closer."""
    fmt, role = tok.chat, message["role"]
    if role not in fmt.openers:
        raise ValueError(
            f"role {role!r}: this model's chat format has no such turn (it has {sorted(fmt.openers)})"
        )
    opener, closer = _piece(tok, fmt.openers[role]), _piece(tok, fmt.closer)
    body = tok.encode(message.get("content") or "")
    for call in message.get("tool_calls") or []:
        body += [*_piece(tok, fmt.tool_call or "\n"), *tok.encode(_tool_call_text(call))]
    learned = (
        closer.index(tok.special_ids[fmt.stop]) + 1 if role == "assistant" else 0
    )  # up to the stop token
    learn = role == "assistant"
    targets = [False] * len(opener) + [learn] * len(body) + [i < learned for i in range(len(closer))]
    return [*opener, *body, *closer], targets


def _default_system(tok: Tokenizer, messages: list[dict]) -> list[dict]:
    """The system message the format adds to a conversation that has none (SmolLM2's names the model)."""
    if tok.chat.default_system is None or any(m["role"] == "system" for m in messages):
        return []
    return [{"role": "system", "content": tok.chat.default_system}]


def render(messages: list[dict], tok: Tokenizer) -> Rendered:
    """A whole conversation for training: the format's start then every turn, in the messages' order."""
    check_messages(messages)
    ids = list(_piece(tok, tok.chat.start))
    targets, turns = [False] * len(ids), []
    for m in _default_system(tok, messages) + messages:
        turn_ids, turn_targets = _turn(m, tok)
        turns.append((len(ids), len(ids) + len(turn_ids), m["role"]))
        ids += turn_ids
        targets += turn_targets
    return Rendered(ids, targets, turns)


def reply_opener(tok: Tokenizer) -> list[int]:
    """The ids that open an assistant turn: the end of every prompt for generation."""
    return list(_piece(tok, tok.chat.openers["assistant"]))


def turn_stop_ids(tok: Tokenizer) -> tuple[int, ...]:
    """Tokens that end an assistant reply besides the stop token: any special token that opens a new turn or
    document means the model's own turn is over (a weak model sometimes skips the stop and writes the user's
    turn)."""
    starts = [_piece(tok, t)[:1] for t in (tok.chat.start, *tok.chat.openers.values())]
    ids = {tok.bos_id, *(i for s in starts for i in s)} & set(tok.special_ids.values())
    return tuple(sorted(ids))


def prompt_budget(max_len: int, max_tokens: int | None) -> int:
    """Tokens a prompt may take in a context of max_len: room is kept for the reply (max_tokens, or half the
    context when not given), but never more than half, so a long max_tokens does not push out all the history."""
    return max_len - min(max_tokens or max_len // 2, max_len // 2)


def render_prompt(messages: list[dict], tok: Tokenizer, budget: int | None = None) -> Prompt:
    """The ids that ask the model for the next assistant turn, in at most `budget` tokens.

    When the conversation does not fit, the oldest turns go first (system messages stay); if the newest message
    alone is still too long, its beginning is cut. Callers report both, since the model then saw less than was sent.
    """
    check_messages(messages)
    system = _default_system(tok, messages) + [m for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    head = [*_piece(tok, tok.chat.start)] + [i for m in system for i in _turn(m, tok)[0]]
    turns = [_turn(m, tok)[0] for m in rest]
    tail = reply_opener(tok)
    if budget is None:
        return Prompt(head + [i for t in turns for i in t] + tail, 0, False)

    room = budget - len(head) - len(tail)
    kept: list[list[int]] = []
    for t in reversed(turns):  # newest first
        if len(t) > room:
            break
        kept.insert(0, t)
        room -= len(t)
    dropped = len(turns) - len(kept)
    truncated = False
    if not kept and turns:
        # the newest message alone does not fit: keep its opener and as much of its end as there is room for
        newest, opener = turns[-1], len(_piece(tok, tok.chat.openers[rest[-1]["role"]]))
        if room < opener + 2:
            raise ValueError(f"context budget {budget} leaves no room for a message after the system prompt")
        kept = [[*newest[:opener], *newest[len(newest) - room + opener :]]]
        dropped, truncated = len(turns) - 1, True
    return Prompt(head + [i for t in kept for i in t] + tail, dropped, truncated)
