"""The ads inventory: campaigns and their ads, one JSON object a line, validated whole before anything is used.

Two kinds of lines. A campaign holds what is bought and how: the bid, the daily budget, the schedule, who may see
it (languages, topics), how often (frequency cap) and next to what (excluded categories, suitability). An ad is
one creative of a campaign: the text shown, the link, the keywords it matches. A campaign's budget, cap and
bid cover all its ads, as in the ad platforms people know.

    {"kind": "campaign", "id": "brewhaus-autumn", "advertiser": "Brewhaus Coffee (fictional)",
     "bid_type": "cpc", "bid": 0.45, "daily_budget": 40, "start": "2026-01-01T00:00:00Z",
     "end": "2027-01-01T00:00:00Z", "frequency_cap": 3, "languages": ["en"], "target_topics": ["coffee"],
     "excluded_categories": ["death_and_conflict"], "suitability": "standard"}
    {"kind": "ad", "id": "brewhaus-1", "campaign": "brewhaus-autumn",
     "text": "Fresh beans, roasted Monday, at your door by Wednesday.", "url": "https://brewhaus.example/beans",
     "keywords": ["coffee", "espresso", "cold brew"]}

(each record on one line in the file). Campaign fields:

    id, advertiser        required; ids are 1-64 of A-Z a-z 0-9 . _ : - and unique among campaigns
    bid_type, bid         "cpm" (bid per 1000 impressions) or "cpc" (bid per click), in CURRENCY
    daily_budget          CURRENCY a UTC day; spend is paced over the day (match.py)
    start, end            ISO-8601 with a UTC offset ("Z" or "+02:00"); end after start
    frequency_cap         optional: impressions a user may see from the campaign a UTC day (absent: no cap)
    languages             optional: ISO 639-1 codes the context must be in (absent or []: any language)
    target_topics         optional: words or #hashtags, one of which the context must mention (absent: any)
    excluded_categories   optional: brand-safety categories (CATEGORIES) the context must not score in
    suitability           optional: "conservative", "standard" (default) or "relaxed" (myna/ads/safety.py)

Ad fields: id (unique among ads), campaign (a campaign's id in the same file), text, url (http or https) and
optional keywords (words or phrases; a phrase matches when all its words are in the context).

Amounts are positive with at most MONEY_DECIMALS decimals. Unknown fields are refused (a typo such as "budget"
must not silently mean "no budget"). Every error names the file, the line and the field, up to MAX_ERRORS of them,
raised together as one InventoryError: an inventory is used whole or not at all.
"""

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

from myna.data.readers import iter_lines
from myna.data.schema import Reject
from myna.search.terms import terms

CURRENCY = "USD"  # every amount in an inventory, a log and a match result
MAX_FILE_BYTES = 64 << 20  # about 60k ads of a kilobyte; a larger inventory wants a database, not a file
MAX_LINE_BYTES = 16 << 10  # the longest valid record (280-character text, 50 keywords, 50 topics) is ~8 KiB
MAX_RECORDS = 200_000  # campaigns and ads together: matching holds every ad's vector in memory
MAX_ERRORS = 50  # errors listed before the rest are only counted: a wrong file fails on every line
MONEY_DECIMALS = 4  # hundredths of a cent: finer than any ad platform bills, coarse enough to add up exactly
MAX_BID = 1000.0  # per click or per 1000 impressions; far above any real bid, so it only catches typos
MAX_DAILY_BUDGET = 10_000_000.0
MAX_FREQUENCY_CAP = 1000  # impressions a user a day; a cap above this caps nothing
MAX_TEXT_CHARS = 280  # an ad is shown as a post, so it is as long as a post may be
MAX_ADVERTISER_CHARS = 200
MAX_URL_CHARS = 2048  # the longest URL browsers and crawlers reliably keep
MAX_TERMS = 50  # keywords an ad, topics a campaign
MAX_TERM_CHARS = 64
EARLIEST, LATEST = 2000, 2100  # schedule years outside these are typos

BID_TYPES = ("cpm", "cpc")
SUITABILITY = ("conservative", "standard", "relaxed")
# the categories an ad may exclude: those of the default brand-safety policy (safety.py scores them by these names)
CATEGORIES = tuple(
    json.loads(Path(__file__).with_name("brand_safety.json").read_text(encoding="utf-8"))["categories"]
)
# ISO 639-1, every two-letter code (bh, withdrawn in 2021, is still seen in data and kept)
LANGUAGES = frozenset(
    """aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv cy da de dv dz ee
    el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia id ie ig ii ik io is it
    iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my
    na nb nd ne ng nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn
    so sq sr ss st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo za zh
    zu""".split()
)
_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
CAMPAIGN_FIELDS = {
    "kind",
    "id",
    "advertiser",
    "bid_type",
    "bid",
    "daily_budget",
    "start",
    "end",
    "frequency_cap",
    "languages",
    "target_topics",
    "excluded_categories",
    "suitability",
}
AD_FIELDS = {"kind", "id", "campaign", "text", "url", "keywords"}


