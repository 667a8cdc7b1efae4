"""The ad server put together from files, as `myna ads match`, `myna serve --ads` and bench/ads.py open it, and a
match request read from JSON (the server's body, or the command's flags in the same shape).

    {"kind": "post" | "query" | "user" | "feed",   (default "post")
     "text": "..."  or  "texts": ["...", ...],      (one for a post or a query; a user's recent posts; a feed's posts)
     "slot": N,                                      (feed: the ad goes before feed position N; judged with the
                                                      posts around it, myna/ads/safety.py ADJACENT_POSTS a side)
     "lang": "en", "user": "u123", "time": "2026-12-07T10:00:00Z", "record": false}

`record` logs the winner's impression (the response then carries its id, for a click).
"""

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from myna.ads.inventory import load_inventory
from myna.ads.log import AdLog
from myna.ads.match import CONTEXT_KINDS, BrandSafetyCheck, Context, Matcher
from myna.ads.safety import ADJACENT_POSTS, BrandSafety, judge
from myna.search.index import Embedder

MATCH_FIELDS = {"kind", "text", "texts", "slot", "lang", "user", "time", "record"}


@dataclass
class Request:
    context: Context
    record: bool


def open_matcher(
    inventory: str | Path,
    embedder: Embedder,
    log: str | Path,
    policy: str | Path | None = None,
    cache: str | Path | None = None,
) -> Matcher:
    """The inventory (validated whole), its ads embedded by the model (read from `cache` when the same inventory
    and weights were embedded before), brand safety under `policy` (default: the IAB categories) on the same model,
    and the impression log folder `log`."""
    inv = load_inventory(inventory)
    safety = BrandSafety.load(policy, embedder=embedder)
    return Matcher(inv, embedder, BrandSafetyCheck(safety.score, judge), AdLog(log), cache)


def match_request(body: dict) -> Request:
    """A match request's JSON, checked; ValueError names the field."""
    unknown = set(body) - MATCH_FIELDS
    if unknown:
        raise ValueError(f"unknown field {sorted(unknown)[0]!r}; expected {', '.join(sorted(MATCH_FIELDS))}")
    kind = body.get("kind", "post")
    if kind not in CONTEXT_KINDS:
        raise ValueError(f"kind: expected one of {', '.join(CONTEXT_KINDS)}, got {kind!r}")
    if ("text" in body) == ("texts" in body):
        raise ValueError(
            'give "text" (one post or query) or "texts" (a user\'s posts, a feed), not both or neither'
        )
    texts = [body["text"]] if "text" in body else body["texts"]
    if not isinstance(texts, list):
        raise ValueError("texts: expected a list of strings")
    slot = body.get("slot")
    if slot is not None:
        if (
            kind != "feed"
            or isinstance(slot, bool)
            or not isinstance(slot, int)
            or not 0 <= slot <= len(texts)
        ):
            raise ValueError(f"slot: a feed position 0..{len(texts)} (kind feed only), got {slot!r}")
        # an ad in a feed is seen with the posts around it, not the whole feed
        texts = texts[max(0, slot - ADJACENT_POSTS) : slot + ADJACENT_POSTS]
        if not texts:
            raise ValueError("slot: the feed has no posts around the slot")
    when = body.get("time")
    if when is None:
        at = datetime.now(UTC)
    else:
        try:
            at = datetime.fromisoformat(when) if isinstance(when, str) else None
        except ValueError:
            at = None
        if at is None or at.tzinfo is None:
            raise ValueError(
                f"time: expected ISO-8601 with a UTC offset, e.g. 2026-12-07T10:00:00Z, got {when!r}"
            )
    record = body.get("record", False)
    if not isinstance(record, bool):
        raise ValueError(f"record: expected true or false, got {record!r}")
    return Request(Context(kind, tuple(texts), body.get("lang"), body.get("user"), at), record)


def match(matcher: Matcher, request: Request) -> dict:
    """The match result as JSON, with the impression id when the winner was recorded."""
    result = matcher.match(request.context)
    out = result.to_dict()
    if request.record and result.winner is not None:
        out["impression_id"] = matcher.record_impression(result)
    return out
