"""Readers: every raw post format -> the one Post schema (myna.data.schema).

`read_posts(path)` streams a file in constant memory and yields Post dicts (built with `new_post`) and Rejects for
records that cannot become a Post. Bad records never raise: bad JSON, wrong types, invalid UTF-8, records over
`max_record_bytes` and truncated gzip/zstd streams all become counted Rejects. A file that is unusable as a whole
raises InputFileError naming the file, before any of its posts: it cannot be opened, holds no post format (binary,
JSON of something else), or its layout cannot be read (a CSV without a text column, a Parquet file of another
schema). A bad option raises ValueError.

Formats: "v1" (Twitter API v1.1 statuses: single, arrays, search envelopes, streaming lines), "v2" (API v2 response
pages / twarc2 JSONL, flattened tweets), "archive" (account archive tweet.js / tweets.js), "csv", "text" (one post per
line), "jsonl" and "parquet" (Myna's own Post schema), "conversations" (customer-care threads: detected here, read by
another module). Every JSON format may also come as one JSON document (an array, pretty-printed or not, a
pretty-printed object, an archive): it is split into records by `split_json_document` without ever holding the
whole document.
"""

import codecs
import csv
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from myna.data.schema import POST_FIELDS, Reject, new_post
from myna.io import GZIP_MAGIC, ZSTD_MAGIC, open_binary

FORMATS = ("v1", "v2", "archive", "csv", "text", "jsonl", "parquet", "conversations")
CHUNK_BYTES = 1 << 20  # read size; records are split out of chunks, so memory is O(chunk + largest record)
SNIFF_BYTES = 1 << 16  # how much decompressed head detect_format looks at

# CSV column names we recognise for each Post field (lower-cased header cells), in order of preference.
CSV_ALIASES = {
    "id": ("id", "tweet_id", "id_str", "status_id", "post_id"),
    "text": ("text", "full_text", "tweet", "tweet_text", "content", "body", "message"),
    "created_at": ("created_at", "date", "timestamp", "time", "created"),
    "author_id": ("author_id", "user_id", "author", "user", "username", "screen_name", "user_name"),
    "author_name": ("username", "screen_name", "user_name", "user", "author_name"),
    "lang": ("lang", "language"),
    "conversation_id": ("conversation_id",),
    "in_reply_to_id": ("in_reply_to_id", "in_reply_to_status_id", "in_response_to_tweet_id", "reply_to_id"),
    "quoted_id": ("quoted_id", "quoted_status_id"),
    "repost_of_id": ("repost_of_id", "retweeted_status_id"),
    "like_count": ("like_count", "favorite_count", "likes", "favorites"),
    "repost_count": ("repost_count", "retweet_count", "retweets"),
    "reply_count": ("reply_count", "replies"),
    "quote_count": ("quote_count", "quotes"),
}
# Headerless layouts: Post field -> 0-based column, and the row width. Sentiment140 is polarity, id, date, query,
# user, text (the user is a screen name: the only author identifier it has).
CSV_PRESETS = {"sentiment140": ({"id": 1, "created_at": 2, "author_id": 4, "author_name": 4, "text": 5}, 6)}


@dataclass(frozen=True)
class Span:
    """One worker's share of a large uncompressed line-format file: the lines that start in bytes [start, end),
    the first of them line `first_line` of the file (so ids and rejects name the file's own line numbers)."""

    start: int
    end: int
    first_line: int


@dataclass
class ReadOptions:
    csv_columns: dict[str, str | int] | None = None  # Post field -> column name or 0-based index

    csv_header: bool | None = None  # does the first row name the columns? None = sniff
    csv_preset: str | None = None  # a CSV_PRESETS layout, e.g. "sentiment140"
    csv_delimiter: str | None = None  # None = tab for .tsv/.tab, comma otherwise
    encoding: str = "utf-8"  # csv and text files (Sentiment140's original CSV is latin-1)
    max_record_bytes: int = 8 << 20  # larger records are rejected without being held in memory
    span: Span | None = None  # read only these lines (see line_spans); None: the whole file


# ---------------------------------------------------------------------------------------------------------------
# Public API


class InputFileError(ValueError):
    """A whole input file is unusable: it cannot be opened, holds no post format, or its layout cannot be read."""

    def __init__(self, path: str | Path, reason: str):
        # both in args, so the error survives pickling from a worker process to its parent
        super().__init__(str(path), reason)
        self.path, self.reason = str(path), reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def check_readable(path: str | Path) -> None:
    """InputFileError naming the file when it cannot be opened (no permission, a folder, gone)."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise InputFileError(path, f"cannot read: {e.strerror or e}") from None


def detect_format(path: str | Path) -> str:
    """The format of one file, from its extension and its first decompressed bytes; InputFileError when it
    cannot be read or holds no post format."""
    path = Path(path)
    check_readable(path)
    with open(path, "rb") as f:
        if f.read(4) == b"PAR1":
            return "parquet"
    ext = _extension(path)
    head = _head(str(path))
    if not head.strip():  # empty: every reader yields nothing, so any answer is right
        return {".csv": "csv", ".tsv": "csv", ".js": "archive", ".jsonl": "jsonl"}.get(ext, "text")
    if _looks_binary(head):
        raise InputFileError(path, f"binary content, not a post format (starts {head[:16]!r})")
    if ext in (".csv", ".tsv", ".tab"):
        return "csv"
    if ext == ".txt":
        return "text"
    if head.startswith(b"window."):
        return "archive"
    if head[:1] in (b"{", b"[") or ext in (".jsonl", ".ndjson"):  # JSON lines may open with a broken line
        return _sniff_json(path, head)
    if ext in (".json", ".js"):
        raise InputFileError(path, f"{ext} file does not start with JSON (starts {head[:40]!r})")
    if ext not in ("", ".text"):  # a page, a config, code: text, but not one post a line
        raise InputFileError(
            path, f"a {ext} file, no post format Myna knows (--format text reads it as one post a line)"
        )
    return "text"


def read_posts(
    path: str | Path, fmt: str | None = None, options: ReadOptions | None = None
) -> Iterator[dict | Reject]:
    """Stream Post dicts and Rejects from one file; `fmt` None = detect_format(path)."""
    options = options or ReadOptions()
    _check_options(options)
    if fmt is None:
        fmt = detect_format(path)
    else:
        check_readable(path)  # here, naming the file, rather than at the first record
    if fmt == "conversations":
        raise ValueError(
            f"{path}: a conversations file (records with turns/messages); read it as conversations"
        )
    if fmt not in _READERS:
        raise ValueError(f"{path}: unknown format {fmt!r}; expected one of {FORMATS}")
    if os.path.getsize(path) == 0:
        return iter(())
    if options.span is not None and not splittable(path, fmt):
        raise ValueError(
            f"{path}: a {fmt} file of this kind is read whole; spans are for JSON lines and text"
        )
    return _READERS[fmt](str(path), options)


def splittable(path: str | Path, fmt: str) -> bool:
    """Can the file be read in byte ranges by several workers: an uncompressed file of one record a line."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(GZIP_MAGIC) or magic == ZSTD_MAGIC:  # a compressed stream cannot be entered mid-way
        return False
    if fmt == "text":
        return True
    return fmt in ("v1", "v2", "jsonl") and not _is_document(_head(str(path)))


