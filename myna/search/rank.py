"""Social search over an index: candidates from BM25 and the model's embeddings, fused, then ranked like a feed.

Top (relevance):
  1. candidates: BM25 over the search terms (every word, phrase, #tag and @mention must match), and the posts
     nearest to the query's embedding that pass the query's hard constraints (operators, exclusions, tags,
     mentions and phrases; plain words are soft, so dense retrieval finds posts that say it differently);
  2. fusion: reciprocal rank fusion of the two lists;
  3. rescoring with the signals of Twitter's open-sourced Earlybird ranker: a linear sum of the text score and
     log engagement counts, reply and link flags, times an age decay;
  4. reposts collapsed into their original; at most MAX_RUN results in a row from one author.
Latest: every post that matches the terms and operators, newest first.
"""

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from myna.search.index import Embedder, SearchIndex, SearchIndexError
from myna.search.query import Phrase, Query, parse
from myna.search.terms import term_spans


@dataclass
class RankSettings:
    """Every weight of Top, with why it is what it is."""

    candidates: int = 200  # per retriever: enough for a first page after filters, cheap to rescore
    rrf_k: int = 60  # reciprocal rank fusion's constant (Cormack et al. 2009): damps the head of each list
    w_dense: float = 1.0  # dense list's weight (BM25's is 1): 0.25..2 moved hashtag nDCG@10 by <= 0.01
    w_text: float = 10.0  # the fused relevance dominates: engagement reorders near-ties, never buries a match
    w_likes: float = 0.5  # per log2(1 + likes): Earlybird counts favourites, on a log scale
    w_reposts: float = 0.7  # reposts spread a post further than likes do, so they weigh more
    w_replies: float = 0.3  # replies are engagement too, but also arguments: the smallest weight
    w_reply_flag: float = -0.5  # a reply out of its thread is less useful than a post that stands alone
    w_link: float = 0.2  # a link usually carries the news itself
    half_life_hours: float = 6.0  # Earlybird's default age half-life (360 minutes)
    decay_floor: float = 0.5  # old posts keep half their score: archives must stay searchable, not only news
    max_run: int = 2  # Earlybird's limit of consecutive results by one author


# BM25 ranks a query's most recently indexed matches, this many: each costs FTS5 microseconds
MAX_RANKED = 1000
FEW_RANKED = 32  # FTS5 scores a set of posts given by rowid at about a millisecond each
FEW_ALLOWED = 10_000  # dense search scores the posts a query's constraints allow when they are this few


@dataclass
class Hit:
    rowid: int
    post: dict
    score: float
    parts: dict = field(default_factory=dict)  # the score's parts, for --explain
    highlights: list = field(default_factory=list)  # [start, end) character spans of matched terms
    collapsed: list = field(default_factory=list)  # ids of reposts folded into this original

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Results:
    query: str
    order: str
    hits: list[Hit]
    total_candidates: int
    retrievers: list[str]


# --- the FTS5 expression and the SQL filters a query compiles to ---


def _fts_phrase(p: Phrase) -> str:
    quoted = '"' + " ".join(p.terms) + '"'  # terms never hold '"': see myna.search.terms
    return f"body : {quoted}" if p.tag_or_mention else f"{{body tagwords}} : {quoted}"


def fts_expression(q: Query, hard_only: bool = False) -> str | None:
    """The MATCH expression for a query's clauses (None when it has none). hard_only keeps the clauses dense
    candidates must satisfy too: tags, mentions and phrases of several words."""
    clauses = []
    for c in q.must:
        if hard_only and not all(p.tag_or_mention or len(p.terms) > 1 for p in c.options):
            continue
        clauses.append("(" + " OR ".join(_fts_phrase(p) for p in c.options) + ")")
    if not clauses:
        return None
    expr = " AND ".join(clauses)
    for p in q.must_not:
        expr = f"({expr}) NOT {_fts_phrase(p)}"
    return expr


def sql_filters(q: Query, people_only: bool = False) -> tuple[str, list]:
    """SQL over `posts p` for the query's filters; people_only: from: and to: alone (Signals tests the rest)."""
    f, where, args = q.filters, [], []
    if f.from_users:
        marks = ",".join("?" * len(f.from_users))
        where.append(f"(p.author IN ({marks}) OR p.author_id IN ({marks}))")  # a screen name or an id
        args += f.from_users * 2
    if f.to_users:
        where.append(f"p.to_user IN ({','.join('?' * len(f.to_users))})")
        args += f.to_users
    if people_only:
        return " AND ".join(where) or "1", args
    if f.since:
        where.append("p.created_at >= ?")
        args.append(int(f.since.timestamp()))
    if f.until:
        where.append("p.created_at < ?")
        args.append(int(f.until.timestamp()))
    if f.lang:
        where.append("p.lang = ?")
        args.append(f.lang)
    for column, value in (("likes", f.min_faves), ("reposts", f.min_retweets), ("replies", f.min_replies)):
        if value:
            where.append(f"p.{column} >= ?")
            args.append(value)
    if f.replies is not None:
        where.append(f"p.is_reply = {int(f.replies)}")
    if f.links is not None:
        where.append(f"p.has_link = {int(f.links)}")
    return " AND ".join(where) or "1", args


