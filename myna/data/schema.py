"""The one Post record every reader produces and every later stage reads.

A post travels as a plain dict with exactly the keys of POST_SCHEMA (dicts are cheap to build in
readers and convert to Arrow in one call). Records that cannot become a Post become a Reject.
"""

import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import pyarrow as pa

POST_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # the platform's id, or "<file stem>:<line>" when absent
        pa.field("author_id", pa.string()),
        pa.field("author_name", pa.string()),  # screen name without '@', where the source gives it
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
        pa.field("text", pa.string(), nullable=False),  # full, untruncated, HTML entities unescaped
        pa.field("lang", pa.string()),  # as the source states it (ISO 639-1, "und" when unknown)
        pa.field("conversation_id", pa.string()),
        pa.field("in_reply_to_id", pa.string()),
        pa.field("quoted_id", pa.string()),
        pa.field("repost_of_id", pa.string()),
        pa.field("like_count", pa.int64()),
        pa.field("repost_count", pa.int64()),
        pa.field("reply_count", pa.int64()),
        pa.field("quote_count", pa.int64()),
        pa.field("hashtags", pa.list_(pa.string())),  # without '#'
        pa.field("mentions", pa.list_(pa.string())),  # screen names without '@'
        pa.field("urls", pa.list_(pa.string())),  # expanded where the source gives it
        pa.field("source", pa.string(), nullable=False),  # "path:line" the record came from
    ]
)
POST_FIELDS = tuple(POST_SCHEMA.names)
_LIST_FIELDS = ("hashtags", "mentions", "urls")


def new_post(id: str, text: str, source: str, **fields) -> dict:
    """A Post dict with every schema key present; unknown keys are a programming error."""
    unknown = set(fields) - set(POST_FIELDS)
    if unknown:
        raise KeyError(f"not Post fields: {sorted(unknown)}")
    post = dict.fromkeys(POST_FIELDS)
    for name in _LIST_FIELDS:
        post[name] = []
    post.update(fields, id=id, text=text, source=source)
    return post


# Twitter's ids since November 2010 carry their creation time (ms since this epoch) above bit 22
SNOWFLAKE_EPOCH_MS = 1288834974657
_SNOWFLAKE = re.compile(r"^[0-9]{15,19}$")


def created_seconds(post: dict) -> int | None:
    """A post's time in Unix seconds: created_at, or the time inside a Twitter snowflake id when the source gave
    none (CSV dumps often don't); None when neither says."""
    value = post.get("created_at")
    if isinstance(value, datetime):
        return int(value.replace(tzinfo=value.tzinfo or UTC).timestamp())
    if value is not None:
        return int(value)
    pid = str(post["id"])
    if _SNOWFLAKE.match(pid) and int(pid) < 1 << 63:
        return ((int(pid) >> 22) + SNOWFLAKE_EPOCH_MS) // 1000
    return None


def posts_to_table(posts: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(posts, schema=POST_SCHEMA)


@dataclass
class Reject:
    """A record that could not be read: where it was, why, and the start of what was there."""

    file: str
    line: int  # 1-based line (or record number for formats without lines)
    reason: str
    snippet: str = ""  # at most 200 characters of the raw record

    def to_dict(self) -> dict:
        return asdict(self)
