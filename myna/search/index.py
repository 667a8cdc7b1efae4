"""The search index: one SQLite file with the posts, an FTS5 (BM25) table and the posts' embeddings.

    INDEX/index.sqlite
        meta     key -> JSON value: format version, the model that embedded the posts (path and fingerprint), width
        posts    one row per post: the fields search filters, ranks and shows (rowid = position in the vectors)
        fts      FTS5 over the posts' search terms (myna.search.terms) and their hashtags' words; contentless, as
                 the text is in posts
        vectors  the posts' embeddings in float16 chunks, in rowid order

Everything is embedded: no server, one file. A build writes a new folder and renames it over the old one; an add
is one SQLite transaction (posts, terms and vectors together). A build or an add killed at any point leaves the
last good index, which opens as it was.
"""

import hashlib
import json
import re
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from myna.data import readers
from myna.data.clean import normalise
from myna.data.schema import Reject, created_seconds
from myna.progress import Progress, log
from myna.search.signals import Signals
from myna.search.terms import terms
from myna.search.vectors import VectorIndex

FORMAT = 2  # 2: author is the screen name where the source gives one, author_id beside it
DB_NAME = "index.sqlite"
BATCH = 2048  # posts per insert and per vector chunk
MAX_TEXT_CHARS = (
    10_000  # a post longer than this is cut for indexing (Twitter's longest is 25k for paid posts)
)
_URL = re.compile(r"https?://\S+|www\.\S+", re.I)
_LEADING_MENTION = re.compile(r"^\.?@(\w{1,50})")

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE posts (
    rowid INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    author TEXT,                 -- case-folded screen name (else the author id): what results show, from: and to:
    author_id TEXT,              -- case-folded: from: matches it too
    created_at INTEGER,          -- Unix seconds, UTC
    text TEXT NOT NULL,
    lang TEXT,
    in_reply_to_id TEXT,
    to_user TEXT,                -- case-folded: the parent's author, or the leading @mention of a reply
    repost_of_id TEXT,
    quoted_id TEXT,
    likes INTEGER NOT NULL,
    reposts INTEGER NOT NULL,
    replies INTEGER NOT NULL,
    quotes INTEGER NOT NULL,
    is_reply INTEGER NOT NULL,
    has_link INTEGER NOT NULL
);
CREATE INDEX posts_time ON posts(created_at);
CREATE INDEX posts_author ON posts(author);
CREATE INDEX posts_author_id ON posts(author_id);
CREATE INDEX posts_to ON posts(to_user);
CREATE VIRTUAL TABLE fts USING fts5(body, tagwords, content='', tokenize="ascii tokenchars '#@_'");
CREATE TABLE vectors (first INTEGER PRIMARY KEY, count INTEGER NOT NULL, data BLOB NOT NULL);
"""


class SearchIndexError(ValueError):
    """An index that cannot be opened or used as asked; the message names the file and what was expected."""


@dataclass
class Embedder:
    """Embeds texts with a run's model exactly as the engine and /v1/embeddings do."""

    ckpt: str
    fingerprint: str
    model: torch.nn.Module
    tokenizer: object

    @classmethod
    def load(cls, ckpt: str | Path) -> "Embedder":
        from myna.runs import load_model

        loaded = load_model(ckpt)
        return cls(str(ckpt), fingerprint(loaded.checkpoint), loaded.model, loaded.tokenizer)

    @classmethod
    def of(cls, loaded) -> "Embedder":
        """The model a server or a chat already holds (a myna.runs.Loaded), shared, not loaded again."""
        return cls(str(loaded.checkpoint), fingerprint(loaded.checkpoint), loaded.model, loaded.tokenizer)

    @property
    def dim(self) -> int:
        return self.model.cfg.n_embd

    def __call__(self, texts: list[str]) -> np.ndarray:
        from myna.infer.engine import embed_ids

        limit = self.model.cfg.max_seq_len
        ids = [self.tokenizer.document(t)[:limit] for t in texts]
        return embed_ids(self.model, ids, self.tokenizer.pad_id).numpy()