@dataclass(frozen=True)
class Campaign:
    id: str
    advertiser: str
    bid_type: str  # "cpm" or "cpc"
    bid: float  # CURRENCY per 1000 impressions (cpm) or per click (cpc)
    daily_budget: float
    start: datetime  # timezone-aware
    end: datetime
    frequency_cap: int | None  # impressions a user a UTC day; None: no cap
    languages: tuple[str, ...]  # empty: any language
    target_topics: tuple[str, ...]  # empty: any topic
    excluded_categories: tuple[str, ...]
    suitability: str
    line: int  # where it was written, for messages


@dataclass(frozen=True)
class Ad:
    id: str
    campaign: str
    text: str
    url: str
    keywords: tuple[str, ...]
    line: int


@dataclass(frozen=True)
class Inventory:
    path: str
    sha256: str  # of the file's bytes: the key of the ads' cached embeddings
    campaigns: dict[str, Campaign]
    ads: tuple[Ad, ...]  # in file order


class InventoryError(ValueError):
    """An inventory that cannot be used; `errors` lists "FILE:LINE: field: what was expected" for each problem."""

    def __init__(self, path: str | Path, errors: list[str], more: int = 0):
        super().__init__(str(path), errors, more)
        self.path, self.errors, self.more = str(path), errors, more

    def __str__(self) -> str:
        head = f"{self.path}: {len(self.errors) + self.more} error(s), nothing loaded"
        tail = [f"... and {self.more} more"] if self.more else []
        return "\n".join([head, *self.errors, *tail])


class _Problem(Exception):
    """One field's problem, raised inside a record's check and collected by load_inventory."""

    def __init__(self, field: str, message: str):
        super().__init__(field, message)
        self.field, self.message = field, message


def load_inventory(path: str | Path) -> Inventory:
    """Read and check a JSONL inventory (gzip and zstd too); InventoryError listing every problem found."""
    path = Path(path)
    sha256 = _file_sha256(path)
    errors: list[str] = []
    more = 0
    campaigns: dict[str, Campaign] = {}
    ads: list[Ad] = []
    ad_ids: set[str] = set()
    broken: set[str] = set()  # ids of campaign lines with errors

    def fail(line: int, message: str) -> None:
        nonlocal more
        if len(errors) < MAX_ERRORS:
            errors.append(f"{path}:{line}: {message}")
        else:
            more += 1

    records = 0
    read_bytes = 0
    for item in iter_lines(str(path), MAX_LINE_BYTES):
        if isinstance(item, Reject):
            fail(item.line, item.reason)
            continue
        line, raw = item
        read_bytes += len(raw) + 1
        if read_bytes > MAX_FILE_BYTES:
            # a compressed inventory is bounded by what it holds, not by its size on disk
            fail(line, f"the inventory holds more than {MAX_FILE_BYTES} bytes")
            break
        if not raw.strip():
            continue
        records += 1
        if records > MAX_RECORDS:
            fail(line, f"more than {MAX_RECORDS} records")
            break
        record = None
        try:
            record = _parse(raw)
            if record.get("kind") == "campaign":
                campaign = _campaign(record, line)
                if campaign.id in campaigns:
                    raise _Problem(
                        "id",
                        f"duplicate campaign id {campaign.id!r} (first on line "
                        f"{campaigns[campaign.id].line})",
                    )
                campaigns[campaign.id] = campaign
            elif record.get("kind") == "ad":
                ad = _ad(record, line)
                if ad.id in ad_ids:
                    raise _Problem("id", f"duplicate ad id {ad.id!r}")
                ad_ids.add(ad.id)
                ads.append(ad)
            else:
                raise _Problem("kind", f'expected "campaign" or "ad", got {_show(record.get("kind"))}')
        except _Problem as p:
            fail(line, f"{p.field}: {p.message}")
            if record is not None and record.get("kind") == "campaign" and isinstance(record.get("id"), str):
                # its ads are not reported again as pointing nowhere
                broken.add(record["id"])
    # an ad may come before its campaign in the file, so references are checked once all lines are read
    for ad in ads:
        if ad.campaign not in campaigns and ad.campaign not in broken:
            fail(ad.line, f"campaign: no campaign with id {ad.campaign!r} in the file")
    if not errors and not ads:
        fail(1, "no ads: an inventory needs at least one ad line")
    if errors:
        raise InventoryError(path, errors, more)
    return Inventory(str(path), sha256, campaigns, tuple(ads))