def _excluded_expression(q: Query) -> str:
    """The MATCH expression of the posts the query excludes ("" when it excludes none)."""
    return " OR ".join(_fts_phrase(p) for p in q.must_not)


def _exclusions(q: Query) -> tuple[str, list]:
    """SQL that drops posts matching an exclusion, for candidates that did not come through the FTS expression."""
    if not q.must_not:
        return "1", []
    return "p.rowid NOT IN (SELECT rowid FROM fts WHERE fts MATCH ?)", [_excluded_expression(q)]


# --- retrievers ---


def lexical(index: SearchIndex, q: Query, limit: int, latest: bool = False) -> list[tuple[int, float]]:
    """(rowid, bm25) best first (bm25 from FTS5 is negative: lower is better), or newest first when latest."""
    expr = fts_expression(q)
    where, args = sql_filters(q)
    if expr is None:  # operators and exclusions only: no text to score
        excl, eargs = _exclusions(q)
        sql = f"SELECT p.rowid, 0.0 FROM posts p WHERE {where} AND {excl} ORDER BY p.created_at DESC LIMIT ?"
        return index.db.execute(sql, [*args, *eargs, limit]).fetchall()
    if not latest and (found := _people_first(index, q, expr, where, args, limit)) is not None:
        return found
    if not latest:
        # FTS5 walks the matches newest first, the filters drop some, and BM25 scores only the first MAX_RANKED
        # left: ORDER BY rank alone would score every match (a second for a common word at 1M posts)
        join = "" if where == "1" else "JOIN posts p ON p.rowid = f.rowid "
        sql = (
            f"SELECT r, s FROM (SELECT f.rowid AS r, f.rank AS s FROM fts f {join}WHERE fts MATCH ? AND {where} "
            "ORDER BY f.rowid DESC LIMIT ?) ORDER BY s LIMIT ?"
        )
        return index.db.execute(sql, [expr, *args, MAX_RANKED, limit]).fetchall()
    # MATERIALIZED keeps the MATCH on the FTS index instead of letting the join turn it into a scan
    sql = (
        "WITH m AS MATERIALIZED (SELECT rowid, rank AS s FROM fts WHERE fts MATCH ?) "
        f"SELECT m.rowid, m.s FROM m JOIN posts p ON p.rowid = m.rowid WHERE {where} "
        "ORDER BY p.created_at DESC LIMIT ?"
    )
    return index.db.execute(sql, [expr, *args, limit]).fetchall()


def _people_first(index: SearchIndex, q: Query, expr: str, where: str, args: list, limit: int):
    """from:/to: someone whose posts match few times: those posts, by intersecting rowid sets, then ranked. Walking
    a common word's matches newest first, each joined to its post, took 50 ms at 1M posts to find a handful.
    None when the query has no from:/to: or the intersection is not small."""
    if not (q.filters.from_users or q.filters.to_users):
        return None
    theirs = {
        r[0]
        for r in index.db.execute(
            f"SELECT p.rowid FROM posts p WHERE {where} LIMIT ?", [*args, FEW_ALLOWED + 1]
        )
    }
    if len(theirs) > FEW_ALLOWED:
        return None
    both = [
        r[0] for r in index.db.execute("SELECT rowid FROM fts WHERE fts MATCH ?", [expr]) if r[0] in theirs
    ]
    if len(both) > FEW_RANKED:
        return None
    marks = ",".join("?" * len(both))
    sql = f"SELECT rowid, rank FROM fts WHERE fts MATCH ? AND rowid IN ({marks}) ORDER BY rank LIMIT ?"
    return index.db.execute(sql, [expr, *both, limit]).fetchall()


def dense_text(q: Query) -> str:
    return " ".join(p.text for c in q.must for p in c.options)