def line_spans(path: str | Path, span_bytes: int) -> list[tuple[int, int]]:
    """[start, end) byte ranges of about span_bytes that cover the file, each starting at a line's first byte.

    Only the bytes around each cut are read (up to the next newline), so planning a multi-GB file is cheap.
    """
    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as f:
        target = span_bytes
        while target < size:
            f.seek(target)
            while (block := f.read(CHUNK_BYTES)) and (newline := block.find(b"\n")) < 0:
                pass
            if not block:
                break
            cut = f.tell() - len(block) + newline + 1
            if cut >= size:
                break
            cuts.append(cut)
            target = max(cut, target) + span_bytes
    return list(zip(cuts, [*cuts[1:], size], strict=True))


def count_lines(path: str | Path, start: int, end: int) -> int:
    """Newlines in bytes [start, end): how many lines a span ends, so the next span knows its first line."""
    n = 0
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0 and (block := f.read(min(CHUNK_BYTES, left))):
            n += block.count(b"\n")
            left -= len(block)
    return n


# ---------------------------------------------------------------------------------------------------------------
# Bytes: decompressed chunks, bounded lines, and the JSON document splitter


class _StreamError(Exception):
    """The compressed stream is truncated or corrupt; everything before it was already yielded."""


def _chunks(path: str, span: Span | None = None) -> Iterator[bytes]:
    """Decompressed chunks of about CHUNK_BYTES; raises _StreamError after the last readable bytes."""
    if span is not None:  # an uncompressed file (splittable): its bytes [start, end) as they are
        with open(path, "rb") as f:
            f.seek(span.start)
            left = span.end - span.start
            while left > 0 and (block := f.read(min(CHUNK_BYTES, left))):
                left -= len(block)
                yield block
        return
    with open(path, "rb") as f:
        if f.read(4) == ZSTD_MAGIC:
            yield from _zstd_chunks(path)
            return
    with open_binary(path) as f:
        pending: list[bytes] = []
        size = 0
        error = None
        while True:
            try:
                block = f.read1(CHUNK_BYTES)  # read1: a truncated gzip loses no bytes that were decompressed
            except EOFError:
                error, block = "truncated gzip/zstd stream", b""
            except (OSError, zlib.error) as e:
                error, block = f"corrupt gzip stream: {e}", b""
            pending.append(block)
            size += len(block)
            if size and (size >= CHUNK_BYTES or not block):
                yield b"".join(pending)
                pending.clear()
                size = 0
            if not block:
                break
    if error:
        raise _StreamError(error)


def _zstd_chunks(path: str) -> Iterator[bytes]:
    # myna.io's zstd stream_reader ends silently on a truncated frame; a decompressobj tells us (`eof`).
    with open(path, "rb") as f:
        decoder = zstandard.ZstdDecompressor().decompressobj()
        while block := f.read(CHUNK_BYTES):
            while block:
                try:
                    out = decoder.decompress(block)
                except zstandard.ZstdError as e:
                    raise _StreamError(f"corrupt zstd stream: {e}") from None
                if out:
                    yield out
                block = b""
                if decoder.eof and decoder.unused_data:  # concatenated frames
                    block = decoder.unused_data
                    decoder = zstandard.ZstdDecompressor().decompressobj()
    if not decoder.eof:
        raise _StreamError("truncated gzip/zstd stream")


def _head(path: str) -> bytes:
    """Up to SNIFF_BYTES decompressed bytes, without BOM and leading whitespace (truncation tolerated)."""
    head = b""
    try:
        for chunk in _chunks(path):
            head += chunk
            if len(head) >= SNIFF_BYTES:
                break
    except _StreamError:
        pass
    return head[:SNIFF_BYTES].removeprefix(b"\xef\xbb\xbf").lstrip()


def iter_lines(path: str, limit: int, span: Span | None = None) -> Iterator[tuple[int, bytes] | Reject]:
    """(1-based line number, line without '\\n'), or a Reject for a line over `limit` bytes or a broken stream."""
    lineno = 0 if span is None else span.first_line - 1
    tail: list[bytes] = []  # the line that continues into the next chunk
    tail_len = 0
    oversized = False  # the current line passed `limit`: its bytes are dropped until its newline
    first = span is None or span.start == 0  # only the file's first bytes can hold a BOM
    try:
        for chunk in _chunks(path, span):
            if first:
                chunk, first = chunk.removeprefix(b"\xef\xbb\xbf"), False
            parts = chunk.split(b"\n")
            rest = parts.pop()
            for part in parts:
                lineno += 1
                if tail:
                    tail.append(part)
                    part = b"".join(tail)
                    tail, tail_len = [], 0
                if oversized or len(part) > limit:
                    oversized = False
                    yield _too_large(path, lineno, limit, part)
                    continue
                yield lineno, part
            if rest and not oversized:
                tail.append(rest)
                tail_len += len(rest)
                if tail_len > limit:
                    oversized = True
                    tail = [b"".join(tail)[:200]]  # keep only a snippet
    except _StreamError as e:
        yield Reject(path, lineno + 1, str(e), _snippet(b"".join(tail)))
        return
    if tail:
        line = b"".join(tail)
        yield _too_large(path, lineno + 1, limit, line) if oversized else (lineno + 1, line)


