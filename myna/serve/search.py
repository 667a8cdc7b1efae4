"""/v1/search and /v1/ask apart from HTTP: the index the server opened at start-up, the model that embeds its
queries, the requests' fields checked, and the results as JSON. myna/serve/api.py routes the two endpoints and
runs ask's generation through the engine, moderated, as it runs a chat completion.

A post in a response:
    {id, author (screen name, else id), author_id, created_at (ISO 8601, UTC, or null), text, likes, reposts, replies,
     highlights: [[start, end), ...] in Unicode code points of text, score, collapsed: [ids of reposts folded in],
     parts: the score's parts (only when explain)}
"""

import json
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from myna.runs import Loaded, load_model, resolve
from myna.search.ask import POSTS, Answer, AskPrompt, ask_prompt
from myna.search.index import Embedder, SearchIndex, SearchIndexError, fingerprint
from myna.search.query import QueryError, parse
from myna.search.rank import Hit, search
from myna.search.tool import format_posts
from myna.serve.protocol import check_fields, flag_field, invalid, number_field
from myna.tokenizer import Tokenizer

SEARCH_FIELDS = {"query", "order", "limit", "explain"}
ASK_FIELDS = {"question", "query", "k", "max_tokens"}
MAX_LIMIT = 100  # results per search request
MAX_K = 20  # posts an answer may be asked from; a small context holds far fewer (ask drops what does not fit)
ASK_MAX_TOKENS = 160  # an answer's default length: a few sentences with their citations


@dataclass
class Question:
    """A /v1/ask request's fields, checked."""

    text: str
    query: str | None  # what to search instead of the question's own words
    k: int
    max_tokens: int


class Searcher:
    """The index a server serves and the model that embeds its queries: the served model itself when it embedded
    the index (same weights), else the index's own. One request at a time reads the index: its one SQLite
    connection is shared, and a search takes milliseconds. The engine's scheduler is never held."""

    def __init__(self, path: str | Path, served_checkpoint: Path):
        self.index = SearchIndex.open(path)  # a bad index fails the server's start with its one-line error
        self.lock = threading.Lock()
        self.embedder: Embedder | None = None  # set by attach() once the served model has loaded
        self.own_model: Path | None = None  # the index's model to load beside the served one, if another
        try:
            self.own_model = self._own_model(served_checkpoint)
        except BaseException:
            self.index.db.close()
            raise

    def _own_model(self, served_checkpoint: Path) -> Path | None:
        meta, path = self.index.meta, self.index.path
        if not meta.get("dim") or fingerprint(served_checkpoint) == meta["fingerprint"]:
            return None  # lexical only, or embedded by the served weights
        try:
            _, ckpt = resolve(meta["ckpt"])
        except FileNotFoundError as e:
            raise SearchIndexError(
                f"{path}: its queries need the model that embedded it, and {e}; serve that run, or rebuild "
                "the index with this one"
            ) from None
        if fingerprint(ckpt) != meta["fingerprint"]:
            raise SearchIndexError(
                f"{path}: embedded by {meta['ckpt']} (weights {meta['fingerprint']}), whose weights have changed "
                "since: rebuild the index"
            )
        return ckpt

    def attach(self, served: Loaded) -> None:
        """The embedder for queries; runs in the server's loading thread once the served model is loaded."""
        meta = self.index.meta
        if not meta.get("dim"):
            return
        # the index's own model on the CPU: a query is one short text
        loaded = served if self.own_model is None else load_model(self.own_model)
        self.embedder = Embedder(meta["ckpt"], meta["fingerprint"], loaded.model, loaded.tokenizer)

    def describe(self) -> dict:
        """What /health says of the index (no paths: /health needs no key)."""
        dense = self.embedder is not None
        model = None if not self.index.meta.get("dim") else "own" if self.own_model else "served"
        return {"posts": self.index.size, "dense": dense, "embedder": model}

    def close(self) -> None:
        with self.lock:
            self.index.db.close()

    def search(self, body: dict) -> dict:
        """The /v1/search response for a parsed body."""
        check_fields(body, SEARCH_FIELDS, ())
        text = query_field(body, "query", required=True)
        order = body.get("order", "top")
        if order not in ("top", "latest"):
            raise invalid(f"order: expected 'top' or 'latest', got {json.dumps(order)}", "order")
        limit = number_field(body, "limit", 10, 1, MAX_LIMIT, integer=True)
        explain = flag_field(body, "explain")
        with self.lock:
            results = search(self.index, text, order, limit, self.embedder)
        return {
            "object": "search.results",
            "query": text,
            "order": order,
            "data": [post_item(h, explain) for h in results.hits],
            "retrievers": results.retrievers,
            # the posts as the chat model reads a search's result: the page's tool loop sends it back as is
            "tool_text": format_posts([h.post for h in results.hits]),
        }

    def prompt(self, q: Question, tokenizer: Tokenizer, max_len: int) -> AskPrompt:
        """The question's posts retrieved and its prompt written (fewer posts when they do not all fit)."""
        with self.lock:
            try:
                return ask_prompt(
                    self.index, q.text, tokenizer, max_len, self.embedder, q.query, q.k, q.max_tokens
                )
            except ValueError as e:  # the question alone fills the context
                raise invalid(str(e), "question", "context_length_exceeded") from e


def query_field(body: dict, name: str, required: bool) -> str | None:
    """A search query, parsed once to refuse a malformed one with the parser's message (it names the operator)."""
    text = body.get(name)
    if text is None and not required:
        return None
    if not isinstance(text, str) or not text.strip():
        raise invalid(f"{name}: expected a non-empty string (words, #tags, @users, operators)", name)
    try:
        parse(text)
    except QueryError as e:
        raise invalid(f"{name}: {e}", name, "invalid_query") from e
    return text


def question_of(body: dict) -> Question:
    check_fields(body, ASK_FIELDS, ())
    text = body.get("question")
    if not isinstance(text, str) or not text.strip():
        raise invalid("question: expected a non-empty string", "question")
    return Question(
        text=text,
        query=query_field(body, "query", required=False),
        k=number_field(body, "k", POSTS, 1, MAX_K, integer=True),
        max_tokens=number_field(body, "max_tokens", ASK_MAX_TOKENS, 1, 2**31, integer=True),
    )


def iso(seconds: int | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def post_item(hit: Hit, explain: bool) -> dict:
    p = hit.post
    item = {
        "id": p["id"],
        "author": p["author"],
        "author_id": p["author_id"],
        "created_at": iso(p["created_at"]),
        "text": p["text"],
        "likes": p["likes"],
        "reposts": p["reposts"],
        "replies": p["replies"],
        "highlights": hit.highlights,
        "score": hit.score,
        "collapsed": hit.collapsed,
    }
    if explain:
        item["parts"] = hit.parts
    return item


def answer_body(answer: Answer) -> dict:
    """The parts of /v1/ask's response that come from the answer: posts numbered from 1 as the model saw them."""
    return {
        "question": answer.question,
        "query": answer.query,
        "answer": answer.text,
        "citations": [{"n": n, "id": answer.posts[n - 1].post["id"]} for n in answer.cited],
        "posts": [{"n": n, **post_item(h, False)} for n, h in enumerate(answer.posts, start=1)],
        "removed_citations": answer.removed_citations,
        "finish_reason": answer.finish_reason,
    }