def dense(index: SearchIndex, q: Query, embedder: Embedder, limit: int) -> list[tuple[int, float]]:
    """(rowid, cosine) best first among the posts that pass the query's hard constraints."""
    vec = embedder([dense_text(q)])[0]
    mask = index.signals.mask(q.filters)  # since:, min_faves: and the like, tested inside the vector search
    where, args = sql_filters(q, people_only=True)
    hard = fts_expression(q, hard_only=True)
    few = _allowed(index, q, where, args, hard, mask)
    if few is not None:
        rowids, scores = index.vector_index.among(vec, few, limit)  # the few posts allowed, scored exactly
        return list(zip(rowids.tolist(), scores.tolist(), strict=True))
    constrained = where != "1" or q.must_not or hard
    # the posts that match the tags and phrases, and those that match an exclusion, read once: FTS5 is slow to
    # test one post at a time against a common word
    required = _matching(index, hard)
    excluded = _matching(index, _excluded_expression(q)) or set()
    fetch = limit * 4 if constrained else limit
    while True:  # widen the net until enough candidates pass the constraints, or all were seen
        rowids, scores = index.vector_index.search(vec, fetch, allowed=mask)
        found = list(zip(rowids.tolist(), scores.tolist(), strict=True))
        if constrained:
            keep = _passing(index, [r for r, _ in found], where, args, required, excluded)
            found = [(r, s) for r, s in found if r in keep]
        if len(found) >= limit or fetch >= len(index.vectors):
            return found[:limit]
        fetch *= 4


def _allowed(
    index: SearchIndex, q: Query, where: str, args: list, hard: str | None, mask
) -> list[int] | None:
    """Every post that passes the constraints when at most FEW_ALLOWED do, else None: a search for a tag, a
    mention or one author's posts scores the few it allows, where widening would walk most of the index."""
    if mask is not None and mask.sum() <= FEW_ALLOWED:
        rowids = np.flatnonzero(mask) + 1
        if where != "1":
            rowids = _passing(index, rowids.tolist(), where, args, None, set())
        excluded = _matching(index, _excluded_expression(q)) or set()
        required = _matching(index, hard)
        return [int(r) for r in rowids if r not in excluded and (required is None or r in required)]
    if where == "1" and not hard:
        return None
    excl, eargs = _exclusions(q)
    if hard and where == "1" and excl == "1":
        sql, params = "SELECT rowid FROM fts WHERE fts MATCH ? LIMIT ?", [hard]
    elif hard:
        sql = (
            "WITH m AS MATERIALIZED (SELECT rowid FROM fts WHERE fts MATCH ?) "
            f"SELECT p.rowid FROM m JOIN posts p ON p.rowid = m.rowid WHERE {where} AND {excl} LIMIT ?"
        )
        params = [hard, *args, *eargs]
    else:
        sql, params = f"SELECT p.rowid FROM posts p WHERE {where} AND {excl} LIMIT ?", [*args, *eargs]
    rowids = [r[0] for r in index.db.execute(sql, [*params, FEW_ALLOWED + 1])]
    if len(rowids) > FEW_ALLOWED:
        return None
    return rowids if mask is None else [r for r in rowids if r <= len(mask) and mask[r - 1]]  # r: added since


def _matching(index: SearchIndex, expr: str | None) -> set[int] | None:
    if not expr:
        return None
    return {r[0] for r in index.db.execute("SELECT rowid FROM fts WHERE fts MATCH ?", [expr])}


def _passing(index: SearchIndex, rowids: list[int], where, args, required, excluded) -> set[int]:
    rowids = [r for r in rowids if r not in excluded and (required is None or r in required)]
    if where == "1":
        return set(rowids)
    keep: set[int] = set()
    for start in range(0, len(rowids), 500):
        chunk = rowids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        sql = f"SELECT p.rowid FROM posts p WHERE p.rowid IN ({marks}) AND {where}"
        keep.update(r[0] for r in index.db.execute(sql, [*chunk, *args]))
    return keep


# --- ranking ---


def rrf(lists: dict[str, list[tuple[int, float]]], k: int, weights: dict[str, float]) -> dict[int, dict]:
    """rowid -> {retriever: (rank, raw score), "rrf": fused} over the candidate lists (weighted RRF)."""
    fused: dict[int, dict] = {}
    for name, ranked in lists.items():
        for rank, (rowid, raw) in enumerate(ranked, start=1):
            entry = fused.setdefault(rowid, {"rrf": 0.0})
            entry[name] = {"rank": rank, "score": round(raw, 6)}
            entry["rrf"] += weights[name] / (k + rank)
    return fused


def social_score(post: dict, text: float, now: int | None, s: RankSettings) -> tuple[float, dict]:
    """Earlybird's linear score times its age decay; returns (score, parts)."""
    parts = {
        "text": s.w_text * text,
        "likes": s.w_likes * math.log2(1 + max(post["likes"], 0)),
        "reposts": s.w_reposts * math.log2(1 + max(post["reposts"], 0)),
        "replies": s.w_replies * math.log2(1 + max(post["replies"], 0)),
        "reply_flag": s.w_reply_flag * post["is_reply"],
        "link": s.w_link * post["has_link"],
    }
    linear = sum(parts.values())
    decay = s.decay_floor  # a post of unknown age is not fresh: it never outranks dated posts by its age
    if now is not None and post["created_at"] is not None:
        age_hours = max(now - post["created_at"], 0) / 3600
        decay = s.decay_floor + (1 - s.decay_floor) * 0.5 ** (age_hours / s.half_life_hours)
    parts["age_decay"] = decay
    return linear * decay, parts