_QUOTE, _COMMA, _LBRACE, _LBRACKET, _RBRACKET = b'"', b",", b"{", b"[", b"]"
# Everything up to the next bracket that Python must count: strings and balanced groups up to five levels deep are
# consumed in C (most of a tweet), so the Python loop only sees the outer brackets (five levels read v1 arrays
# faster than three). The match stops at the opening quote of a string, or the bracket of a group, that the buffer
# ends inside. Possessive quantifiers: no backtracking.
_STR = rb'"(?:[^"\\]++|\\.)*+"'


def _nested(levels: int) -> bytes:
    content = rb'(?:[^"\[\]{}]++|' + _STR + rb")*+"
    for _ in range(levels):
        content = rb'(?:[^"\[\]{}]++|' + _STR + rb"|\{" + content + rb"\}|\[" + content + rb"\])*+"
    return content


_TO_BRACKET = re.compile(_nested(5), re.S)
# The rest of a string: stops at its closing quote, or at the buffer's end (or its final lone backslash).
_STRING_BODY = re.compile(rb'(?:[^"\\]++|\\.)*+', re.S)
_SCALAR_END = re.compile(rb"[,\]\s]")
_SPACE = re.compile(rb"[ \t\r\n]*+")


class JsonSplitError(ValueError):
    """The document's structure is broken (records before the break were already yielded)."""


def split_json_document(chunks: Iterable[bytes], max_record_bytes: int = 8 << 20) -> Iterator[bytes | None]:
    """The raw bytes of each element of a top-level JSON array, streamed from `chunks`.

    A document that is not an array yields each top-level value instead (one object, or several concatenated).
    An assignment prefix such as `window.YTD.tweet.part0 = ` (account archives) is skipped. Elements are only
    delimited here (brackets counted outside strings); orjson validates them. An element over `max_record_bytes`
    yields None and is skipped without being held in memory. Raises JsonSplitError on broken structure.
    """
    yield from _Splitter(iter(chunks), max_record_bytes).records()


class _Splitter:
    def __init__(self, chunks: Iterator[bytes], limit: int):
        self.chunks, self.limit = chunks, limit
        self.buf = b""
        self.pos = 0  # next byte to scan; always outside a string or at a resumable point inside one
        self.start = 0  # first byte of the record being scanned
        self.skipping = False  # the record is over the limit: bytes are dropped as soon as they are scanned

    def more(self) -> bool:
        """Append the next chunk, dropping bytes no longer needed; False at the end of the input."""
        chunk = next(self.chunks, None)
        if chunk is None:
            return False
        if self.pos - self.start > self.limit:
            self.skipping = True
        keep = self.pos if self.skipping else self.start
        self.buf = self.buf[keep:] + chunk
        self.pos -= keep
        self.start -= keep
        return True

    def peek(self) -> bytes:
        """Skip whitespace between records; the next byte, or b'' at the end of the input."""
        while True:
            self.pos = _SPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos : self.pos + 1]
            self.start = self.pos
            if not self.more():
                return b""

    def records(self) -> Iterator[bytes | None]:
        c = self.peek()
        if self.buf.startswith(b"\xef\xbb\xbf", self.pos):
            self.pos += 3
            c = self.peek()
        if c == b"w":  # `window.YTD.tweets.part0 = [...]`
            while (eq := self.buf.find(b"=", self.pos)) < 0:
                self.pos = self.start = len(self.buf)
                if not self.more():
                    raise JsonSplitError("no '=' after the assignment prefix")
            self.pos = eq + 1
            c = self.peek()
        if c != _LBRACKET:
            while c:
                yield self.value()
                c = self.peek()
            return
        self.pos += 1
        if self.peek() == _RBRACKET:
            self.pos += 1
        else:
            while True:
                if not self.peek():
                    raise JsonSplitError("the document ends inside the top-level array")
                yield self.value()
                c = self.peek()
                self.pos += 1
                if c == _RBRACKET:
                    break
                if c != _COMMA:
                    raise JsonSplitError(f"expected ',' or ']' after array element, found {c or 'the end'!r}")
        if c := self.peek():
            raise JsonSplitError(f"unexpected {c!r} after the top-level array")

    def value(self) -> bytes | None:
        self.start = self.pos
        c = self.buf[self.pos : self.pos + 1]
        if c in (_LBRACE, _LBRACKET):
            self.container()
        elif c == _QUOTE:
            self.pos += 1
            self.string()
        else:
            self.scalar()
        record = (
            None if self.skipping or self.pos - self.start > self.limit else self.buf[self.start : self.pos]
        )
        self.skipping = False
        self.start = self.pos
        return record

    def container(self) -> None:
        # Python counts the record's own brackets; the regex never starts before the opening one, so a balanced
        # group it swallows is always inside the record and it stops at the record's closing bracket.
        self.pos += 1
        depth = 1
        while True:
            buf = self.buf
            end = _TO_BRACKET.match(buf, self.pos).end()
            if end == len(buf):
                self.pos = end
                if not self.more():
                    raise JsonSplitError("the document ends inside a record")
                continue
            c = buf[end : end + 1]
            self.pos = end + 1
            if c == _QUOTE:  # a string the buffer ends inside
                self.string()
            elif c == _LBRACE or c == _LBRACKET:
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    return

    def string(self) -> None:
        while True:
            buf = self.buf
            end = _STRING_BODY.match(buf, self.pos).end()
            if end < len(buf) and buf[end : end + 1] == _QUOTE:
                self.pos = end + 1
                return
            self.pos = end
            if not self.more():
                raise JsonSplitError("the document ends inside a string")

    def scalar(self) -> None:
        self.pos += 1  # a scalar has at least one byte (a stray ',' or ']' in bad input too)
        while True:
            m = _SCALAR_END.search(self.buf, self.pos)
            if m:
                self.pos = m.start()
                return
            self.pos = len(self.buf)
            if not self.more():
                return


# ---------------------------------------------------------------------------------------------------------------
# JSON records: JSON lines, or the records of one JSON document


