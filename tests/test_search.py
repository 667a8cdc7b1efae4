"""Search: terms, query operators, the index (build, add, crash safety) and ranking, on real parts: the sample
corpus, the tiny base model's embeddings, and hand-made posts with the fields the operators read."""

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import myna

from myna.infer.engine import Engine
from myna.runs import load_model
from myna.search import index as search_index
from myna.search import rank, vectors
from myna.search.ask import ask, check_citations, messages, question_query
from myna.search.index import SearchIndex, SearchIndexError, load_embedder, write_index
from myna.search.query import QueryError, parse
from myna.search.rank import RankSettings, diversify, search
from myna.search.relevance import evaluate, make_tasks, ndcg_at, recall_at, tag_words
from myna.search.terms import terms

POSTS = [  # id, author, time, text, likes, reposts, replies, extra fields
    (
        "p1",
        "alice",
        "2024-03-01T10:00:00Z",
        "Loving the new #python release 🐍 https://python.org",
        50,
        10,
        3,
        {},
    ),
    (
        "p2",
        "bob",
        "2024-03-01T11:00:00Z",
        "@alice the python release is great",
        2,
        0,
        0,
        {"in_reply_to_id": "p1"},
    ),
    ("p3", "carol", "2024-03-02T09:00:00Z", "python snakes are not a release", 0, 0, 0, {}),
    (
        "p4",
        "dave",
        "2024-03-02T12:00:00Z",
        "RT @alice: Loving the new #python release",
        0,
        0,
        0,
        {"repost_of_id": "p1"},
    ),
    ("p5", "erin", "2024-03-03T08:00:00Z", "東京で地震が発生しました", 5, 1, 0, {"lang": "ja"}),
    ("p6", "alice", "2024-03-03T09:00:00Z", "python tip: use pathlib", 1, 0, 0, {}),
    ("p7", "alice", "2024-03-03T10:00:00Z", "python tip: use dataclasses", 1, 0, 0, {}),
    ("p8", "alice", "2024-03-03T11:00:00Z", "python tip: use f-strings", 1, 0, 0, {}),
    ("p9", "frank", "2024-02-01T11:00:00Z", "python tip from frank: read the docs", 0, 0, 0, {}),
]


def write_posts(path: Path, rows=POSTS) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for pid, author, t, text, likes, reposts, replies, extra in rows:
            rec = {
                "id": pid,
                "author_id": author,
                "created_at": t,
                "text": text,
                "like_count": likes,
                "source": "t",
            }
            rec.update(repost_count=reposts, reply_count=replies, lang=extra.pop("lang", "en"), **extra)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def built(sample_data: Path, base_run: Path, tmp_path_factory) -> Path:
    """The sample corpus embedded by the tiny base, plus the hand-made posts added."""
    out = tmp_path_factory.mktemp("search") / "idx"
    counts = search_index.build(sample_data, out, base_run)
    assert counts["indexed"] > 4000
    posts = write_posts(out.parent / "posts.jsonl")
    added = search_index.add(out, [posts])
    assert added["indexed"] == len(POSTS)
    return out


@pytest.fixture(scope="module")
def opened(built: Path):
    idx = SearchIndex.open(built)
    return idx, load_embedder(idx.path, idx.meta)


def ids(results) -> list[str]:
    return [h.post["id"] for h in results.hits]


def test_terms_keep_tags_mentions_emoji_and_cjk():
    assert terms("Loving #Python and @Guido_vR! 👍🏽 https://x.co/a") == [
        "loving",
        "#python",
        "and",
        "@guido_vr",
        "👍",
    ]
    assert terms("東京で地震") == ["東京", "京で", "で地", "地震"]
    assert terms("CAFÉ café") == ["café", "café"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("bogus:1 x", "unknown operator 'bogus:'"),
        ("since:2024-13-01", "expected a date YYYY-MM-DD"),
        ("min_faves:lots", "expected a whole number"),
        ("filter:images", "expected filter:replies or filter:links"),
        ('"open phrase', "phrase is not closed"),
        ("a OR", "OR needs"),
        ("from:a from:b", "join from: values with OR"),
        ("since:2024-02-01 until:2024-01-01", "nothing can match"),
        ("-from:alice", "only filter: can be negated"),
    ],
)
def test_malformed_queries_are_named(text, message):
    with pytest.raises(QueryError, match=message):
        parse(text)


