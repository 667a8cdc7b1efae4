"""Ad copy: post-length variants of an ad written by the chat model from a brief, every constraint checked.

`myna ads write --brief TEXT --brand NAME -n 5` asks the chat model for a post that sells the brief, samples
variants in batches (the engine runs them side by side), and keeps a variant only when it

- fits a post: at most MAX_CHARS characters (Unicode code points, after whitespace is squeezed);
- was finished by the model, not cut off at the token limit mid-sentence;
- names the brand (as whole words, any case);
- holds none of the banned words (matched as moderation matches terms: whole words, leetspeak, elongation);
- is brand safe itself: its own tier under the brand-safety policy is low;
- says something new: the same text twice counts once.

Every rejected variant is counted under its reason, so an advertiser sees why fewer than n came back. With
`lead` (the default) each reply opens with the brand's name, written for the model before it goes on, as
constrained decoding would: a small model otherwise rarely names it.
"""

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from myna.ads.safety import BrandSafety
from myna.infer.engine import Engine, SamplingParams
from myna.moderation import Category, Policy
from myna.template import prompt_budget, render_prompt

MAX_CHARS = 280  # a post's length, as the network counts it
MAX_TOKENS = 96  # a post of 280 characters is about 70 tokens of English: room to finish, not to ramble
TEMPERATURE = 0.9  # varied variants without word salad
TOP_P = 0.95
ATTEMPTS_PER_VARIANT = 4  # samples allowed per variant asked for, before giving up with what passed
MAX_BRIEF_CHARS = 2000  # a brief is a paragraph or two
MAX_BANNED = 1000
PROMPT = "Write a post of at most {chars} characters for {brand}: {brief}"


@dataclass
class Brief:
    text: str
    brand: str
    banned: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.text.strip() or len(self.text) > MAX_BRIEF_CHARS:
            raise ValueError(f"brief: expected 1..{MAX_BRIEF_CHARS} characters, got {len(self.text)}")
        if not self.brand.strip() or len(self.brand) > 100:
            raise ValueError(f"brand: expected 1..100 characters, got {self.brand!r}")
        if len(self.banned) > MAX_BANNED:
            raise ValueError(f"banned: at most {MAX_BANNED} words, got {len(self.banned)}")


@dataclass
class Variant:
    text: str
    accepted: bool
    reason: str  # why it was rejected; "ok" when accepted


@dataclass
class Written:
    accepted: list[str]
    rejected: Counter = field(default_factory=Counter)  # reason kind -> variants rejected for it
    variants: list[Variant] = field(default_factory=list)  # every sample, in the order written

    def to_dict(self) -> dict:
        return {
            "accepted": self.accepted,
            "rejected": dict(self.rejected),
            "variants": [v.__dict__ for v in self.variants],
        }


def squeeze(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def names_brand(text: str, brand: str) -> bool:
    words = r"\W+".join(re.escape(w) for w in brand.split())
    return re.search(rf"(?<!\w){words}(?!\w)", text, flags=re.IGNORECASE) is not None


def check(text: str, finish_reason: str, brief: Brief, banned: Policy, safety: BrandSafety | None) -> str:
    """Why a variant is rejected, as "kind: detail"; "ok" when it passes."""
    if not text:
        return "empty: the model wrote nothing"
    if finish_reason == "length":
        return f"cut off: not finished within {MAX_TOKENS} tokens"
    if len(text) > MAX_CHARS:
        return f"too long: {len(text)} characters, over {MAX_CHARS}"
    if not names_brand(text, brief.brand):
        return f"brand missing: {brief.brand!r} is not named"
    if (hit := banned.check(text)).categories:
        return f"banned word: {hit.categories[0].matches[0]!r}"
    if safety is not None:
        (record,) = safety.score([text], ["copy"])
        if record.tier != "low":
            return f"brand safety: the copy itself is {record.tier} ({record.rule})"
    return "ok"


def write_copy(
    engine: Engine,
    brief: Brief,
    n: int = 5,
    safety: BrandSafety | None = None,
    lead: bool = True,
    seed: int = 0,
) -> Written:
    """Up to n accepted variants, sampling at most n * ATTEMPTS_PER_VARIANT of them in batches of the shortfall."""
    if not 1 <= n <= 100:
        raise ValueError(f"n: expected 1..100 variants, got {n}")
    tok = engine.tokenizer
    messages = [
        {"role": "user", "content": PROMPT.format(chars=MAX_CHARS, brand=brief.brand, brief=brief.text)}
    ]
    opening = f"{brief.brand} " if lead else ""
    prompt = render_prompt(messages, tok, prompt_budget(engine.max_len, MAX_TOKENS)).ids + tok.encode(opening)
    banned = Policy({"banned": Category("block", list(brief.banned))}, source="banned words")
    written, seen, attempts = Written([]), set(), 0
    while len(written.accepted) < n and attempts < n * ATTEMPTS_PER_VARIANT:
        batch = min(n - len(written.accepted), n * ATTEMPTS_PER_VARIANT - attempts)
        params = [
            SamplingParams(
                max_tokens=MAX_TOKENS, temperature=TEMPERATURE, top_p=TOP_P, seed=seed + attempts + i
            )
            for i in range(batch)
        ]
        requests = [engine.submit(prompt, p) for p in params]
        attempts += batch
        for request in requests:
            result = request.result()
            text = squeeze(opening + result.text)
            reason = (
                "duplicate: written before"
                if text in seen
                else check(text, result.finish_reason, brief, banned, safety)
            )
            seen.add(text)
            ok = reason == "ok"
            written.variants.append(Variant(text, ok, reason))
            if ok and len(written.accepted) < n:
                written.accepted.append(text)
            elif not ok:
                written.rejected[reason.split(":")[0]] += 1
    return written