def load_embedder(index: Path, meta: dict, ckpt: str | Path | None = None) -> Embedder | None:
    """The model that embedded the index (or ckpt, if its weights are the same); None for a lexical index."""
    if not meta.get("dim"):
        return None
    embedder = Embedder.load(ckpt or meta["ckpt"])
    if embedder.fingerprint != meta["fingerprint"]:
        raise SearchIndexError(
            f"{index}: embedded by {meta['ckpt']} (weights {meta['fingerprint']}); {embedder.ckpt} has "
            f"weights {embedder.fingerprint}: rebuild the index to change models"
        )
    return embedder


def fingerprint(ckpt_dir: Path) -> str:
    """A hash of a checkpoint's weights: an index embedded by one model is never queried with another's vectors."""
    h = hashlib.sha256()
    for f in sorted(ckpt_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


# --- posts -> rows ---


def _row(post: dict) -> dict:
    text = normalise(post["text"])[:MAX_TEXT_CHARS]
    reply_to = post.get("in_reply_to_id")
    lead = _LEADING_MENTION.match(text)
    return {
        "id": str(post["id"]),
        "author": (post.get("author_name") or post.get("author_id") or "").casefold() or None,
        "author_id": (post.get("author_id") or "").casefold() or None,
        "created_at": created_seconds(post),
        "text": text,
        "lang": post.get("lang"),
        "in_reply_to_id": reply_to,
        # the parent's author is filled in later where the parent is in the index
        "to_user": lead.group(1).casefold() if lead and reply_to else None,
        "repost_of_id": post.get("repost_of_id"),
        "quoted_id": post.get("quoted_id"),
        "likes": post.get("like_count") or 0,
        "reposts": post.get("repost_count") or 0,
        "replies": post.get("reply_count") or 0,
        "quotes": post.get("quote_count") or 0,
        "is_reply": int(bool(reply_to)),
        "has_link": int(bool(post.get("urls")) or bool(_URL.search(text))),
    }


def _fts_columns(text: str) -> tuple[str, str]:
    ts = terms(text)
    return " ".join(ts), " ".join(t[1:] for t in ts if t[0] == "#")


_COLUMNS = (
    "id author author_id created_at text lang in_reply_to_id to_user repost_of_id quoted_id "
    "likes reposts replies quotes is_reply has_link"
).split()


class SearchIndex:
    """An open index. Reads are safe from many threads (one connection each, read-only)."""

    def __init__(self, path: Path, db: sqlite3.Connection, meta: dict, vectors: np.ndarray | None):
        self.path = Path(path)
        self.db = db
        self.meta = meta
        self.vectors = vectors  # [N, dim] float32, row i = post rowid i + 1; None for a lexical-only index
        self.vector_index = None if vectors is None else VectorIndex(vectors)  # exact, or IVF when large
        self.signals = Signals(db, self.size)  # what since:, min_faves: and the like test, in memory
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Take in the posts a `myna index add` committed since this index was read (a server stays open across
        adds): their vectors join the vector index, the signals are read again. Queries call it first."""
        posts = json.loads(self.db.execute("SELECT value FROM meta WHERE key='posts'").fetchone()[0])
        if posts == self.size:
            return
        with self._lock:
            if posts == self.size:
                return
            old = self.size
            meta = {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}
            new = _load_vectors(self.db, meta, self.path / DB_NAME, start=old + 1)
            if new is not None:
                self.vectors = np.concatenate([self.vectors, new])
                self.vector_index.extend(self.vectors)
            self.signals = Signals(self.db, meta["posts"])
            self.meta = meta

    @property
    def size(self) -> int:
        return int(self.meta["posts"])

    @classmethod
    def open(cls, path: str | Path) -> "SearchIndex":
        path = Path(path)
        db_path = path / DB_NAME
        if not db_path.is_file():
            raise SearchIndexError(
                f"{path}: not a search index (no {DB_NAME}); build one with `myna index build`"
            )
        try:
            # read-write, so that SQLite can roll back what a killed add left in its journal before reading
            db = sqlite3.connect(db_path, check_same_thread=False)
            meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        except (sqlite3.DatabaseError, json.JSONDecodeError) as e:
            raise SearchIndexError(f"{db_path}: not a readable search index ({e})") from None
        if meta.get("format") != FORMAT:
            raise SearchIndexError(
                f"{db_path}: index format {meta.get('format')!r}, this Myna reads format {FORMAT}"
            )
        return cls(path, db, meta, _load_vectors(db, meta, db_path))

    def rows(self, rowids: Iterable[int]) -> dict[int, dict]:
        rowids = list(rowids)
        out = {}
        for start in range(0, len(rowids), 500):
            chunk = rowids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            cur = self.db.execute(
                f"SELECT rowid, {', '.join(_COLUMNS)} FROM posts WHERE rowid IN ({marks})", chunk
            )
            for r in cur:
                out[r[0]] = dict(zip(_COLUMNS, r[1:], strict=True))
        return out


def _load_vectors(db: sqlite3.Connection, meta: dict, where: Path, start: int = 1) -> np.ndarray | None:
    """The vectors of posts start.. (rowids) to the last, [N, dim] float32; None for a lexical-only index."""
    dim = meta.get("dim")
    if not dim:
        return None
    parts, expected = [], start
    sql = "SELECT first, count, data FROM vectors WHERE first >= ? ORDER BY first"
    for first, count, data in db.execute(sql, [start]):
        if first != expected or len(data) != count * dim * 2:
            raise SearchIndexError(
                f"{where}: vectors chunk at row {first} is damaged (expected row {expected})"
            )
        parts.append(np.frombuffer(data, dtype="<f2").reshape(count, dim))
        expected += count
    if expected - 1 != meta["posts"]:  # every add writes its posts' vectors as one chunk
        raise SearchIndexError(f"{where}: {expected - 1} vectors for {meta['posts']} posts")
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, dim), np.float32)


# --- writing ---


def _create(db_path: Path, embedder: Embedder | None) -> sqlite3.Connection:
    db = sqlite3.connect(db_path)
    db.executescript(SCHEMA)
    # FTS5's rank: BM25 with the hashtag words at half the weight of the text (ORDER BY rank stays the fast path)
    db.execute("INSERT INTO fts (fts, rank) VALUES ('rank', 'bm25(1.0, 0.5)')")
    meta = {"format": FORMAT, "posts": 0, "dim": embedder.dim if embedder else None}
    if embedder:
        meta.update(ckpt=embedder.ckpt, fingerprint=embedder.fingerprint)
    db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
    db.commit()
    return db


def _insert(db: sqlite3.Connection, posts: list[dict], embedder: Embedder | None, counts: Counter) -> None:
    """Add a batch of posts (already new to the index, ids unique) inside the caller's transaction."""
    first = json.loads(db.execute("SELECT value FROM meta WHERE key='posts'").fetchone()[0]) + 1
    rows = [_row(p) for p in posts]
    db.executemany(
        f"INSERT INTO posts (rowid, {', '.join(_COLUMNS)}) VALUES (?, {', '.join('?' * len(_COLUMNS))})",
        [(first + i, *(r[c] for c in _COLUMNS)) for i, r in enumerate(rows)],
    )
    db.executemany(
        "INSERT INTO fts (rowid, body, tagwords) VALUES (?, ?, ?)",
        [(first + i, *_fts_columns(r["text"])) for i, r in enumerate(rows)],
    )
    if embedder is not None:
        vec = embedder([r["text"] for r in rows]).astype("<f2")
        db.execute("INSERT INTO vectors VALUES (?, ?, ?)", (first, len(rows), vec.tobytes()))
    db.execute("UPDATE meta SET value=? WHERE key='posts'", (json.dumps(first - 1 + len(rows)),))
    counts["indexed"] += len(rows)


def _link_replies(db: sqlite3.Connection) -> None:
    """to_user of a reply whose parent is in the index: the parent's author."""
    db.execute(
        "UPDATE posts SET to_user = (SELECT p.author FROM posts p WHERE p.id = posts.in_reply_to_id) "
        "WHERE in_reply_to_id IS NOT NULL AND EXISTS "
        "(SELECT 1 FROM posts p WHERE p.id = posts.in_reply_to_id AND p.author IS NOT NULL)"
    )


def _new_posts(db: sqlite3.Connection, batch: list[dict], counts: Counter) -> list[dict]:
    seen, fresh = set(), []
    ids = [str(p["id"]) for p in batch]
    known = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        known.update(r[0] for r in db.execute(f"SELECT id FROM posts WHERE id IN ({marks})", chunk))
    for p in batch:
        pid = str(p["id"])
        if pid in known or pid in seen:
            counts["skipped: already in the index"] += 1
        elif not (p.get("text") or "").strip():
            counts["skipped: empty text"] += 1
        else:
            seen.add(pid)
            fresh.append(p)
    return fresh


def _write(
    db: sqlite3.Connection, posts: Iterator[dict], total: int | None, embedder, counts: Counter
) -> None:
    with Progress("index", total=total, unit="posts") as bar:
        batch: list[dict] = []
        for post in posts:
            batch.append(post)
            if len(batch) == BATCH:
                _insert(db, _new_posts(db, batch, counts), embedder, counts)
                bar.advance(len(batch))
                batch = []
        if batch:
            _insert(db, _new_posts(db, batch, counts), embedder, counts)
            bar.advance(len(batch))
    _link_replies(db)


def corpus_posts(data_dir: Path) -> tuple[Iterator[dict], int]:
    corpus = data_dir / "corpus.parquet"
    if not corpus.is_file():
        raise SearchIndexError(
            f"{data_dir}: no corpus.parquet; prepare the data first with `myna data prepare`"
        )
    pf = pq.ParquetFile(corpus)

    def posts() -> Iterator[dict]:
        for batch in pf.iter_batches(batch_size=BATCH):
            yield from batch.to_pylist()

    return posts(), pf.metadata.num_rows


def build(data_dir: str | Path, out: str | Path, ckpt: str | Path | None = None) -> dict:
    """`myna index build`: index a prepared corpus (with the run's embeddings when ckpt is given)."""
    posts, total = corpus_posts(Path(data_dir))
    return write_index(posts, total, out, Embedder.load(ckpt) if ckpt else None)


def write_index(posts: Iterable[dict], total: int | None, out: str | Path, embedder=None) -> dict:
    """A new index of the posts in `out`, replacing what was there only once it is whole. `embedder` is anything
    with Embedder's ckpt, fingerprint, dim and __call__ (benchmarks pass reference models)."""
    from myna.io import atomic_dir, remove_stale_temps

    out = Path(out)
    remove_stale_temps(out)
    counts: Counter = Counter()
    with atomic_dir(out) as tmp:
        db = _create(tmp / DB_NAME, embedder)
        with db:
            _write(db, iter(posts), total, embedder, counts)
        db.execute("VACUUM")
        db.close()
    log(f"index: {counts['indexed']:,} posts into {out}" + _skipped(counts))
    return dict(counts)


def add(index: str | Path, inputs: list[str | Path], ckpt: str | Path | None = None) -> dict:
    """`myna index add`: read new posts from files of any format Myna reads and add them in one transaction.

    Unreadable records are counted by reason (and listed in INDEX/rejects.jsonl); posts already in the index
    are skipped. The model that embedded the index embeds the new posts; a different one is refused.
    """
    index = Path(index)
    current = SearchIndex.open(index)
    meta = current.meta
    current.db.close()
    embedder = load_embedder(index, meta, ckpt)
    counts: Counter = Counter()
    rejects: list[Reject] = []

    def posts() -> Iterator[dict]:
        for path in inputs:
            try:
                readers.check_readable(path)
                for item in readers.read_posts(path):
                    if isinstance(item, Reject):
                        rejects.append(item)
                        counts[f"rejected: {item.reason}"] += 1
                    else:
                        yield item
            except (OSError, ValueError) as e:  # unreadable, or no format Myna reads
                raise SearchIndexError(f"{path}: {e}") from None

    db = sqlite3.connect(index / DB_NAME)
    try:
        with db:  # one transaction: all of the new posts or none
            _write(db, posts(), None, embedder, counts)
    finally:
        db.close()
    if rejects:
        with open(index / "rejects.jsonl", "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r.to_dict()) + "\n" for r in rejects)
    log(f"index: added {counts['indexed']:,} posts to {index}" + _skipped(counts))
    return dict(counts)


def _skipped(counts: Counter) -> str:
    rest = {k: v for k, v in counts.items() if k != "indexed"}
    return "".join(f"; {v:,} {k}" for k, v in sorted(rest.items()))