def test_query_parses_every_operator():
    q = parse(
        '"new york" pizza OR pasta -pineapple #food @bob from:alice OR from:Bob to:carol since:2024-01-01 '
        "until:2024-02-01 lang:EN min_faves:10 min_retweets:2 min_replies:1 -filter:replies filter:links update:"
    )
    assert [[p.terms for p in c.options] for c in q.must] == [
        [("new", "york")],
        [("pizza",), ("pasta",)],
        [("#food",)],
        [("@bob",)],
        [("update",)],
    ]
    assert [p.terms for p in q.must_not] == [("pineapple",)]
    f = q.filters
    assert (f.from_users, f.to_users, f.lang, f.min_faves, f.min_retweets, f.min_replies) == (
        ["alice", "bob"],
        ["carol"],
        "en",
        10,
        2,
        1,
    )
    assert (f.replies, f.links, f.since.day, f.until.month) == (False, True, 1, 2)


def latest(idx, q: str) -> list[str]:
    """Newest first among the hand-made posts (the sample's posts have no time, so since: leaves them out)."""
    return ids(search(idx, q if "since:" in q else q + " since:2024-01-01", order="latest"))


def test_operators_filter(opened):
    idx, _ = opened
    assert latest(idx, "#python") == ["p4", "p1"]  # the tag, not the word
    assert set(latest(idx, "python release")) == {"p4", "p3", "p2", "p1"}
    assert latest(idx, '"python release"') == ["p2"]
    assert latest(idx, "python release -snakes from:alice OR from:bob") == ["p2", "p1"]
    assert latest(idx, "@alice") == ["p4", "p2"]
    assert latest(idx, "to:alice") == ["p2"]  # the parent's author
    assert latest(idx, "python filter:replies") == ["p2"]
    assert "p2" not in latest(idx, "python -filter:replies")
    assert latest(idx, "python filter:links") == ["p1"]
    assert latest(idx, "python min_faves:10 min_retweets:10") == ["p1"]
    assert latest(idx, "python since:2024-03-02 until:2024-03-03") == ["p4", "p3"]
    assert latest(idx, "地震 lang:ja") == ["p5"]
    assert latest(idx, "🐍") == ["p1"]
    assert latest(idx, "from:frank") == ["p9"]  # operators alone


def test_top_collapses_reposts_spreads_authors_and_explains(opened):
    idx, embedder = opened
    r = search(idx, "python", embedder=embedder, limit=50)
    got = ids(r)
    assert "p4" not in got and "p1" in got  # the repost folded into its original
    p1 = r.hits[got.index("p1")]
    assert p1.collapsed == ["p4"]
    assert {"bm25", "rrf", "text", "likes", "reposts", "age_decay"} <= set(p1.parts)
    authors = [h.post["author"] for h in r.hits]
    assert not any(
        a is not None and a == b == c for a, b, c in zip(authors, authors[1:], authors[2:], strict=False)
    )
    assert r.retrievers == ["bm25", "dense"]
    assert [p1.post["text"][s:e] for s, e in p1.highlights] == ["#python"]  # the word marks the tag too


def test_dense_finds_posts_without_the_words(opened):
    idx, embedder = opened
    r = search(idx, "python release", embedder=embedder, limit=200)
    lexical = set(ids(search(idx, "python release", order="latest", limit=200)))
    assert set(ids(r)) - lexical, "dense retrieval added nothing beyond the posts holding the words"
    dense_only = [h for h in r.hits if "bm25" not in h.parts]
    assert all("dense" in h.parts for h in dense_only)