def json_records(path: str, options: ReadOptions) -> Iterator[tuple[object, int, bytes] | Reject]:
    """(parsed record, line or record number, raw bytes) for each record of a JSON-lines file or of one JSON
    document, or a Reject."""
    if options.span is not None or not _is_document(_head(path)):
        yield from _json_lines(path, options.max_record_bytes, options.span)
        return
    index = 0
    try:
        for raw in split_json_document(_chunks(path), options.max_record_bytes):
            index += 1
            if raw is None:
                yield _too_large(path, index, options.max_record_bytes, b"")
                continue
            try:
                yield orjson.loads(raw), index, raw
            except orjson.JSONDecodeError as e:
                yield _bad_json(path, index, raw, e)
    except _StreamError as e:
        yield Reject(path, index + 1, str(e))
    except JsonSplitError as e:
        yield Reject(path, index + 1, f"broken JSON document: {e}")


def _json_lines(path: str, limit: int, span: Span | None) -> Iterator[tuple[object, int, bytes] | Reject]:
    for item in iter_lines(path, limit, span):
        if isinstance(item, Reject):
            yield item
            continue
        line, raw = item
        if not raw or raw.isspace():  # blank lines hold no record
            continue
        try:
            yield orjson.loads(raw), line, raw
        except orjson.JSONDecodeError as e:
            yield _bad_json(path, line, raw, e)


def _is_document(head: bytes) -> bool:
    """One JSON document (array, pretty-printed object, archive) rather than JSON lines: a JSON-lines file's
    first line is a whole object (or longer than the head), or, when that line is broken, its second line is
    (a pretty-printed object's second line is a key or its closing brace)."""
    if head.startswith((b"[", b"window.")):
        return True
    first_line, newline, rest = head.partition(b"\n")
    if not head.startswith(b"{") or not newline or first_line.rstrip().endswith(b"}"):
        return False
    try:
        return not isinstance(orjson.loads(rest.lstrip().partition(b"\n")[0]), dict)
    except orjson.JSONDecodeError:
        return True


def _sniff_json(path: Path, head: bytes) -> str:
    """Classify a JSON file by its first complete record(s) in `head`, else by the keys that appear in it."""
    if re.fullmatch(rb"\[\s*\]\s*", head):
        return "v1"  # an empty status array
    candidates: list[object] = []
    if _is_document(head):
        try:
            candidates.append(orjson.loads(next(split_json_document([head], SNIFF_BYTES)) or b"null"))
        except (StopIteration, ValueError):  # the first record goes on past the head
            pass
    else:
        for line in head.split(b"\n")[:5]:
            try:
                candidates.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
    for record in candidates:
        if fmt := _classify(record):
            return fmt
    if not candidates and (fmt := _classify({k.decode(): None for k in re.findall(rb'"(\w+)"\s*:', head)})):
        return fmt
    seen = repr(candidates[0])[:80] if candidates else repr(head[:80])
    raise InputFileError(path, f"JSON that matches no post format (first record {seen})")


_V1_NOTICES = (
    "delete", "scrub_geo", "limit", "status_withheld", "user_withheld", "disconnect", "warning", "event",
    "friends", "friends_str", "direct_message", "control",
)  # fmt: skip
_V1_KEYS = ("statuses", "id_str", "user", "screen_name", "full_text", "extended_tweet", *_V1_NOTICES)
_V2_PAGE_KEYS = ("data", "includes", "errors", "meta")
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_POST_FIELD_SET = frozenset(POST_FIELDS)
_SHARED_WITH_TWITTER = frozenset({"id", "text", "author_id", "created_at", "lang", "conversation_id"})


def _classify(record: object) -> str | None:
    if not isinstance(record, dict):
        return None
    if "turns" in record or "messages" in record:
        return "conversations"
    if isinstance(record.get("tweet"), dict):
        return "archive"
    keys = record.keys()
    # Post fields only, one of them a field no Twitter shape has at the top (source, author_name, like_count, ...)
    if "id" in record and "text" in record and keys <= _POST_FIELD_SET and keys - _SHARED_WITH_TWITTER:
        return "jsonl"
    if any(k in record for k in _V2_PAGE_KEYS):
        return "v2"
    if any(k in record for k in _V1_KEYS):
        return "v1"
    if "id" in record and "text" in record:  # a flattened v2 tweet, or a pre-2010 v1 status
        created = record.get("created_at")
        return "v1" if isinstance(created, str) and created[:3] in _WEEKDAYS else "v2"
    if "action" in record and "id" in record:  # v2 compliance event
        return "v2"
    return None


# ---------------------------------------------------------------------------------------------------------------
# v1.1 statuses and account archives


def _read_v1(path: str, options: ReadOptions) -> Iterator[dict | Reject]:
    for item in json_records(path, options):
        if isinstance(item, Reject):
            yield item
        else:
            yield from _v1_record(*item, path)


def _read_archive(path: str, options: ReadOptions) -> Iterator[dict | Reject]:
    for item in json_records(path, options):
        if isinstance(item, Reject):
            yield item
            continue
        record, line, raw = item
        if (
            isinstance(record, dict) and "tweet" in record
        ):  # {"tweet": {...}}; the oldest exports: bare tweets
            record = record["tweet"]
        yield from _v1_statuses(record, path, line, raw)


def _v1_record(record: object, line: int, raw: bytes, path: str) -> list[dict | Reject]:
    if isinstance(record, list):  # a timeline page on one line
        out: list[dict | Reject] = []
        for status in record:
            out += _v1_statuses(status, path, line, raw)
        return out
    if isinstance(record, dict) and not any(k in record for k in ("text", "full_text", "extended_tweet")):
        statuses = record.get("statuses")
        if isinstance(statuses, list):  # search envelope
            return _v1_record(statuses, line, raw, path)
        for key in _V1_NOTICES:
            if key in record:
                return [Reject(path, line, f"not a post: {key} notice", _snippet(raw))]
        if "screen_name" in record:
            return [Reject(path, line, "not a post: user object", _snippet(raw))]
    return _v1_statuses(record, path, line, raw)


def _v1_statuses(status: object, path: str, line: int, raw: bytes) -> list[dict | Reject]:
    """The status, then the retweeted and quoted statuses inside it (each once)."""
    out: list[dict | Reject] = []
    seen: set[str] = set()
    source = f"{path}:{line}"
    todo = [status]
    while todo:
        status = todo.pop()
        try:
            if not isinstance(status, dict):
                raise _Bad(f"not a post: JSON {_typename(status)}")
            post = _v1_post(status, source)
        except _Bad as e:
            out.append(Reject(path, line, e.reason, _snippet(raw)))
            continue
        if post["id"] in seen:
            continue
        seen.add(post["id"])
        out.append(post)
        for key in ("quoted_status", "retweeted_status"):
            if status.get(key) is not None:
                todo.append(status[key])
    return out