def collapse_reposts(index: SearchIndex, hits: list[Hit]) -> list[Hit]:
    """A repost becomes its original (fetched when the original is in the index), shown once."""
    originals = {h.post["repost_of_id"] for h in hits if h.post["repost_of_id"]}
    by_id = {h.post["id"]: h for h in hits}
    missing = [i for i in originals if i not in by_id]
    if missing:
        marks = ",".join("?" * len(missing))
        found = index.db.execute(f"SELECT rowid FROM posts WHERE id IN ({marks})", missing).fetchall()
        for rowid, post in index.rows(r[0] for r in found).items():
            by_id[post["id"]] = Hit(rowid, post, score=-math.inf, parts={"collapsed_from_reposts": True})
    out, placed = [], set()
    for h in hits:
        target = by_id.get(h.post["repost_of_id"] or "", h)
        if target is not h:
            target.collapsed.append(h.post["id"])
            target.score = max(target.score, h.score)
        if target.post["id"] not in placed:
            placed.add(target.post["id"])
            out.append(target)
    out.sort(key=lambda h: -h.score)
    return out


def diversify(hits: list[Hit], max_run: int, limit: int | None = None) -> list[Hit]:
    """Reorder so that no more than max_run results in a row share an author (later ones wait their turn); the
    first `limit` of that order."""
    out, waiting = [], list(hits)
    while waiting and (limit is None or len(out) < limit):
        tail = [h.post["author"] for h in out[-max_run:]]
        blocked = tail[0] if len(tail) == max_run and tail[0] is not None and len(set(tail)) == 1 else None
        pick = next(
            (h for h in waiting if h.post["author"] != blocked), waiting[0]
        )  # only one author left: go on
        waiting.remove(pick)
        out.append(pick)
    return out


def highlight(text: str, q: Query) -> list[list[int]]:
    """Character spans of the text whose search terms are among the query's (case-folded, as indexed)."""
    wanted = set(q.words())
    if not wanted:
        return []
    spans = []
    for start, end, found in term_spans(text):
        found = set(found) | {
            t[1:] for t in found if t[0] == "#"
        }  # a word matches a hashtag's word, as indexed
        if found & wanted:
            spans.append([start, end])
    return spans


def search(
    index: SearchIndex,
    text: str,
    order: str = "top",
    limit: int = 20,
    embedder: Embedder | None = None,
    settings: RankSettings | None = None,
) -> Results:
    if order not in ("top", "latest"):
        raise SearchIndexError(f"order: expected 'top' or 'latest', got {order!r}")
    s = settings or RankSettings()
    q = parse(text)
    index.refresh()
    if order == "latest":
        ranked = lexical(index, q, limit, latest=True)
        rows = index.rows(r for r, _ in ranked)
        hits = [Hit(r, rows[r], 0.0, {"bm25": round(b, 4)}, highlight(rows[r]["text"], q)) for r, b in ranked]
        return Results(text, order, hits, len(ranked), ["bm25"])

    lists = {"bm25": lexical(index, q, s.candidates)}
    if q.has_text and index.vectors is not None and embedder is not None:
        lists["dense"] = dense(index, q, embedder, s.candidates)
    weights = {"bm25": 1.0, "dense": s.w_dense}
    fused = rrf(lists, s.rrf_k, weights)
    best = sum(weights[name] for name in lists) / (s.rrf_k + 1)  # a post first in every list
    now = index.db.execute("SELECT max(created_at) FROM posts").fetchone()[0]
    rows = index.rows(fused)
    hits = []
    for rowid, entry in fused.items():
        post = rows[rowid]
        text_score = entry["rrf"] / best if q.has_text else 0.0
        score, parts = social_score(post, text_score, now, s)
        parts.update({k: v for k, v in entry.items() if k != "rrf"}, rrf=round(entry["rrf"], 6))
        hits.append(Hit(rowid, post, score, parts))
    hits.sort(key=lambda h: -h.score)
    hits = diversify(collapse_reposts(index, hits), s.max_run, limit)
    for h in hits:  # the page's hits only: marking and rounding every candidate was a third of a query's time
        h.highlights = highlight(h.post["text"], q)
        h.score = round(h.score, 4)
        h.parts = {k: round(v, 4) if isinstance(v, float) and k != "rrf" else v for k, v in h.parts.items()}
    return Results(text, order, hits, len(fused), list(lists))