def test_diversify_caps_runs_of_one_author():
    class H:
        def __init__(self, a):
            self.post = {"author": a}

    order = [h.post["author"] for h in diversify([H("a"), H("a"), H("a"), H("b"), H("a")], 2)]
    assert order == ["a", "a", "b", "a", "a"]


def test_rank_settings_change_the_order(opened):
    idx, _ = opened
    q = "python since:2024-01-01"
    by_likes = search(idx, q, settings=RankSettings(w_text=0.0, w_likes=5.0, w_reposts=0.0))
    assert ids(by_likes)[0] == "p1" and by_likes.hits[0].parts["likes"] == pytest.approx(
        5 * math.log2(51), abs=1e-3
    )
    by_text = search(
        idx,
        q,
        settings=RankSettings(
            w_likes=0.0,
            w_reposts=0.0,
            w_replies=0.0,
            w_link=0.0,
            w_reply_flag=0.0,
            decay_floor=1.0,
            max_run=9,
        ),
    )
    assert [h.parts["bm25"]["rank"] for h in by_text.hits[:3]] == [1, 2, 3]


def test_add_skips_known_posts_and_counts_rejects(built: Path, opened, tmp_path: Path):
    """An add skips what the index has and counts bad records; an index opened before it (as a server holds
    one) finds the new post at its next query, lexically, densely and under the in-memory filters."""
    idx, embedder = opened
    bad = tmp_path / "more.jsonl"
    good = {"id": "n1", "text": "a brand new post about #python", "author_id": "9001", "author_name": "Zed"}
    bad.write_text(json.dumps(good) + "\n{not json\n" + json.dumps(POST_P1) + "\n", encoding="utf-8")
    before = SearchIndex.open(built).size
    counts = search_index.add(built, [bad])
    assert counts["indexed"] == 1 and counts["skipped: already in the index"] == 1
    assert sum(v for k, v in counts.items() if k.startswith("rejected")) == 1
    assert SearchIndex.open(built).size == before + 1
    assert "more.jsonl" in (built / "rejects.jsonl").read_text(encoding="utf-8")

    assert "n1" in ids(search(idx, "brand new -filter:links", embedder=embedder))
    assert idx.size == len(idx.vectors) == len(idx.signals.likes) == before + 1
    densely = rank.dense(idx, parse("a brand new post about python -filter:replies"), embedder, idx.size)
    assert idx.size in {r for r, _ in densely}
    # from: takes the screen name people see, or the numeric id; results show the name
    for who in ("zed", "Zed", "9001"):
        assert ids(search(idx, f"brand new from:{who}", embedder=embedder)) == ["n1"], who
    assert search(idx, "brand new from:zed", embedder=embedder).hits[0].post["author"] == "zed"


POST_P1 = {"id": "p1", "text": "dup"}


def test_index_errors_are_one_line(tmp_path: Path, built: Path, sft_run: Path):
    with pytest.raises(SearchIndexError, match="not a search index"):
        SearchIndex.open(tmp_path)
    with pytest.raises(SearchIndexError, match="no corpus.parquet"):
        search_index.build(tmp_path, tmp_path / "idx")
    with pytest.raises(SearchIndexError, match="rebuild the index to change models"):
        search_index.add(built, [], ckpt=sft_run)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(SearchIndexError, match="not a readable search index"):
        SearchIndex.open(tmp_path / "bad")
    r = myna("search", "--index", str(built), "--lexical", "min_faves:many")
    assert r.returncode != 0 and "expected a whole number" in r.stderr and "Traceback" not in r.stderr