def _v1_post(s: dict, source: str) -> dict:
    id_ = _id(s.get("id_str") or s.get("id"), "id")
    if id_ is None:
        raise _Bad("missing id")
    text, entities = _v1_text(s)
    retweeted = s.get("retweeted_status")
    repost_of = None
    if retweeted is not None:
        if not isinstance(retweeted, dict):
            raise _Bad(f"retweeted_status: expected an object, got {_typename(retweeted)}")
        repost_of = _id(retweeted.get("id_str") or retweeted.get("id"), "retweeted_status.id")
        text, entities = _v1_text(retweeted)  # a retweet's own text is cut at 140 characters
    quoted = s.get("quoted_status")
    quoted_id = s.get("quoted_status_id_str") or s.get("quoted_status_id")
    if quoted_id is None and isinstance(quoted, dict):
        quoted_id = quoted.get("id_str") or quoted.get("id")
    user = s.get("user")
    if user is not None and not isinstance(user, dict):
        raise _Bad(f"user: expected an object, got {_typename(user)}")
    if entities is not None and not isinstance(entities, dict):
        raise _Bad(f"entities: expected an object, got {_typename(entities)}")
    entities = entities or {}
    return new_post(
        id_,
        _text(text, unescape=True),
        source,
        author_id=_id(user.get("id_str") or user.get("id"), "user.id") if user else None,
        author_name=_str(user.get("screen_name"), "user.screen_name") if user else None,
        created_at=_date(s.get("created_at")),
        lang=_str(s.get("lang"), "lang"),
        in_reply_to_id=_id(
            s.get("in_reply_to_status_id_str") or s.get("in_reply_to_status_id"), "in_reply_to"
        ),
        quoted_id=_id(quoted_id, "quoted_status_id"),
        repost_of_id=repost_of,
        like_count=_count(s.get("favorite_count"), "favorite_count"),
        repost_count=_count(s.get("retweet_count"), "retweet_count"),
        reply_count=_count(s.get("reply_count"), "reply_count"),
        quote_count=_count(s.get("quote_count"), "quote_count"),
        hashtags=_pluck(entities.get("hashtags"), "text", "entities.hashtags"),
        mentions=_pluck(entities.get("user_mentions"), "screen_name", "entities.user_mentions"),
        urls=_urls(entities.get("urls")),
    )


def _v1_text(s: dict) -> tuple[object, object]:
    """Full text and its entities: extended_tweet.full_text (streaming) > full_text (extended mode) > text."""
    extended = s.get("extended_tweet")
    if isinstance(extended, dict) and "full_text" in extended:
        return extended["full_text"], extended.get("entities")
    text = s.get("full_text")
    return (s.get("text") if text is None else text), s.get("entities")


# ---------------------------------------------------------------------------------------------------------------
# v2 response pages and flattened tweets


def _read_v2(path: str, options: ReadOptions) -> Iterator[dict | Reject]:
    for item in json_records(path, options):
        if isinstance(item, Reject):
            yield item
        else:
            yield from _v2_record(*item, path)


def _v2_record(record: object, line: int, raw: bytes, path: str) -> list[dict | Reject]:
    if isinstance(record, list):
        return [x for r in record for x in _v2_record(r, line, raw, path)]
    if not isinstance(record, dict):
        return [Reject(path, line, f"not a post: JSON {_typename(record)}", _snippet(raw))]
    if any(k in record for k in _V2_PAGE_KEYS):
        data = record.get("data")
        items = [data] if isinstance(data, dict) else data if isinstance(data, list) else []
        tweets = [t for t in items if isinstance(t, dict) and "text" in t]
        includes = record.get("includes")
        originals = includes.get("tweets") if isinstance(includes, dict) else None
        originals = [t for t in originals if isinstance(t, dict)] if isinstance(originals, list) else []
        out: list[dict | Reject] = []
        if len(tweets) < len(items):
            kind = _v2_kind(next(t for t in items if not (isinstance(t, dict) and "text" in t)))
            out.append(Reject(path, line, f"not a post: v2 {kind} response", _snippet(raw)))
        elif not tweets and not originals:
            out.append(Reject(path, line, "not a post: v2 response without tweets", _snippet(raw)))
        users = includes.get("users") if isinstance(includes, dict) else None
        names = {
            u["id"]: u["username"]
            for u in (users if isinstance(users, list) else [])
            if isinstance(u, dict) and isinstance(u.get("id"), str) and isinstance(u.get("username"), str)
        }
        return out + _v2_tweets(tweets, originals, path, line, raw, names)
    if "text" in record and "id" in record:  # twarc flattened tweet: referenced tweets are inlined
        refs = record.get("referenced_tweets")
        inlined = [r for r in refs if isinstance(r, dict) and "text" in r] if isinstance(refs, list) else []
        return _v2_tweets([record], inlined, path, line, raw)
    kind = "compliance event" if "action" in record else "record without text"
    return [Reject(path, line, f"not a post: v2 {kind}", _snippet(raw))]


def _v2_kind(item: object) -> str:
    if isinstance(item, dict):
        for key, kind in (("tweet_count", "tweet counts"), ("username", "users"), ("member_count", "lists")):
            if key in item:
                return kind
    return "non-tweet"


def _v2_tweets(
    tweets: list, originals: list, path: str, line: int, raw: bytes, names: dict | None = None
) -> list[dict | Reject]:
    """Posts for a page's tweets and its expanded referenced tweets, each id once; `names`: the page's
    includes.users, author id -> username."""
    by_id = {t["id"]: t for t in originals if type(t.get("id")) is str}
    source = f"{path}:{line}"
    out: list[dict | Reject] = []
    seen: set[str] = set()
    for tweet in tweets + originals:
        try:
            post = _v2_post(tweet, source, by_id, names or {})
        except _Bad as e:
            out.append(Reject(path, line, e.reason, _snippet(raw)))
            continue
        if post["id"] not in seen:
            seen.add(post["id"])
            out.append(post)
    return out


