"""Moderation: an open policy the operator sets, applied to requests and replies, always reported.

Nothing about moderation lives in the model's weights. A `Policy` names categories (hate, sexual, scam, ...), and
for each an action: "allow" (not checked), "label" (reported in the response) or "block" (a request is refused
before generation; a reply is withheld). A category is a list of keyword terms (and, for what terms can't express,
regular expressions), and may add model-based rules: example phrases matched by embedding similarity, and a
classifier folder (myna/eval/classify.py) whose label probability is a score. Model-based rules need a model:
`Policy.bind(embedder)` after it loads; they are scored (myna/safety.py) on complete texts only, so the stream
guard stays keyword-only. The same file serves brand safety (myna/ads/safety.py), which reads the per-category
"tiers" that moderation ignores. Whatever the policy does is reported: a `Verdict` says which categories
triggered, on which terms or rules, with what action, and a blocked request or reply carries a message that names
the category.

How terms match (precision first: a label that fires on "class" for "ass" is noise):
- Text is NFKC-normalised and casefolded (so fullwidth and "mathematical bold" letters match plain ones), and
  invisible format characters (zero-width space, soft hyphen, ...) are dropped.
- Whole words only: the text is cut into words of letters, digits and the leet symbols @ and $; a term matches a
  run of whole words, whatever punctuation or spaces separate them. @mentions and URLs are never matched and break
  a phrase. Scripts written without spaces (Chinese, Japanese, Thai) need `patterns`.
- Leetspeak: in a word that has at least one letter, 0 1 3 4 5 7 @ $ read as o i e a s t a s ("h4te", "$hit");
  a word of digits only stays a number ("455" is not "ass"). "1" for "l" is not read.
- Elongation: a letter written three or more times matches however many times the term has it ("haaate" is
  "hate", "killll" is "kill"); a doubled letter does not stand for a single one ("good" is not "god"), since
  English doubles letters but does not triple them.
- Not handled, on purpose or for now: look-alike letters from other scripts, spaced-out letters ("h a t e"),
  masked letters ("f*ck"), words run together in hashtags.

Matching is a dictionary lookup per word and phrase, so its speed does not depend on how many terms a policy has.
"""

import json
import re
import tomllib
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path

ACTIONS = ("allow", "label", "block")  # in order of strictness
DEFAULT_KEYWORDS = Path(__file__).with_name("moderation_keywords.json")
MAX_POLICY_BYTES = 16 << 20  # keyword lists of every category, with room to spare
# brand safety's tiers, most severe first; "low" is what no threshold reaches
TIER_NAMES = ("floor", "high", "medium")
RUN_PREFIX = "run:"  # a classifier path under the run the policy is bound to, not beside the policy file
_CATEGORY_FIELDS = (
    "action",
    "terms",
    "patterns",
    "keyword_score",
    "examples",
    "similarity",
    "classifier",
    "label",
    "threshold",
    "tiers",
)
DEFAULT_REFUSAL = (
    "This request was not answered: it falls under this server's moderation policy ({categories})."
)
DEFAULT_WITHHELD = "This reply was withheld: it falls under this server's moderation policy ({categories})."