def _file_sha256(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise InventoryError(path, [f"{path}: {size} bytes; at most {MAX_FILE_BYTES} are read"])
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        raise InventoryError(path, [f"{path}: cannot read: {e.strerror or e}"]) from None
    return h.hexdigest()


def _parse(raw: bytes) -> dict:
    try:
        # Decimal keeps an amount's written digits, so "0.12345" is caught as five decimals, not rounded
        record = json.loads(raw, parse_float=Decimal, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise _Problem("line", f"not a JSON object ({e})") from None
    if not isinstance(record, dict):
        raise _Problem("line", f"expected a JSON object, got {type(record).__name__}")
    return record


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def _campaign(r: dict, line: int) -> Campaign:
    _known_fields(r, CAMPAIGN_FIELDS)
    start, end = _time(r, "start"), _time(r, "end")
    if end <= start:
        raise _Problem("end", f"{r['end']!r} is not after start {r['start']!r}")
    bid_type = _choice(r, "bid_type", BID_TYPES)
    cap = r.get("frequency_cap")
    if cap is not None and (type(cap) is not int or not 1 <= cap <= MAX_FREQUENCY_CAP):
        raise _Problem("frequency_cap", f"expected a whole number 1..{MAX_FREQUENCY_CAP}, got {_show(cap)}")
    languages = _list(r, "languages", lambda v: v in LANGUAGES, 'ISO 639-1 codes such as "en"')
    excluded = _list(r, "excluded_categories", lambda v: v in CATEGORIES, f"categories among {CATEGORIES}")
    return Campaign(
        id=_id(r, "id"),
        advertiser=_text(r, "advertiser", MAX_ADVERTISER_CHARS),
        bid_type=bid_type,
        bid=_money(r, "bid", MAX_BID),
        daily_budget=_money(r, "daily_budget", MAX_DAILY_BUDGET),
        start=start,
        end=end,
        frequency_cap=cap,
        languages=languages,
        target_topics=_list(
            r, "target_topics", _has_terms, f"words or #hashtags of 1-{MAX_TERM_CHARS} chars"
        ),
        excluded_categories=excluded,
        suitability=_choice(r, "suitability", SUITABILITY) if "suitability" in r else "standard",
        line=line,
    )


def _ad(r: dict, line: int) -> Ad:
    _known_fields(r, AD_FIELDS)
    return Ad(
        id=_id(r, "id"),
        campaign=_id(r, "campaign"),
        text=_text(r, "text", MAX_TEXT_CHARS),
        url=_url(r),
        keywords=_list(r, "keywords", _has_terms, f"words or phrases of 1-{MAX_TERM_CHARS} chars"),
        line=line,
    )


def _known_fields(r: dict, allowed: set[str]) -> None:
    unknown = sorted(set(r) - allowed)
    if unknown:
        raise _Problem(unknown[0], f"unknown field for a {r['kind']} (expected some of {sorted(allowed)})")


def _required(r: dict, field: str) -> object:
    if field not in r or r[field] is None:
        raise _Problem(field, "required")
    return r[field]


def _id(r: dict, field: str) -> str:
    value = _required(r, field)
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise _Problem(field, f"expected 1-64 of A-Z a-z 0-9 . _ : -, got {_show(value)}")
    return value


def _text(r: dict, field: str, limit: int) -> str:
    value = _required(r, field)
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise _Problem(
            field, f"expected a non-empty string of at most {limit} characters, got {_show(value)}"
        )
    return value.strip()


def _choice(r: dict, field: str, options: tuple[str, ...]) -> str:
    value = _required(r, field)
    if value not in options:
        raise _Problem(field, f"expected one of {', '.join(map(repr, options))}, got {_show(value)}")
    return value


def _money(r: dict, field: str, limit: float) -> float:
    value = _required(r, field)
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise _Problem(field, f"expected a number, got {_show(value)}")
    exponent = Decimal(value).as_tuple().exponent
    if not 0 < value <= limit or (isinstance(exponent, int) and -exponent > MONEY_DECIMALS):
        raise _Problem(
            field,
            f"expected a positive amount of at most {limit:,.0f} with at most {MONEY_DECIMALS} "
            f"decimals, got {value}",
        )
    return float(value)


def _time(r: dict, field: str) -> datetime:
    value = _required(r, field)
    expected = "an ISO-8601 time with a UTC offset, like 2026-01-31T00:00:00Z"
    if not isinstance(value, str):
        raise _Problem(field, f"expected {expected}, got {_show(value)}")
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise _Problem(field, f"expected {expected}, got {value!r}") from None
    if t.tzinfo is None:
        raise _Problem(field, f"{value!r} has no UTC offset: add Z or +HH:MM")
    if not EARLIEST <= t.year < LATEST:
        raise _Problem(field, f"{value!r}: expected a year in {EARLIEST}..{LATEST - 1}")
    return t


def _url(r: dict) -> str:
    value = _required(r, "url")
    expected = f"an http(s) URL of at most {MAX_URL_CHARS} characters"
    if not isinstance(value, str) or len(value) > MAX_URL_CHARS or any(c.isspace() for c in value):
        raise _Problem("url", f"expected {expected}, got {_show(value)}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Problem("url", f"expected {expected}, got {value!r}")
    return value


def _has_terms(value: str) -> bool:
    return 0 < len(value) <= MAX_TERM_CHARS and bool(terms(value))


def _list(r: dict, field: str, valid, expected: str) -> tuple[str, ...]:
    value = r.get(field)
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_TERMS:
        raise _Problem(field, f"expected a list of at most {MAX_TERMS} {expected}, got {_show(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not valid(item):
            raise _Problem(f"{field}[{i}]", f"expected {expected}, got {_show(item)}")
    if len(set(value)) < len(value):
        raise _Problem(field, "lists an entry twice")
    return tuple(value)


def _show(value: object) -> str:
    """A value for a message: its JSON, cut short (a whole bad record is never echoed)."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