def _v2_post(t: dict, source: str, originals: dict, names: dict) -> dict:
    id_ = _id(t.get("id"), "id")
    if id_ is None:
        raise _Bad("missing id")
    text, entities = _v2_text(t)
    reply_to = quoted = repost_of = None
    refs = t.get("referenced_tweets")
    if refs is not None:
        if not isinstance(refs, list):
            raise _Bad(f"referenced_tweets: expected a list, got {_typename(refs)}")
        for ref in refs:
            if not isinstance(ref, dict):
                raise _Bad(f"referenced_tweets: expected objects, got {_typename(ref)}")
            kind, ref_id = ref.get("type"), _id(ref.get("id"), "referenced_tweets.id")
            if kind == "replied_to":
                reply_to = ref_id
            elif kind == "quoted":
                quoted = ref_id
            elif kind == "retweeted":
                repost_of = ref_id
    if (
        repost_of is not None and repost_of in originals
    ):  # a retweet's own text is cut; the expanded original has it whole
        text, entities = _v2_text(originals[repost_of])
    metrics = t.get("public_metrics")
    if metrics is not None and not isinstance(metrics, dict):
        raise _Bad(f"public_metrics: expected an object, got {_typename(metrics)}")
    if entities is not None and not isinstance(entities, dict):
        raise _Bad(f"entities: expected an object, got {_typename(entities)}")
    metrics, entities = metrics or {}, entities or {}
    return new_post(
        id_,
        _text(text, unescape=True),
        source,
        author_id=_id(t.get("author_id"), "author_id"),
        # twarc2's flattened tweets carry their author inline; pages name them in includes.users
        author_name=names.get(t.get("author_id"))
        or (
            _str(t["author"].get("username"), "author.username")
            if isinstance(t.get("author"), dict)
            else None
        ),
        created_at=_date(t.get("created_at")),
        lang=_str(t.get("lang"), "lang"),
        conversation_id=_id(t.get("conversation_id"), "conversation_id"),
        in_reply_to_id=reply_to,
        quoted_id=quoted,
        repost_of_id=repost_of,
        like_count=_count(metrics.get("like_count"), "public_metrics.like_count"),
        repost_count=_count(metrics.get("retweet_count"), "public_metrics.retweet_count"),
        reply_count=_count(metrics.get("reply_count"), "public_metrics.reply_count"),
        quote_count=_count(metrics.get("quote_count"), "public_metrics.quote_count"),
        hashtags=_pluck(entities.get("hashtags"), "tag", "entities.hashtags"),
        mentions=_pluck(entities.get("mentions"), "username", "entities.mentions"),
        urls=_urls(entities.get("urls")),
    )


def _v2_text(t: dict) -> tuple[object, object]:
    """note_tweet.text holds a long post whole (`text` is cut at 280 characters)."""
    note = t.get("note_tweet")
    if isinstance(note, dict) and "text" in note:
        return note["text"], note.get("entities", t.get("entities"))
    return t.get("text"), t.get("entities")


# ---------------------------------------------------------------------------------------------------------------
# Myna's own schema: JSON lines and Parquet

_STR_FIELDS = (
    "author_id",
    "author_name",
    "lang",
    "conversation_id",
    "in_reply_to_id",
    "quoted_id",
    "repost_of_id",
)
_INT_FIELDS = ("like_count", "repost_count", "reply_count", "quote_count")
_LIST_FIELDS = ("hashtags", "mentions", "urls")
_INT64 = (-(1 << 63), (1 << 63) - 1)


def _read_jsonl(path: str, options: ReadOptions) -> Iterator[dict | Reject]:
    for item in json_records(path, options):
        if isinstance(item, Reject):
            yield item
        else:
            record, line, raw = item
            yield _myna_post(record, path, line, raw)


def _read_parquet(path: str, options: ReadOptions) -> Iterator[dict | Reject]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputFileError(path, f"unreadable parquet: {e}") from None
    names = set(parquet.schema_arrow.names)
    if names - _POST_FIELD_SET or {"id", "text"} - names:
        extra, missing = sorted(names - _POST_FIELD_SET), sorted({"id", "text"} - names)
        raise InputFileError(path, f"not the Post schema: unknown columns {extra}, missing {missing}")
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                row += 1
                yield _myna_post(record, path, row, None)
    except (pa.ArrowException, OSError) as e:
        yield Reject(path, row + 1, f"unreadable parquet: {e}")


def _myna_post(record: object, path: str, line: int, raw: bytes | None) -> dict | Reject:
    try:
        if not isinstance(record, dict):
            raise _Bad(f"expected a JSON object, got {_typename(record)}")
        unknown = record.keys() - _POST_FIELD_SET
        if unknown:
            raise _Bad(f"unknown field {sorted(unknown)[0]!r} (not in the Post schema)")
        id_ = record.get("id")
        if type(id_) is not str or not id_:
            raise _Bad(f"id: expected a non-empty string, got {_typename(id_)}")
        source = record.get("source")
        if source is None:
            source = f"{path}:{line}"
        elif type(source) is not str:
            raise _Bad(f"source: expected a string, got {_typename(source)}")
        fields: dict = {"created_at": _date(record.get("created_at"))}
        for name in _STR_FIELDS:
            fields[name] = _str(record.get(name), name)
        for name in _INT_FIELDS:
            value = record.get(name)
            if value is not None and (type(value) is not int or not _INT64[0] <= value <= _INT64[1]):
                raise _Bad(f"{name}: expected a 64-bit integer or null, got {_typename(value)}")
            fields[name] = value
        for name in _LIST_FIELDS:
            value = record.get(name)
            if value is None:
                value = []
            elif type(value) is not list or not all(type(v) is str for v in value):
                raise _Bad(f"{name}: expected a list of strings, got {_typename(value)}")
            fields[name] = value
        return new_post(id_, _text(record.get("text"), unescape=False), source, **fields)
    except _Bad as e:
        snippet = _snippet(raw) if raw is not None else _snippet(orjson.dumps(record, default=str))
        return Reject(path, line, e.reason, snippet)


# ---------------------------------------------------------------------------------------------------------------
# CSV and plain text