_CATEGORY_NAME = re.compile(r"[a-z][a-z0-9_]*")
_INVISIBLE = re.compile("[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
# A token is a URL or @mention (skipped: names and addresses are not speech) or a word; @ and $ may stand inside
# a word as leetspeak letters.
_TOKEN = re.compile(r"(?P<skip>https?://\S+|www\.\S+|@\w+)|(?P<word>[\w@$]+)")
_WORD_CHAR = re.compile(r"[\w@$]")
_LETTER = re.compile(r"[^\W\d_]")
_LEET = str.maketrans("013457@$", "oieastas")
_REPEATS = re.compile(r"(.)\1+")
_RUN = re.compile(r"(.)\1*")
_ELONGATED = 3  # a letter written this many times or more matches any count of it


def normalize(text: str) -> str:
    """The text that terms and patterns are matched against: NFKC, casefolded, invisible characters dropped."""
    return _INVISIBLE.sub("", unicodedata.normalize("NFKC", text).casefold())


def _words(norm: str, complete: bool = True) -> list[str | None]:
    """Normalised text -> its words with leetspeak read as letters; None where a URL or @mention breaks a phrase.

    With complete=False the text may still grow, so a token that runs to its very end is left out: "kill" could
    become "killer"."""
    out: list[str | None] = []
    for m in _TOKEN.finditer(norm):
        if not complete and m.end() == len(norm):
            break
        word = m.group("word")
        if word is None:
            out.append(None)
        elif word.isalpha() or not _LETTER.search(word):
            out.append(word)
        else:
            out.append(word.translate(_LEET))
    return out


def _runs(word: str) -> tuple[int, ...]:
    """How many times each letter of the word is written in a row: "kill" -> (1, 1, 2)."""
    return tuple(len(m.group()) for m in _RUN.finditer(word))


def _fits(term_runs: tuple[tuple[int, ...], ...], words: list[str]) -> bool:
    """Words already equal to the term up to repeated letters: do the repeats fit (exact, or elongated)?"""
    return all(
        c == t or c >= _ELONGATED
        for runs, word in zip(term_runs, words, strict=True)
        for t, c in zip(runs, _runs(word), strict=True)
    )


@dataclass
class Category:
    action: str = "label"
    terms: list[str] = field(default_factory=list)  # words or phrases, matched as whole words
    patterns: list[str] = field(default_factory=list)  # regular expressions, searched in the normalised text
    # the score a term or pattern match gives: a mention may be a milder tier than a model's confident call
    keyword_score: float = 1.0
    examples: list[str] = field(default_factory=list)  # phrases whose embedding a text's is compared with
    similarity: float | None = None  # the cosine at which an example match scores 0.5 (fires)
    classifier: str | None = None  # a classifier folder: absolute, or "run:" + a path inside the bound run
    label: str | None = None  # the classifier label whose probability is the score
    threshold: float = 0.5  # a model score at or above this triggers the category in moderation
    tiers: dict[str, float] = field(default_factory=dict)  # brand safety: tier name -> lowest score in it

    @property
    def model_based(self) -> bool:
        return bool(self.examples or self.classifier)


@dataclass
class CategoryHit:
    category: str
    action: str
    matches: list[str]  # the policy's terms (or patterns) that matched, in the order first seen


@dataclass
class Verdict:
    action: str = "allow"  # the strictest action among the triggered categories
    categories: list[CategoryHit] = field(default_factory=list)  # in the policy's order

    @property
    def blocked(self) -> bool:
        return self.action == "block"

    def names(self, action: str | None = None) -> list[str]:
        """The triggered categories, or only those with the given action."""
        return [h.category for h in self.categories if action is None or h.action == action]

    def to_dict(self) -> dict:
        return {
            "action": self.action,
            "categories": [
                {"category": h.category, "action": h.action, "matches": list(h.matches)}
                for h in self.categories
            ],
        }


@dataclass
class _Entry:  # one compiled term in the lookup index
    category: str
    term: str
    runs: tuple[tuple[int, ...], ...]  # per word of the term


@dataclass
class Policy:
    """Per category an action and what to look for, plus the messages shown when something is blocked.

    Build a new Policy to change one: the lookup index is compiled once, at construction."""

    categories: dict[str, Category] = field(default_factory=dict)
    refusal: str = (
        DEFAULT_REFUSAL  # shown instead of an answer to a blocked request; {categories} is filled in
    )
    withheld: str = DEFAULT_WITHHELD  # shown instead of a blocked reply
    source: str = "<policy>"  # where it came from, named in errors
    # what scores the model-based categories once `bind` gave it a model (a myna.safety.Scorer)
    scorer: object | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index: dict[str, list[_Entry]] = {}  # squeezed words joined by " " -> the terms that read so
        self._prefixes: set[str] = (
            set()
        )  # every leading run of words of an index key, to stop phrase lookups early
        self._patterns: dict[str, list[re.Pattern]] = {}
        self._max_words = 1
        self.block_words = 1  # the longest block term, in words: how much text a stream must hold back
        for name, cat in self.categories.items():
            where = f"{self.source}: categories.{name}"
            if not isinstance(name, str) or not _CATEGORY_NAME.fullmatch(name):
                raise ValueError(
                    f"{where}: a category name is lower-case letters, digits and _, got {name!r}"
                )
            if cat.action not in ACTIONS:
                raise ValueError(f"{where}.action: expected one of {', '.join(ACTIONS)}, got {cat.action!r}")
            for i, term in enumerate(cat.terms):
                n = self._add_term(name, term, f"{where}.terms[{i}]")
                self._max_words = max(self._max_words, n)
                if cat.action == "block":
                    self.block_words = max(self.block_words, n)
            self._patterns[name] = [_compile(p, f"{where}.patterns[{i}]") for i, p in enumerate(cat.patterns)]
        for key in ("refusal", "withheld"):
            template = getattr(self, key)
            try:
                template.format(categories="hate")
            except (KeyError, IndexError, ValueError, AttributeError) as e:
                raise ValueError(
                    f"{self.source}: {key}: a message with at most a {{categories}} placeholder, got {template!r}"
                ) from e

    def _add_term(self, category: str, term: str, where: str) -> int:
        words = _term_words(term, where)
        squeezed = [_REPEATS.sub(r"\1", w) for w in words]
        key = " ".join(squeezed)
        self._index.setdefault(key, []).append(_Entry(category, term, tuple(_runs(w) for w in words)))
        for n in range(1, len(squeezed) + 1):
            self._prefixes.add(" ".join(squeezed[:n]))
        return len(words)

    def bind(self, embedder) -> None:
        """Score the model-based categories with this model (a myna.search.index.Embedder) from now on: their
        examples are embedded now, and a classifier folder that is missing or broken raises here, naming it."""
        from myna.safety import Scorer

        self.scorer = Scorer(self, embedder)

    @property
    def model_categories(self) -> list[str]:
        return [n for n, c in self.categories.items() if c.model_based]

    # -- building ------------------------------------------------------------------------------------------------

    @classmethod
    def default(cls) -> "Policy":
        """Myna's default categories and keyword lists (moderation_keywords.json), every one set to "label"."""
        return cls.load(DEFAULT_KEYWORDS)

    @classmethod
    def off(cls) -> "Policy":
        """Nothing is checked: every verdict is "allow"."""
        return cls(source="off")

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        """An operator's policy file, JSON or (by a .toml suffix) TOML:

            {"extends": "default",                       # or "none": start from no categories
             "categories": {"hate": {"action": "block"},  # change a default category's action
                            "sexual": {"terms": ["..."]}, # add terms (or patterns) to a default category
                            "brand": {"action": "label", "terms": ["rival inc"], "patterns": ["rival\\\\.com"]}},
             "refusal": "...{categories}...", "withheld": "...{categories}..."}

        A category the base policy lacks must bring terms, patterns, examples or a classifier; its action defaults
        to "label". The scoring fields a category may add are listed under `from_dict`."""
        path = Path(path)
        if (size := path.stat().st_size) > MAX_POLICY_BYTES:
            raise ValueError(f"{path}: {size:,} bytes, over the {MAX_POLICY_BYTES:,} a policy file may be")
        raw = path.read_bytes()
        try:
            data = tomllib.loads(raw.decode("utf-8")) if path.suffix == ".toml" else json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            kind = "TOML" if path.suffix == ".toml" else "JSON"
            raise ValueError(f"{path}: not valid {kind}: {e}") from e
        return cls.from_dict(data, source=str(path), base=path.parent)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<policy>", base: Path | None = None) -> "Policy":
        """A policy from the file format described in `load`; a classifier path is relative to `base` (the policy
        file's folder; by default the working directory).

        Scoring fields of a category, all optional:
            "keyword_score": 1.0                              # the score a term or pattern match gives
            "examples": ["phrase", ...], "similarity": 0.9   # cosine to the nearest example at which it fires
            "classifier": "path/or/run:path", "label": "1"     # that label's calibrated probability is the score
            "threshold": 0.5                                  # the score at which moderation triggers it
            "tiers": {"floor": 0.9, "high": 0.7, "medium": 0.5}  # brand safety: the lowest score of each tier
        A category's model fields replace the base policy's; its examples, like its terms, add to them."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected an object at the top, got {type(data).__name__}")
        unknown = set(data) - {"about", "extends", "categories", "refusal", "withheld"}
        if unknown:
            raise ValueError(
                f"{source}: unknown field {sorted(unknown)[0]!r}; expected about, extends, categories, refusal, "
                "withheld"
            )
        extends = data.get("extends", "default")
        if extends not in ("default", "none"):
            raise ValueError(f"{source}: extends: expected 'default' or 'none', got {extends!r}")
        base_policy = cls.default() if extends == "default" else cls()
        categories = {
            name: replace(
                c,
                terms=list(c.terms),
                patterns=list(c.patterns),
                examples=list(c.examples),
                tiers=dict(c.tiers),
            )
            for name, c in base_policy.categories.items()
        }
        given = data.get("categories", {})
        if not isinstance(given, dict):
            raise ValueError(
                f"{source}: categories: expected an object of categories, got {type(given).__name__}"
            )
        for name, spec in given.items():
            where = f"{source}: categories.{name}"
            if not isinstance(spec, dict):
                raise ValueError(f"{where}: expected an object with action, terms, patterns")
            unknown = set(spec) - set(_CATEGORY_FIELDS)
            if unknown:
                raise ValueError(
                    f"{where}: unknown field {sorted(unknown)[0]!r}; expected {', '.join(_CATEGORY_FIELDS)}"
                )
            for key in ("terms", "patterns", "examples"):
                if not isinstance(spec.get(key, []), list):
                    raise ValueError(f"{where}.{key}: expected a list of strings")
            for i, term in enumerate(
                spec.get("terms", [])
            ):  # errors numbered as in this file, not the merged list
                _term_words(term, f"{where}.terms[{i}]")
            for i, pattern in enumerate(spec.get("patterns", [])):
                _compile(pattern, f"{where}.patterns[{i}]")
            model = _model_fields(spec, where, base or Path.cwd())
            if name not in categories:
                if not any(spec.get(k) for k in ("terms", "patterns", "examples", "classifier")):
                    known = ", ".join(categories) or "none"
                    raise ValueError(
                        f"{where}: unknown category (known: {known}); a new category needs terms, patterns, "
                        "examples or a classifier"
                    )
                categories[name] = Category()
            cat = categories[name]
            cat.action = spec.get("action", cat.action)
            cat.terms += spec.get("terms", [])
            cat.patterns += spec.get("patterns", [])
            cat.examples += model.pop("examples", [])
            for key, value in model.items():
                setattr(cat, key, value)
            if cat.examples and cat.similarity is None:
                raise ValueError(
                    f"{where}.similarity: required with examples (the cosine at which one fires)"
                )
            if cat.classifier and cat.label is None:
                raise ValueError(
                    f"{where}.label: required with a classifier (whose probability is the score)"
                )
        for key in ("refusal", "withheld"):
            if key in data and not isinstance(data[key], str):
                raise ValueError(f"{source}: {key}: expected a string, got {type(data[key]).__name__}")
        return cls(
            categories,
            refusal=data.get("refusal", base_policy.refusal),
            withheld=data.get("withheld", base_policy.withheld),
            source=source,
        )

    def to_dict(self) -> dict:
        """The whole policy in the file format (standalone: extends "none"), e.g. to publish it or to edit it."""
        return {
            "extends": "none",
            "categories": {name: _category_dict(c) for name, c in self.categories.items()},
            "refusal": self.refusal,
            "withheld": self.withheld,
        }

    # -- checking ------------------------------------------------------------------------------------------------

    def check(self, text: str) -> Verdict:
        """Every category that is not "allow", against the whole text: keywords, and the model-based rules of a
        bound policy (an unbound policy with model-based categories raises: they are never silently passed)."""
        checked = {n for n, c in self.categories.items() if c.action != "allow"}
        verdict = self.scan(text, checked)
        model = [n for n in self.model_categories if n in checked]
        if not model:
            return verdict
        if self.scorer is None:
            raise RuntimeError(
                f"{self.source}: categories {', '.join(model)} are model-based; bind the policy to a model "
                "(Policy.bind) before checking text"
            )
        found = {h.category: h.matches for h in verdict.categories}
        for name, (score, rule) in self.scorer.model_scores([text])[0].items():
            if name in model and score >= self.categories[name].threshold:
                found.setdefault(name, []).append(rule)
        hits = [CategoryHit(n, c.action, found[n]) for n, c in self.categories.items() if n in found]
        return Verdict(max((h.action for h in hits), key=ACTIONS.index, default="allow"), hits)

    def scan(self, text: str, categories: set[str], complete: bool = True) -> Verdict:
        """The named categories against the text; complete=False ignores a word still being written at its end."""
        if not categories:
            return Verdict()
        norm = normalize(text)
        found: dict[str, list[str]] = {}
        words = _words(norm, complete)
        squeezed = [None if w is None else _REPEATS.sub(r"\1", w) for w in words]
        for i in range(len(words)):
            key = None
            for j in range(i, min(i + self._max_words, len(words))):
                if squeezed[j] is None:
                    break
                key = squeezed[j] if key is None else f"{key} {squeezed[j]}"
                if key not in self._prefixes:
                    break
                for e in self._index.get(key, ()):
                    if e.category in categories and _fits(e.runs, words[i : j + 1]):
                        hits = found.setdefault(e.category, [])
                        if e.term not in hits:
                            hits.append(e.term)
        for name in categories:
            for p in self._patterns[name]:
                if any(complete or m.end() < len(norm) for m in p.finditer(norm)):
                    found.setdefault(name, []).append(p.pattern)
        hits = [CategoryHit(n, c.action, found[n]) for n, c in self.categories.items() if n in found]
        action = max((h.action for h in hits), key=ACTIONS.index, default="allow")
        return Verdict(action, hits)


def _model_fields(spec: dict, where: str, base: Path) -> dict:
    """The model-based fields a category spec gives, checked, with the classifier path resolved against base."""
    out: dict = {}
    if "examples" in spec:
        for i, example in enumerate(spec["examples"]):
            if not isinstance(example, str) or not example.strip():
                raise ValueError(f"{where}.examples[{i}]: expected a non-empty string, got {example!r}")
        out["examples"] = list(spec["examples"])
    for key in ("keyword_score", "similarity", "threshold"):
        if key in spec:
            out[key] = _unit(spec[key], f"{where}.{key}")
    if "classifier" in spec:
        path = spec["classifier"]
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"{where}.classifier: expected a folder path, got {path!r}")
        out["classifier"] = path if path.startswith(RUN_PREFIX) else str((base / path).resolve())
    if "label" in spec:
        label = spec["label"]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise ValueError(f"{where}.label: expected a label name or id, got {label!r}")
        out["label"] = str(label)
    if "tiers" in spec:
        tiers = spec["tiers"]
        if not isinstance(tiers, dict) or not tiers:
            raise ValueError(f"{where}.tiers: expected an object of {', '.join(TIER_NAMES)} -> lowest score")
        for name in tiers:
            if name not in TIER_NAMES:
                raise ValueError(f"{where}.tiers: unknown tier {name!r}; expected {', '.join(TIER_NAMES)}")
        out["tiers"] = {t: _unit(tiers[t], f"{where}.tiers.{t}") for t in TIER_NAMES if t in tiers}
        # a more severe tier must need at least the score of a milder one
        values = list(out["tiers"].values())
        if values != sorted(values, reverse=True):
            raise ValueError(f"{where}.tiers: floor >= high >= medium, got {tiers}")
    return out


def _unit(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{where}: expected a number in (0, 1], got {value!r}")
    return float(value)


def _category_dict(c: Category) -> dict:
    """A category in the file format: its keyword fields always, its model-based fields where set."""
    out: dict = {"action": c.action, "terms": list(c.terms), "patterns": list(c.patterns)}
    if c.keyword_score != 1.0:
        out["keyword_score"] = c.keyword_score
    if c.examples:
        out |= {"examples": list(c.examples), "similarity": c.similarity}
    if c.classifier:
        out |= {"classifier": c.classifier, "label": c.label}
    if c.model_based:
        out["threshold"] = c.threshold
    if c.tiers:
        out["tiers"] = dict(c.tiers)
    return out


def _term_words(term: str, where: str) -> list[str]:
    if not isinstance(term, str):
        raise ValueError(f"{where}: expected a string, got {type(term).__name__}")
    words = _words(normalize(term))
    if not words or None in words:
        raise ValueError(f"{where}: {term!r} has no words to match (URLs and @mentions are never matched)")
    return words


def _compile(pattern: str, where: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise ValueError(f"{where}: expected a string, got {type(pattern).__name__}")
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise ValueError(f"{where}: bad regular expression {pattern!r}: {e}") from e


# -- applying a policy to one exchange -------------------------------------------------------------------------------


def _message(template: str, verdict: Verdict) -> str:
    return template.format(categories=", ".join(verdict.names("block")))


@dataclass
class Report:
    """What moderation did to one request and its reply; `to_dict()` goes into the API response as is."""

    action: str  # the strictest of the two verdicts
    blocked: (
        str | None
    )  # "input": refused before generation; "output": the reply withheld; None: nothing blocked
    message: str | None  # the refusal or withheld notice, shown in place of the reply; None unless blocked
    input: Verdict
    output: Verdict | None  # None when there is no reply (not generated yet, or the request was blocked)

    def to_dict(self) -> dict:
        return {
            "action": self.action,
            "blocked": self.blocked,
            "message": self.message,
            "input": self.input.to_dict(),
            "output": None if self.output is None else self.output.to_dict(),
        }


def moderate_exchange(policy: Policy, prompt_text: str, completion_text: str | None = None) -> Report:
    """Check a request, and its reply once there is one.

    Call it with the prompt alone before generating: if `blocked == "input"`, do not generate and send `message`.
    Call it again with the whole reply: if `blocked == "output"`, send `message` instead of the reply. Labels pass
    through in the report. prompt_text is what the user wrote (in a chat, the new user turn: earlier turns were
    checked when they were sent; the system prompt is the operator's own)."""
    inp = policy.check(prompt_text)
    if inp.blocked:
        return Report("block", "input", _message(policy.refusal, inp), inp, None)
    if completion_text is None:
        return Report(inp.action, None, None, inp, None)
    out = policy.check(completion_text)
    if out.blocked:
        return Report("block", "output", _message(policy.withheld, out), inp, out)
    action = max(inp.action, out.action, key=ACTIONS.index)
    return Report(action, None, None, inp, out)


class StreamGuard:
    """Lets a streamed reply out no faster than the policy can vouch for it.

    A block term is only known complete once the word after it starts ("kill" may become "killer"), and a phrase
    only once its last word is there, so the guard holds back the last `policy.block_words` words:

        guard = StreamGuard(policy)
        for delta in request:
            send(guard.feed(delta))
            if guard.blocked: request.cancel(); break
        else:
            send(guard.finish())
        report = moderate_exchange(policy, prompt, guard.text)   # the full verdict, and the withheld notice

    Once `blocked` is set, nothing more is released: the held-back words, which hold the block term, and all later
    text are withheld. A regular expression that spans more words than are held back is only caught by the
    report's check of the whole reply, after the text was sent. Text without spaces (Chinese, Japanese) is one
    long word to the guard: with block categories set, it comes out only at `finish`."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.text = ""  # everything fed so far
        self.sent = 0  # how much of it was released
        self.blocked: Verdict | None = None
        self._block = {n for n, c in policy.categories.items() if c.action == "block"}

    def feed(self, delta: str) -> str:
        """Add a delta of the reply; returns the text that is now safe to send (often "")."""
        self.text += delta
        if not self._block:  # nothing to hold back for
            out, self.sent = self.text[self.sent :], len(self.text)
            return out
        if self.blocked or not self._check(complete=False):
            return ""
        held = self.text[self.sent :]
        starts = [m.start() for m in re.finditer(r"\S+", held)]
        if len(starts) <= self.policy.block_words:
            return ""
        cut = self.sent + starts[-self.policy.block_words]
        out, self.sent = self.text[self.sent : cut], cut
        return out

    def finish(self) -> str:
        """The reply is complete: returns the rest of the text, unless it completes a block term."""
        if self.blocked or not self._check(complete=True):
            return ""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out

    def _check(self, complete: bool) -> bool:
        """Checks the held-back text for block terms; False (and `blocked` set) when one is there."""
        verdict = self.policy.scan(self.text[self.sent :], self._block, complete)
        if verdict.blocked:
            self.blocked = verdict
        return not verdict.blocked
