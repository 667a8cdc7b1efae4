"""`myna serve --index`: POST /v1/search and POST /v1/ask on a live server on 127.0.0.1, over conftest's
serve_index (sample posts embedded by the tiny base, and helpers.COFFEE_POSTS). The served model is the SFT run, so
queries are embedded by the index's own model (the base); a server of the base itself reuses its model."""

import json
import shutil
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from live_server import KEY, LiveServer, error_of

from myna.cli import main
from myna.moderation import Policy
from myna.search.index import SearchIndexError
from myna.serve.api import create_app
from myna.serve.config import ServeConfig

QUERY = "coffee since:2024-05-01"  # only the hand-made posts have dates
POLICY = {"extends": "none", "categories": {"forbidden": {"action": "block", "terms": ["zebracorn"]}}}


@pytest.fixture(scope="module")
def live(sft_run, serve_index):
    server = LiveServer(
        create_app(sft_run, ServeConfig(api_key=KEY, index=serve_index, policy=Policy.from_dict(POLICY)))
    )
    server.wait_ready()
    yield server
    server.stop()


def post(live: LiveServer, path: str, body: dict, key: str | None = KEY):
    return live.request("POST", path, body, {"Authorization": f"Bearer {key}"} if key else {})


def test_search_top_latest_and_explain(live):
    r = post(live, "/v1/search", {"query": QUERY})
    assert r.status == 200, r.body
    top = r.json()
    assert top["object"] == "search.results" and top["order"] == "top" and top["query"] == QUERY
    assert top["retrievers"] == ["bm25", "dense"]
    ids = [p["id"] for p in top["data"]]
    assert ids[0] == "s1" and set(ids[:4]) == {"s1", "s2", "s3", "s4"}  # the most liked and reposted first
    first = top["data"][0]
    assert first["author"] == "maya" and first["created_at"] == "2024-05-01T08:00:00Z"
    assert (first["likes"], first["reposts"], first["replies"]) == (5000, 800, 40)
    # a word marks the hashtag it matches too
    assert [first["text"][a:b] for a, b in first["highlights"]] == ["coffee", "#coffee"]
    assert "parts" not in first and first["collapsed"] == []

    latest = post(live, "/v1/search", {"query": QUERY, "order": "latest", "limit": 3, "explain": True}).json()
    assert [p["id"] for p in latest["data"]] == ["s4", "s2", "s3"]  # newest first, three of them
    assert latest["retrievers"] == ["bm25"] and "bm25" in latest["data"][0]["parts"]
    explained = post(live, "/v1/search", {"query": QUERY, "explain": True}).json()["data"]
    assert [p["id"] for p in explained] == ids
    assert {"text", "likes", "reposts", "age_decay", "rrf", "bm25", "dense"} <= set(explained[0]["parts"])
    # a post without the word comes from the embeddings alone (plain words are soft there), and ranks below
    for p in explained[4:]:
        assert not p["highlights"] and "bm25" not in p["parts"] and "dense" in p["parts"]
    assert {p["author"] for p in post(live, "/v1/search", {"query": "from:maya coffee"}).json()["data"]} == {
        "maya"
    }


def test_concurrent_searches_agree(live):
    bodies = [{"query": q} for q in ("coffee", "harbour cafe", "#coffee", "tea") * 4]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda b: post(live, "/v1/search", b), bodies))
    assert all(r.status == 200 for r in replies)
    for r, again in zip(replies, replies[4:], strict=False):
        assert r.json()["data"] == again.json()["data"]


@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"query": "coffee bogus:1"}, "query", "unknown operator 'bogus:'"),
        ({"query": "coffee since:yesterday"}, "query", "expected a date YYYY-MM-DD"),
        ({"query": '"open phrase'}, "query", "phrase is not closed"),
        ({"query": ""}, "query", "non-empty string"),
        ({"query": "coffee", "sort": "top"}, "sort", "Unrecognized request argument supplied: sort"),
        ({"query": "coffee", "order": "best"}, "order", "expected 'top' or 'latest'"),
        ({"query": "coffee", "limit": 101}, "limit", "outside [1, 100]"),
        ({"query": "coffee", "explain": "yes"}, "explain", "expected true or false"),
    ],
)
def test_search_errors_name_the_field(live, body, param, message):
    r = post(live, "/v1/search", body)
    error = error_of(r)
    assert r.status == 400 and error["type"] == "invalid_request_error", error
    assert error["param"] == param and message in error["message"]


