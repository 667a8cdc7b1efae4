"""How a model writes a conversation as text: Myna's own tokens, or the format an imported model was tuned on.

A format is a start, then for each turn its role's opener, the text and the closer:

    Myna:    <|bos|> <|user|> text <|end|> <|assistant|> text <|end|>
    ChatML:  <|im_start|>user\\n text <|im_end|>\\n <|im_start|>assistant\\n text <|im_end|>\\n

An imported model brings its chat template as Jinja (tokenizer_config.json, or a GGUF's tokenizer.chat_template).
Myna does not run that Jinja at inference: `derive_format` renders it once, in a sandbox, on probe conversations,
reads the opener and closer of each role off the output, and checks that the derived format renders a longer
conversation exactly as the template does. A template that is more than openers and closers (one that trims
text, reorders turns, or writes per-message logic) is refused with a clear message instead of being mimicked
wrong. Torch-free: the tokenizer and the import read it.
"""

import json
from dataclasses import asdict, dataclass

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatFormat:
    start: str  # text before the first turn
    openers: dict[str, str]  # role -> text that opens its turn; a role not here cannot be rendered
    closer: str  # text that closes every turn
    stop: str  # the special token that ends a reply: the part of the closer the model learns to write
    default_system: str | None = None  # system text the template adds when a conversation has none
    tool_call: str | None = None  # token that introduces a tool call in an assistant turn; None: a newline

    @classmethod
    def from_dict(cls, values: object, where: str) -> "ChatFormat":
        """A format read from a run's tokenizer_format.json (`where` names the file)."""
        names = {f for f in cls.__dataclass_fields__}
        if (
            not isinstance(values, dict)
            or set(values) - names
            or not {"start", "openers", "closer"} <= set(values)
        ):
            raise ValueError(f"{where}: 'chat_format' expected an object with fields {sorted(names)}")
        fmt = cls(**values)
        strings = [fmt.start, fmt.closer, fmt.stop, *fmt.openers.values(), *fmt.openers.keys()]
        if not isinstance(fmt.openers, dict) or not all(isinstance(s, str) for s in strings):
            raise ValueError(f"{where}: 'chat_format' holds a value that is not text")
        if set(fmt.openers) - set(ROLES) or "assistant" not in fmt.openers or fmt.stop not in fmt.closer:
            raise ValueError(f"{where}: 'chat_format' needs an assistant opener and a stop inside the closer")
        return fmt

    def to_dict(self) -> dict:
        return asdict(self)


MYNA = ChatFormat(
    start="<|bos|>",
    openers={
        "system": "<|system|>",
        "user": "<|user|>",
        "assistant": "<|assistant|>",
        "tool": "<|tool_result|>",
    },
    closer="<|end|>",
    stop="<|end|>",
    tool_call="<|tool_call|>",
)