def test_killed_add_leaves_the_last_good_index(sample_data: Path, tmp_path: Path):
    out = tmp_path / "idx"
    search_index.build(sample_data, out)  # lexical: quick
    before = SearchIndex.open(out).size
    many = tmp_path / "many.jsonl"
    with open(many, "w", encoding="utf-8") as f:
        for i in range(200_000):
            f.write(json.dumps({"id": f"m{i}", "text": f"post number {i} about the weather"}) + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "myna", "index", "add", str(out), str(many)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    journal = out / "index.sqlite-journal"
    deadline = time.time() + 60
    while not journal.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # well inside the transaction: 200k posts take several seconds
    assert proc.poll() is None, "the add finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    idx = SearchIndex.open(out)
    assert idx.size == before
    assert idx.db.execute("SELECT count(*) FROM posts").fetchone()[0] == before
    assert idx.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert search(idx, "weather number", order="latest").hits == []


def test_cli_build_search_json(sample_data: Path, base_run: Path, tmp_path: Path):
    out = tmp_path / "idx"
    r = myna("index", "build", "--data", str(sample_data), "--ckpt", str(base_run), "--out", str(out))
    assert r.returncode == 0, r.stderr
    r = myna("search", "--index", str(out), "--json", "-n", "5", "love")
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)["hits"]
    assert len(hits) == 5 and all({"post", "score", "parts", "highlights"} <= set(h) for h in hits)
    r = myna("search", "--index", str(out), "--explain", "-n", "2", "love")
    assert r.returncode == 0 and "rrf=" in r.stdout and "age_decay" in r.stdout
    with sqlite3.connect(out / "index.sqlite") as db:
        assert db.execute("SELECT count(*) FROM vectors").fetchone()[0] > 0


def test_citations_of_posts_not_retrieved_are_removed():
    text, cited, removed = check_citations("Floods [2] close roads [7], [3, 9] and [1].", 3)
    assert (text, cited, removed) == ("Floods [2] close roads , [3] and [1].", [2, 3, 1], 2)


def test_question_becomes_a_query():
    assert question_query("What are people saying about the floods in #Calgary from:cbc?") == (
        '"floods" OR "#calgary" from:cbc'
    )