def test_search_and_ask_need_the_key(live):
    for path in ("/v1/search", "/v1/ask"):
        assert post(live, path, {"query": "coffee"}, key=None).status == 401


def test_ask_answers_from_posts_with_valid_citations(live, sft_run):
    r = post(live, "/v1/ask", {"question": "what do people say about coffee?", "k": 3, "max_tokens": 16})
    assert r.status == 200, r.body
    a = r.json()
    assert a["object"] == "search.answer" and a["model"] == sft_run.name
    assert a["query"] == '"coffee"' and a["finish_reason"] in ("stop", "length")
    assert 1 <= len(a["posts"]) <= 3 and [p["n"] for p in a["posts"]] == list(range(1, len(a["posts"]) + 1))
    assert all("coffee" in p["text"].lower() for p in a["posts"])
    for c in a["citations"]:  # every citation names a post that was retrieved
        assert a["posts"][c["n"] - 1]["id"] == c["id"]
    assert 0 < a["usage"]["completion_tokens"] <= 16 and a["myna"]["moderation"]["blocked"] is None

    # a query of its own, operators and all; a malformed one is refused like a search's
    a = post(
        live, "/v1/ask", {"question": "who likes it?", "query": "coffee from:maya", "max_tokens": 8}
    ).json()
    assert {p["author"] for p in a["posts"]} == {"maya"}
    error = error_of(post(live, "/v1/ask", {"question": "who?", "query": "coffee min_faves:many"}))
    assert error["param"] == "query" and "min_faves:many" in error["message"]
    error = error_of(post(live, "/v1/ask", {"question": "who?", "temperature": 0}))
    assert error["param"] == "temperature"
    assert error_of(post(live, "/v1/ask", {"question": " "}))["param"] == "question"
    long = " ".join(f"word{i}" for i in range(300))  # more than this model's 256-token context: cut to fit
    assert post(live, "/v1/ask", {"question": long, "max_tokens": 8}).json()["usage"]["prompt_tokens"] <= 248


def test_ask_moderates_the_question(live):
    a = post(live, "/v1/ask", {"question": "where can I buy zebracorn coffee?"}).json()
    assert a["finish_reason"] == "content_filter" and a["posts"] == [] and a["citations"] == []
    assert a["myna"]["moderation"]["blocked"] == "input" and a["answer"]


def test_no_index_is_a_clear_404(sft_run):
    server = LiveServer(create_app(sft_run, ServeConfig(policy=Policy.off())))
    try:
        server.wait_ready()
        assert server.health()["search"] is None
        for path in ("/v1/search", "/v1/ask"):
            r = server.request("POST", path, {"query": "coffee", "question": "coffee?"})
            error = error_of(r)
            assert r.status == 404 and error["code"] == "search_not_enabled", error
            assert "started without --index" in error["message"]
    finally:
        server.stop()


def test_the_model_that_embedded_the_index_is_reused(base_run, serve_index, live):
    assert live.health()["search"] == {"posts": 806, "dense": True, "embedder": "own"}
    app = create_app(base_run, ServeConfig(index=serve_index, policy=Policy.off()))
    server = LiveServer(app)
    try:
        server.wait_ready()
        assert server.health()["search"]["embedder"] == "served"
        state = app.state.server
        assert state.searcher.embedder.model is state.loaded.model  # one copy of the weights
        r = server.request("POST", "/v1/search", {"query": QUERY})
        assert r.json()["data"][0]["id"] == "s1"
    finally:
        server.stop()


def test_a_bad_index_fails_start_up(sft_run, serve_index, tmp_path):
    with pytest.raises(SearchIndexError, match="not a search index"):
        create_app(sft_run, ServeConfig(index=tmp_path))
    moved = tmp_path / "moved"  # an index whose model is gone cannot embed queries
    shutil.copytree(serve_index, moved)
    db = sqlite3.connect(moved / "index.sqlite")
    with db:
        db.execute("UPDATE meta SET value=? WHERE key='ckpt'", (json.dumps(str(tmp_path / "gone")),))
    db.close()
    with pytest.raises(SearchIndexError, match="its queries need the model that embedded it"):
        create_app(sft_run, ServeConfig(index=moved))


def test_cli_serve_index_error_is_one_line(sft_run: Path, tmp_path: Path):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--ckpt", str(sft_run), "--index", str(tmp_path)])
    assert e.value.code == (
        f"myna serve: error: {tmp_path}: not a search index (no index.sqlite); build one with `myna index build`"
    )