# MYNA in Jinja, for transformers and llama.cpp: a prompt for generation puts the system messages first, as
# template.render_prompt does
MYNA_JINJA = (
    "{{- bos_token -}}"
    "{%- if add_generation_prompt -%}"
    "{%- set ordered = (messages | selectattr('role', 'equalto', 'system') | list)"
    " + (messages | rejectattr('role', 'equalto', 'system') | list) -%}"
    "{%- else -%}{%- set ordered = messages -%}{%- endif -%}"
    "{%- for m in ordered -%}"
    "{{- {'system': '<|system|>', 'user': '<|user|>', 'assistant': '<|assistant|>',"
    " 'tool': '<|tool_result|>'}[m['role']] -}}"
    "{{- m['content'] or '' -}}"
    "{%- for call in m.get('tool_calls') or [] -%}"
    "{%- set fn = call['function'] if 'function' in call else call -%}"
    "{{- '<|tool_call|>' + ({'name': fn['name'], 'arguments': fn['arguments']} | tojson) -}}"
    "{%- endfor -%}"
    "{{- '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def _renderer(template: str, bos_token: str, eos_token: str):
    """render(messages, generation) for a Jinja chat template, in jinja2's sandbox: the template came with a
    download, so it is untrusted code. The options and globals are those transformers renders chat templates with."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)

    def render(messages: list[dict], generation: bool = False) -> str:
        return compiled.render(
            messages=messages, add_generation_prompt=generation, bos_token=bos_token, eos_token=eos_token
        )

    return render


def _between(text: str, left: str, right: str) -> str:
    a = text.index(left) + len(left)
    return text[a : text.index(right, a)]


def _common(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def render_text(fmt: ChatFormat, messages: list[dict], generation: bool = False) -> str:
    """The text `fmt` makes of plain messages (in their order), as the Jinja template would."""
    out = fmt.start
    if fmt.default_system is not None and messages and messages[0]["role"] != "system":
        out += fmt.openers["system"] + fmt.default_system + fmt.closer
    for m in messages:
        out += fmt.openers[m["role"]] + m["content"] + fmt.closer
    return out + (fmt.openers["assistant"] if generation else "")


def derive_format(
    template: str, bos_token: str, eos_token: str, specials: set[str], where: str
) -> ChatFormat:
    """The openers and closer of a Jinja chat template, read off probe renderings and verified; `where` names the
    template's file in every error."""
    try:
        probe = _renderer(template, bos_token, eos_token)
        s, u1, a1, u2 = "MYNASYS1", "MYNAUSER1", "MYNAASSIST1", "MYNAUSER2"
        msgs = [
            {"role": "system", "content": s},
            {"role": "user", "content": u1},
            {"role": "assistant", "content": a1},
            {"role": "user", "content": u2},
        ]
        full = probe(msgs)
        closer = full[full.index(u2) + len(u2) :]
        generation = probe(msgs, generation=True)
        if not generation.startswith(full):
            raise ValueError("the generation prompt is not the conversation followed by an opener")
        opened = {}  # the text between two turns is the closer and then the next turn's opener
        for role, left, right in (("user", s, u1), ("assistant", u1, a1), ("user again", a1, u2)):
            gap = _between(full, left, right)
            if not gap.startswith(closer):
                raise ValueError(f"turns are not closed alike (after {left!r}: {gap!r})")
            opened[role] = gap[len(closer) :]
        openers = {"user": opened["user"], "assistant": generation[len(full) :]}
        if opened["user again"] != openers["user"] or opened["assistant"] != openers["assistant"]:
            raise ValueError("a role's turns open differently in different places")
        head = full[: full.index(s)]
        bare = probe(msgs[1:])  # no system message: the template may add its own
        before_user = bare[: bare.index(u1)]
        if not before_user.endswith(openers["user"]):
            raise ValueError("the first user turn opens differently from the others")
        start_and_default = before_user[: len(before_user) - len(openers["user"])]
        if head.startswith(start_and_default):  # no default system turn: what precedes the user is the start
            start, default = start_and_default, None
        else:  # a system turn of the template's own; where the start ends and the system opener begins is
            # not observable then: split the head where its rest looks most like the user opener
            start = head[: max(range(len(head) + 1), key=lambda k: (_common(head[k:], openers["user"]), k))]
            rest = start_and_default[len(head) :]
            if not start_and_default.startswith(head) or not rest.endswith(closer):
                raise ValueError("the default system turn is not written like a system turn")
            default = rest[: len(rest) - len(closer)]
        openers["system"] = head[len(start) :]
        try:
            tool = probe([*msgs[1:3], {"role": "tool", "content": "MYNATOOL1"}])
            openers["tool"] = _between(tool, a1 + closer, "MYNATOOL1")
        except Exception:  # the template has no tool role: tool messages are refused at render time
            pass
        stop = next((t for t in sorted(specials, key=len, reverse=True) if closer.startswith(t)), None)
        if stop is None:
            raise ValueError(f"the turn closer {closer!r} does not start with a special token")
        fmt = ChatFormat(start, openers, closer, stop, default, None)
        check = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there!\nHow are you?"},
            {"role": "assistant", "content": " Fine, thanks. "},
            {"role": "user", "content": "ok"},
        ]
        for messages, gen in ((check, True), (check[1:], False), (check[1:2], True)):
            if probe(messages, gen) != render_text(fmt, messages, gen):
                raise ValueError(
                    "a test conversation renders differently (the template does more than wrap turns)"
                )
        return fmt
    except ValueError as e:
        raise ValueError(f"{where}: chat template not understood: {e}") from None
    except Exception as e:  # jinja2's syntax, sandbox and undefined-variable errors
        raise ValueError(f"{where}: chat template does not render: {type(e).__name__}: {e}") from None