def test_ask_answers_from_retrieved_posts(opened, sft_run: Path, built: Path):
    idx, embedder = opened
    loaded = load_model(sft_run)
    with Engine(loaded.model, loaded.tokenizer, max_batch=1) as engine:
        a = ask(idx, "what do people say about the python release?", engine, embedder, max_tokens=24)
    assert a.query == '"python" OR "release"'
    assert 1 <= len(a.posts) <= 5 and a.finish_reason in ("stop", "length")
    assert all(1 <= n <= len(a.posts) for n in a.cited)
    context = messages(a.question, a.query, a.posts)
    assert context[2]["tool_calls"][0]["arguments"] == {"query": a.query}
    assert "[1] @" in context[3]["content"]
    r = myna(
        "ask", "--index", str(built), "--ckpt", str(sft_run), "--json", "--max-tokens", "8", "python release"
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["posts"] and {"answer", "citations", "removed_citations"} <= set(out)


def test_hashtag_relevance_tasks_and_metrics(tmp_path: Path):
    assert tag_words("PrayForVisayas") == "pray for visayas" and tag_words("yycflood") == "yycflood"
    assert tag_words("COVID19") == "covid 19"
    posts = [{"id": f"f{i}", "text": f"water rising on main street #BigFlood day {i}"} for i in range(4)]
    posts += [{"id": f"o{i}", "text": f"sunny and quiet, big plans for day {i}"} for i in range(30)]
    posts += [{"id": "x", "text": "#BigFlood"}]
    stripped, tasks = make_tasks(posts)
    assert [(t.tag, t.query, len(t.relevant)) for t in tasks] == [("bigflood", "big flood", 5)]
    assert not any("#" in p["text"] for p in stripped) and stripped[-1]["text"] == "."
    assert ndcg_at(["a", "b"], {"a"}) == 1.0 and ndcg_at(["b", "a"], {"a"}) == pytest.approx(1 / math.log2(3))
    assert recall_at(["a", "b", "c"], {"a", "z"}, k=2) == 0.5
    write_index(stripped, len(stripped), tmp_path / "idx")
    scores = evaluate(SearchIndex.open(tmp_path / "idx"), tasks)
    # "big flood" as words: BM25 finds only what the tag's words still match ("big" in the sunny posts)
    assert (
        set(scores) == {"bm25"} and 0 <= scores["bm25"]["ndcg@10"] < 1 and scores["bm25"]["recall@100"] == 0
    )


def test_approximate_vector_index_recall_and_constraints(built: Path, opened, monkeypatch):
    """The IVF path, forced on the small index: recall@10 against exact search, and dense retrieval under
    constraints (widening through the lists, and scoring the few posts a selective query allows) returns only
    posts that pass them, as many as exact search does."""
    _, embedder = opened
    monkeypatch.setattr(vectors, "POSTS_PER_LIST", 64)  # some 70 lists of the ~4,500 posts
    idx = SearchIndex.open(built)
    exact = idx.vector_index
    approximate = vectors.VectorIndex(idx.vectors, approximate_from=1000)
    assert exact.ivf is None and approximate.ivf is not None and approximate.ivf.nlist > 40
    texts = [p["text"] for p in idx.rows(range(1, idx.size + 1, 97)).values()]
    recall = [
        len(set(approximate.search(v, 10)[0].tolist()) & set(exact.search(v, 10)[0].tolist())) / 10
        for v in embedder(texts)
    ]
    assert np.mean(recall) >= 0.95
    deep, _ = approximate.search(embedder(["love"])[0], idx.size)  # past half the lists: exact, all of them
    assert sorted(deep.tolist()) == list(range(1, idx.size + 1))

    checks = {  # query -> what every post it returns must satisfy
        "love -filter:replies": lambda p: not p["is_reply"],
        "love -the": lambda p: "the" not in terms(p["text"]),
        "python from:alice": lambda p: p["author"] == "alice",
        "#python": lambda p: "#python" in terms(p["text"]),
    }
    monkeypatch.setattr(rank, "FEW_ALLOWED", 3)  # the first two widen through the IVF lists
    for text, passes in checks.items():
        found = {}
        for name, backend in (("exact", exact), ("approximate", approximate)):
            idx.vector_index = backend
            found[name] = rank.dense(idx, parse(text), embedder, 50)
        rows = idx.rows(r for r, _ in found["approximate"])
        assert all(passes(rows[r]) for r, _ in found["approximate"]), text
        assert len(found["approximate"]) == len(found["exact"]), text
        overlap = {r for r, _ in found["approximate"][:10]} & {r for r, _ in found["exact"][:10]}
        assert len(overlap) >= 0.8 * min(10, len(found["exact"])), text


@pytest.mark.parametrize(
    "text",
    [
        "since:2024-03-02",
        "until:2024-03-02",
        "since:2024-03-01 until:2024-03-03",
        "lang:ja",
        "lang:xx",
        "min_faves:2 min_retweets:1",
        "min_replies:3",
        "filter:replies",
        "-filter:replies -filter:links",
        "filter:links since:2013-06-01",
    ],
)
def test_signals_mask_is_what_sql_filters_select(opened, text):
    """The in-memory filters dense retrieval uses select exactly the posts the SQL filters do (undated posts,
    and languages the index has never seen, included)."""
    idx, _ = opened
    idx.refresh()  # another test may have added a post since it was opened
    q = parse(text)
    where, args = rank.sql_filters(q)
    by_sql = {r[0] for r in idx.db.execute(f"SELECT p.rowid FROM posts p WHERE {where}", args)}
    by_mask = set((np.flatnonzero(idx.signals.mask(q.filters)) + 1).tolist())
    assert by_mask == by_sql and 0 < len(by_sql) < idx.size or text == "lang:xx" and not by_sql
