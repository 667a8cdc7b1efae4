"""The chat template: OpenAI-shaped messages <-> token ids, the same for training and for inference.

    <|bos|> <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...

A role token opens each turn and <|end|> closes it. A tool's answer is a turn opened by <|tool_result|>; an
assistant turn that calls tools holds <|tool_call|> {"name": ..., "arguments": ...} <|end|> after its text.
Only assistant output is learned: the text of assistant turns and the <|end|> that closes them, so the model learns
when to stop; everything else (role tokens included) is context. A prompt for generation ends with an open
<|assistant|> and decoding stops at <|end|>.

Special tokens enter a sequence only through these functions: `Tokenizer.encode` keeps their strings in user text as
plain text.
"""

import json
from dataclasses import dataclass

from myna.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Rendered:
    ids: list[int]
    targets: list[bool]  # targets[i]: ids[i] is assistant output the model is trained to produce


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


def _turn(message: dict, tok: Tokenizer) -> tuple[list[int], list[bool]]:
    """One message's ids and target flags: role token, text, tool calls, <|end|>."""
    role = message["role"]
    opener = {
        "system": tok.system_id,
        "user": tok.user_id,
        "assistant": tok.assistant_id,
        "tool": tok.tool_result_id,
    }[role]
    body = tok.encode(message.get("content") or "")
    for call in message.get("tool_calls") or []:
        body += [tok.tool_call_id, *tok.encode(_tool_call_text(call))]
    ids = [opener, *body, tok.eot_id]
    learn = role == "assistant"
    return ids, [False] + [learn] * (len(body) + 1)


def render(messages: list[dict], tok: Tokenizer) -> Rendered:
    """A whole conversation for training: <|bos|> then every turn."""
    check_messages(messages)
    ids, targets = [tok.bos_id], [False]
    for m in messages:
        turn_ids, turn_targets = _turn(m, tok)
        ids += turn_ids
        targets += turn_targets
    return Rendered(ids, targets)


def turn_stop_ids(tok: Tokenizer) -> tuple[int, ...]:
    """Tokens that end an assistant reply besides <|end|>: any that opens a new turn or document means the
    model's own turn is over (a weak model sometimes skips <|end|> and starts writing the user's turn)."""
    return (tok.bos_id, tok.system_id, tok.user_id, tok.assistant_id, tok.tool_result_id)


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
    system = [m for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    head = [tok.bos_id] + [i for m in system for i in _turn(m, tok)[0]]
    turns = [_turn(m, tok)[0] for m in rest]
    tail = [tok.assistant_id]
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
        # the newest message alone does not fit: keep its role token and as much of its end as there is room for
        newest = turns[-1]
        if room < 3:
            raise ValueError(f"context budget {budget} leaves no room for a message after the system prompt")
        kept = [[newest[0], *newest[len(newest) - room + 1 :]]]
        dropped, truncated = len(turns) - 1, True
    return Prompt(head + [i for t in kept for i in t] + tail, dropped, truncated)