def _read_csv(path: str, options: ReadOptions) -> Iterator[dict | Reject]:
    delimiter = options.csv_delimiter or ("\t" if _extension(Path(path)) in (".tsv", ".tab") else ",")
    feed = _CsvFeed(path, options)
    rows = csv.reader(feed.lines(), delimiter=delimiter)
    layout = None
    while True:
        feed.first_line = 0
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as e:
            yield from feed.drain()
            yield Reject(path, feed.first_line, f"bad CSV row: {e}")
            continue
        yield from feed.drain()
        line = feed.first_line
        if not row:  # a blank line holds no record
            continue
        if layout is None:
            layout = _csv_layout(row, options, path)
            if layout[2]:  # header row
                continue
        columns, width, _ = layout
        if len(row) != width:
            yield Reject(path, line, f"expected {width} columns, got {len(row)}", _snippet(",".join(row)))
            continue
        yield _csv_post(row, columns, path, line)
    yield from feed.drain()


class _CsvFeed:
    """Decoded lines for csv.reader; remembers the first line number of each row and collects line Rejects."""

    def __init__(self, path: str, options: ReadOptions):
        self.path, self.options = path, options
        self.first_line = 0
        self.rejects: list[Reject] = []

    def lines(self) -> Iterator[str]:
        for item in iter_lines(self.path, self.options.max_record_bytes):
            if isinstance(item, Reject):
                self.rejects.append(item)
                continue
            line, raw = item
            try:
                text = raw.decode(self.options.encoding)
            except UnicodeDecodeError as e:
                self.rejects.append(_undecodable(self.path, line, raw, e))
                continue
            self.first_line = self.first_line or line
            yield text + "\n"  # keeps newlines inside quoted fields

    def drain(self) -> Iterator[Reject]:
        yield from self.rejects
        self.rejects.clear()


def _csv_layout(row: list[str], options: ReadOptions, path: str) -> tuple[dict, int, bool]:
    """(Post field -> column index, row width, is this row a header) from the first row and the options;
    InputFileError when no row of the file can be read with them."""
    names = [cell.strip().lower() for cell in row]
    if options.csv_preset:
        columns, width = CSV_PRESETS[options.csv_preset]
        return dict(columns), width, bool(options.csv_header)
    header = options.csv_header
    named = [c.strip().lower() for c in (options.csv_columns or {}).values() if isinstance(c, str)]
    if header is None and named:  # a mapping by name says the first row is the header when it holds the names
        header = all(name in names for name in named)
    elif header is None:
        header = any(name in aliases for name in names for aliases in CSV_ALIASES.values())
    if options.csv_columns:
        columns = {}
        for field, column in options.csv_columns.items():
            if isinstance(column, int):
                columns[field] = column
            elif header and column.strip().lower() in names:
                columns[field] = names.index(column.strip().lower())
            else:
                raise InputFileError(path, f"csv_columns: no column named {column!r} (header {row[:20]})")
    elif header:
        columns = {}
        for field, aliases in CSV_ALIASES.items():
            found = next((names.index(a) for a in aliases if a in names), None)
            if found is not None:
                columns[field] = found
    elif _is_sentiment140(row):
        columns, width = CSV_PRESETS["sentiment140"]
        return dict(columns), width, False
    elif len(row) == 1:
        columns = {"text": 0}
    else:
        raise InputFileError(
            path, f"headerless CSV with {len(row)} columns: set ReadOptions.csv_columns or csv_preset"
        )
    if "text" not in columns:
        raise InputFileError(path, f"no text column in CSV header {row[:20]}: set ReadOptions.csv_columns")
    if max(columns.values()) >= len(row):
        raise InputFileError(
            path, f"csv_columns index {max(columns.values())} is past the {len(row)} columns"
        )
    return columns, len(row), header


def _is_sentiment140(row: list[str]) -> bool:
    if len(row) != 6 or row[0] not in ("0", "2", "4") or not row[1].isdigit():
        return False
    try:
        return _date(row[2]) is not None
    except _Bad:
        return False


def _csv_post(row: list[str], columns: dict, path: str, line: int) -> dict | Reject:
    try:
        fields = {}
        for field, index in columns.items():
            value = row[index].strip()
            if not value or field in ("id", "text"):
                continue
            if field == "created_at":
                fields[field] = _date(value)
            elif field in _INT_FIELDS:
                fields[field] = _count(value, field)
            else:
                fields[field] = value
        id_ = row[columns["id"]].strip() if "id" in columns else ""
        text = _text(row[columns["text"]], unescape=True)  # CSV dumps of API text keep &amp; &quot;
        return new_post(id_ or f"{_stem(path)}:{line}", text, f"{path}:{line}", **fields)
    except _Bad as e:
        return Reject(path, line, e.reason, _snippet(",".join(row)))


def _read_text(path: str, options: ReadOptions) -> Iterator[dict | Reject]:
    stem = _stem(path)
    encoding = options.encoding
    for item in iter_lines(path, options.max_record_bytes, options.span):
        if isinstance(item, Reject):
            yield item
            continue
        line, raw = item
        try:
            text = _text(raw.removesuffix(b"\r").decode(encoding), unescape=True)
        except UnicodeDecodeError as e:
            yield _undecodable(path, line, raw, e)
            continue
        except _Bad as e:
            yield Reject(path, line, e.reason, _snippet(raw))
            continue
        yield new_post(f"{stem}:{line}", text, f"{path}:{line}")


_READERS = {
    "v1": _read_v1,
    "v2": _read_v2,
    "archive": _read_archive,
    "csv": _read_csv,
    "text": _read_text,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
}


# ---------------------------------------------------------------------------------------------------------------
# Field values: each raises _Bad naming the field and what was expected


