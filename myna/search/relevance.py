"""Relevance without human labels: hashtag retrieval on held-out posts.

A hashtag is a label its author gave the post. Take the held-out posts (the corpus's val split: no model saw them
in training), keep the hashtags that at least MIN_POSTS of them carry, remove those hashtags from every post's
text, and index what is left. Each hashtag's words are a query ("#PrayForVisayas" -> "pray for visayas"), and the
posts that carried it are the relevant ones. A retriever that finds them found posts about the same thing without
the tag that names it: the job of search.

nDCG@10 (binary gains) and recall@100 are averaged over the hashtags, for BM25 alone, dense alone and the hybrid
Top ranking, for any model that embeds posts.
"""

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from myna.search import rank
from myna.search.index import SearchIndex, write_index
from myna.search.query import parse
from myna.search.terms import tag_words

MIN_POSTS = 3  # a hashtag needs this many held-out posts to be a query with more than one answer
MAX_SHARE = 0.2  # a hashtag on more than this share of the posts is the collection's topic, not a query
MAX_QUERIES = 200


@dataclass
class Task:
    tag: str  # case-folded, without '#'
    query: str
    relevant: set[str]  # post ids


def held_out(data_dir: Path) -> list[dict]:
    table = pq.read_table(data_dir / "corpus.parquet")
    return [p for p in table.to_pylist() if p["split"] == "val"]


def make_tasks(posts: list[dict]) -> tuple[list[dict], list[Task]]:
    """(the posts with the evaluated hashtags removed from their text, one task per hashtag)."""
    carriers: dict[str, set[str]] = {}
    written: dict[str, Counter] = {}  # how each tag is capitalised, for its words
    for p in posts:
        for tag in set(re.findall(r"#(\w+)", p["text"])):
            carriers.setdefault(tag.casefold(), set()).add(p["id"])
            written.setdefault(tag.casefold(), Counter())[tag] += 1
    limit = MAX_SHARE * len(posts)
    chosen = sorted(
        (t for t, ids in carriers.items() if MIN_POSTS <= len(ids) <= limit),
        key=lambda t: (-len(carriers[t]), t),
    )[:MAX_QUERIES]
    tasks = [Task(t, tag_words(written[t].most_common(1)[0][0]), carriers[t]) for t in chosen]
    if not tasks:
        return posts, []
    strip = re.compile(r"[#＃](?:" + "|".join(re.escape(t) for t in chosen) + r")\b", re.IGNORECASE)
    stripped = [{**p, "text": " ".join(strip.sub(" ", p["text"]).split()) or "."} for p in posts]
    return stripped, tasks


def ndcg_at(ranked: list[str], relevant: set[str], k: int = 10) -> float:
    dcg = sum(1 / math.log2(i + 2) for i, pid in enumerate(ranked[:k]) if pid in relevant)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(len(relevant), k)))
    return dcg / ideal


def recall_at(ranked: list[str], relevant: set[str], k: int = 100) -> float:
    return len(set(ranked[:k]) & relevant) / len(relevant)


def _or_query(words: str) -> str:
    return " OR ".join(f'"{w}"' for w in words.split())


def retrieve(index: SearchIndex, task: Task, method: str, embedder, k: int = 100) -> list[str]:
    q = parse(_or_query(task.query))
    if method == "bm25":
        found = rank.lexical(index, q, k)
    elif method == "dense":
        found = rank.dense(index, q, embedder, k)
    else:
        return [h.post["id"] for h in rank.search(index, q.text, limit=k, embedder=embedder).hits]
    rows = index.rows(r for r, _ in found)
    return [rows[r]["id"] for r, _ in found]


def evaluate(index: SearchIndex, tasks: list[Task], embedder=None) -> dict:
    """{method: {"ndcg@10": mean, "recall@100": mean}} for bm25, and dense and hybrid when there is an embedder."""
    methods = ["bm25"] + (["dense", "hybrid"] if embedder is not None else [])
    out = {}
    for method in methods:
        ranked = [retrieve(index, t, method, embedder) for t in tasks]
        out[method] = {
            "ndcg@10": sum(ndcg_at(r, t.relevant) for r, t in zip(ranked, tasks, strict=True)) / len(tasks),
            "recall@100": sum(recall_at(r, t.relevant) for r, t in zip(ranked, tasks, strict=True))
            / len(tasks),
        }
    return out


def hashtag_eval(data_dir: Path, out: Path, embedder=None) -> tuple[dict, list[Task], int]:
    """Build the eval index of the held-out posts under `out` and score it: (scores, tasks, posts indexed)."""
    posts, tasks = make_tasks(held_out(Path(data_dir)))
    if not tasks:
        raise ValueError(f"{data_dir}: no hashtag is carried by {MIN_POSTS} or more held-out posts")
    write_index(posts, len(posts), out, embedder)
    index = SearchIndex.open(out)
    return evaluate(index, tasks, embedder), tasks, index.size
