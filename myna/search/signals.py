"""The per-post numbers that filters test, held in memory as arrays (Earlybird keeps such "column stride fields").

Dense retrieval asks of each nearest post whether it passes `since:`, `min_faves:`, `-filter:replies` and the like;
asking SQLite one batch of posts at a time cost more than the vector search itself at 1M posts. A boolean mask over
all posts costs a millisecond and goes into the vector search, which then skips the posts it leaves out. Arrays are
read from the index's posts table when it is opened (about 40 bytes a post).
"""

import sqlite3

import numpy as np

from myna.search.query import Filters

# created_at of a post without a time: before every since:, before every until:
NO_TIME = np.iinfo(np.int64).min


class Signals:
    """Row i holds post rowid i + 1 (rowids are 1..N, as the vectors' rows)."""

    def __init__(self, db: sqlite3.Connection, size: int):
        cols = "created_at, lang, likes, reposts, replies, is_reply, has_link"
        rows = db.execute(f"SELECT {cols} FROM posts ORDER BY rowid").fetchall()
        if len(rows) != size:
            raise ValueError(f"{len(rows)} posts in the posts table, the index's meta says {size}")
        created, langs, *numbers = zip(*rows, strict=True) if rows else ((),) * 7
        self.created_at = np.array([NO_TIME if t is None else t for t in created], dtype=np.int64)
        self.lang_names, self.lang = np.unique(
            np.array([x or "" for x in langs], dtype=object), return_inverse=True
        )
        self.likes, self.reposts, self.replies = (np.array(c, dtype=np.int64) for c in numbers[:3])
        self.is_reply, self.has_link = (np.array(c, dtype=bool) for c in numbers[3:])

    def mask(self, f: Filters) -> np.ndarray | None:
        """Which posts pass the filters on these numbers (from: and to: aside); None when there are none."""
        tests = []
        if f.since:
            tests.append(self.created_at >= int(f.since.timestamp()))
        if f.until:
            tests.append((self.created_at < int(f.until.timestamp())) & (self.created_at != NO_TIME))
        if f.lang:
            code = np.flatnonzero(self.lang_names == f.lang)
            tests.append(self.lang == code[0] if len(code) else np.zeros(len(self.lang), bool))
        for column, value in (
            (self.likes, f.min_faves),
            (self.reposts, f.min_retweets),
            (self.replies, f.min_replies),
        ):
            if value:
                tests.append(column >= value)
        if f.replies is not None:
            tests.append(self.is_reply == f.replies)
        if f.links is not None:
            tests.append(self.has_link == f.links)
        return np.logical_and.reduce(tests) if tests else None