class _Bad(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _text(value: object, unescape: bool) -> str:
    if type(value) is not str:
        raise _Bad("missing text" if value is None else f"text: expected a string, got {_typename(value)}")
    if unescape and "&" in value:  # the APIs escape exactly these in text
        value = value.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
    if not value or value.isspace():
        raise _Bad("empty text")
    if "\x00" in value:
        raise _Bad("NUL character in text")
    return value


def _id(value: object, field: str) -> str | None:
    """Ids are strings; old v1 shapes give integers."""
    if value is None or type(value) is str:
        return value or None
    if type(value) is int:
        return str(value)
    raise _Bad(f"{field}: expected a string or integer id, got {_typename(value)}")


def _str(value: object, field: str) -> str | None:
    if value is None or type(value) is str:
        return value
    raise _Bad(f"{field}: expected a string, got {_typename(value)}")


def _count(value: object, field: str) -> int | None:
    """Counts are integers; archives give strings ("35"), 2010-era v1 gives "100+" for 100 or more."""
    if value is None:
        return None
    if type(value) is int and _INT64[0] <= value <= _INT64[1]:
        return value
    if type(value) is str:
        digits = value.removesuffix("+")
        if digits.isascii() and digits.isdigit() and len(digits) < 19:
            return int(digits)
    raise _Bad(f"{field}: expected a count, got {_typename(value)} {str(value)[:20]!r}")


def _pluck(items: object, key: str, field: str) -> list[str]:
    if items is None:
        return []
    try:
        values = [item[key] for item in items]
    except (TypeError, KeyError, IndexError):
        raise _Bad(f"{field}: expected a list of objects with {key!r}") from None
    if not all(type(v) is str for v in values):
        raise _Bad(f"{field}: expected {key!r} to be strings")
    return values


def _urls(items: object) -> list[str]:
    if items is None:
        return []
    if type(items) is not list or not all(isinstance(u, dict) for u in items):
        raise _Bad("entities.urls: expected a list of objects")
    urls = [u.get("expanded_url") or u.get("url") for u in items]  # expanded_url is null in some old statuses
    if not all(type(u) is str for u in urls):
        raise _Bad("entities.urls: expected 'expanded_url' or 'url' strings")
    return urls


_MONTHS = {m: f"{i:02d}" for i, m in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)}
_ZONES = {  # the US zone names in Sentiment140 dates, as ISO offsets
    "UTC": "+00:00", "GMT": "+00:00", "EST": "-05:00", "EDT": "-04:00", "CST": "-06:00", "CDT": "-05:00",
    "MST": "-07:00", "MDT": "-06:00", "PST": "-08:00", "PDT": "-07:00",
}  # fmt: skip


def _date(value: object, field: str = "created_at") -> datetime | None:
    """UTC datetime from the v1 form "Wed Oct 10 20:19:24 +0000 2018", the Sentiment140 form
    "Mon Apr 06 22:19:45 PDT 2009", ISO 8601 (v2, Myna), or epoch seconds/milliseconds; naive times are UTC."""
    if value is None:
        return None
    if isinstance(value, datetime):
        dt = value
    elif type(value) is not str:
        raise _Bad(f"{field}: expected a date string, got {_typename(value)}")
    else:
        try:
            dt = _parse_date(value)
        except (KeyError, ValueError, OverflowError, OSError):
            raise _Bad(f"{field}: unrecognised date {value[:40]!r}") from None
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt if dt.tzinfo is UTC else dt.astimezone(UTC)


def _parse_date(s: str) -> datetime:
    # Rewritten as ISO for the C parser: datetime.strptime is ~10x slower and this runs once per post.
    if len(s) == 30 and s[3] == " " and s[19] == " ":  # Wed Oct 10 20:19:24 +0000 2018
        return datetime.fromisoformat(f"{s[26:]}-{_MONTHS[s[4:7]]}-{s[8:10]}T{s[11:19]}{s[20:23]}:{s[23:25]}")
    if len(s) == 28 and s[3] == " " and s[19] == " ":  # Mon Apr 06 22:19:45 PDT 2009
        return datetime.fromisoformat(f"{s[24:]}-{_MONTHS[s[4:7]]}-{s[8:10]}T{s[11:19]}{_ZONES[s[20:23]]}")
    if s.isascii() and s.isdigit():
        seconds = int(s) / 1000 if len(s) >= 12 else int(s)
        return datetime.fromtimestamp(seconds, UTC)
    return datetime.fromisoformat(s)


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def _check_options(options: ReadOptions) -> None:
    if options.csv_preset is not None and options.csv_preset not in CSV_PRESETS:
        raise ValueError(f"unknown csv_preset {options.csv_preset!r}; expected one of {sorted(CSV_PRESETS)}")
    for field, column in (options.csv_columns or {}).items():
        if field not in _POST_FIELD_SET or field in _LIST_FIELDS or field == "source":
            raise ValueError(f"csv_columns: {field!r} is not a scalar Post field")
        if not isinstance(column, (str, int)) or isinstance(column, bool):
            raise ValueError(f"csv_columns[{field!r}]: expected a column name or index, got {column!r}")
    try:
        codecs.lookup(options.encoding)
    except LookupError:
        raise ValueError(f"unknown encoding {options.encoding!r}") from None
    if options.max_record_bytes < 1:
        raise ValueError(f"max_record_bytes must be positive, got {options.max_record_bytes}")


def _extension(path: Path) -> str:
    """The format extension, under any compression extension: posts.jsonl.zst -> .jsonl."""
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in (".gz", ".zst", ".zstd"):
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _stem(path: str) -> str:
    name = Path(path).name
    for ext in (".gz", ".zst", ".zstd"):
        name = name.removesuffix(ext)
    return Path(name).stem


_CONTROL_BYTES = bytes([*range(0, 9), 11, 12, *range(14, 32), 127])


def _looks_binary(head: bytes) -> bool:
    """Text has almost no control bytes (a stray NUL is a bad record, not a binary file); compressed, image or
    executable data has plenty."""
    sample = head[:4096]
    controls = len(sample) - len(sample.translate(None, _CONTROL_BYTES))
    return controls > 2 and controls > len(sample) // 50


def _typename(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _snippet(raw: bytes | str) -> str:
    return raw[:200] if isinstance(raw, str) else raw[:200].decode("utf-8", "replace")


def _too_large(path: str, line: int, limit: int, raw: bytes) -> Reject:
    return Reject(path, line, f"record too large (over {limit} bytes)", _snippet(raw))


def _undecodable(path: str, line: int, raw: bytes, error: UnicodeDecodeError) -> Reject:
    return Reject(path, line, f"invalid {error.encoding.upper()}: {error.reason}", _snippet(raw))


def _bad_json(path: str, line: int, raw: bytes, error: orjson.JSONDecodeError) -> Reject:
    message = str(error).split(": line ")[0]  # keep reasons countable: drop orjson's position suffix
    if "UTF-8" in message:
        return Reject(path, line, f"invalid UTF-8: {message}", _snippet(raw))
    return Reject(path, line, f"invalid JSON: {message}", _snippet(raw))
