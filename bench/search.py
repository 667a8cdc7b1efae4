"""Search speed: index build, size on disk, query latency for BM25, dense and hybrid, and the recall of the
approximate vector index against exact search.

    python bench/search.py                     # 100k and 1M posts, 3 runs (about 15 minutes on 2 cores)
    python bench/search.py --quick             # 20k posts, 1 run (about a minute)
    python bench/search.py --posts 250000 --runs 5 --queries 300
    python bench/search.py --ckpt RUN          # the run's model embeds the real posts (see Vectors)
    python bench/search.py --alternatives 200000   # other vector indexes on the same vectors, then exit

Posts: the bundled sample (data/sample/posts, ~128k real tweets) in a seeded shuffle; past that, posts made by
recombining them: the first half of one real post's words followed by the second half of another's, pairs drawn at
random, so the words, their frequencies and the post lengths stay those of real posts. The sample has no authors,
times or counts, so every post gets made-up ones: an author from a skewed pool (one per 20 posts, a few prolific),
a time in 2024, heavy-tailed likes and reposts, one post in seven a reply to an earlier one.

Vectors: a model embedding 1M posts on two cores takes hours, so by default the vectors are synthetic, with the
structure of real text embeddings: a mixture of 2,000 topics of Zipf-like popularity in 256 dimensions (the `cpu`
preset's width), spread along directions of decaying variance, plus a shared offset, unit length. Latency depends on
the shapes only; recall depends on the distribution, so it is the synthetic one's. With --ckpt, the run's model
embeds the real posts, and a recombined post's vector is the normalised mean of its two parents' (model time is not
part of the build rate: it is printed apart). Queries are embedded the same way as posts.

Queries: words drawn from random posts (1 to 3 of their search terms, common words included, as people type them),
and one query in three with something more: from:, since:, min_faves:, -filter:replies, filter:links, a "phrase",
an OR, or an -exclusion. Each mode runs every query once a run; the modes take turns within each run, so a change in
the machine's load hits all alike. Per mode: queries/s (one thread, one query after another), p50 and p99 latency
over the queries, each the median over the runs.

  build      myna.search.index.write_index over the posts with their vectors (FTS5, posts, vectors; VACUUM)
  open       SearchIndex.open: reading the vectors, and building the IVF index where the index is large enough
  bm25       rank.lexical: the BM25 candidates alone (200, as Top asks)
  dense      rank.dense: query embedding + vector search + the query's hard constraints (200 candidates)
  hybrid     rank.search order top: both, fused, rescored, collapsed, diversified: a first page of 20
  recall@10  the IVF index's top 10 against exact inner-product search over the same vectors, per query vector

Where the index is large enough for the approximate vector index, dense and hybrid run again with exact search in
the same process, for the ratio.
"""

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from myna.search import rank  # noqa: E402
from myna.search.index import DB_NAME, SearchIndex, write_index  # noqa: E402
from myna.search.query import QueryError, parse  # noqa: E402
from myna.search.terms import terms  # noqa: E402
from myna.search.vectors import APPROXIMATE_FROM, VectorIndex  # noqa: E402

CANDIDATES = rank.RankSettings().candidates
YEAR_2024 = 1704067200
DIM = 256


# --- posts ---


def real_texts() -> list[str]:
    from myna.data import readers

    texts = []
    for f in sorted((REPO / "data" / "sample" / "posts").glob("*.gz")):
        texts += [r["text"] for r in readers.read_posts(f) if isinstance(r, dict) and r["text"].strip()]
    random.Random(0).shuffle(texts)
    return texts


def make_posts(n: int, texts: list[str]) -> tuple[list[dict], list[tuple[int, int]]]:
    """n posts with made-up metadata, and for each recombined one the indexes of its two parents in texts."""
    rng = random.Random(1)
    authors = max(1, n // 20)
    posts, parents = [], []
    for i in range(n):
        if i < len(texts):
            text = texts[i]
        else:
            a, b = rng.randrange(len(texts)), rng.randrange(len(texts))
            wa, wb = texts[a].split(), texts[b].split()
            text = " ".join(wa[: (len(wa) + 1) // 2] + wb[len(wb) // 2 :])
            parents.append((a, b))
        likes = int(rng.paretovariate(1.2)) - 1
        posts.append(
            {
                "id": f"b{i}",
                "text": text,
                "author_id": f"u{int(authors * rng.random() ** 3)}",  # a few authors write most posts
                "created_at": YEAR_2024 + rng.randrange(366 * 86400),
                "like_count": likes,
                "repost_count": int(likes * rng.random() / 3),
                "reply_count": int(rng.expovariate(1.0)),
                "in_reply_to_id": f"b{rng.randrange(i)}" if i and rng.random() < 1 / 7 else None,
            }
        )
    return posts, parents


def make_queries(posts: list[dict], n: int) -> list[str]:
    rng = random.Random(2)
    extras = [
        lambda p, w: f"from:{p['author_id']}",
        lambda p, w: "since:2024-07-01",
        lambda p, w: "min_faves:10",
        lambda p, w: "-filter:replies",
        lambda p, w: "filter:links",
        lambda p, w: f'"{" ".join(w[:2])}"' if len(w) > 1 else "",
        lambda p, w: f"OR {rng.choice(terms(rng.choice(posts)['text']) or ['news'])}",
        lambda p, w: f"-{rng.choice(terms(rng.choice(posts)['text']) or ['news'])}",
    ]
    queries = []
    while len(queries) < n:
        post = rng.choice(posts)
        words = [t for t in terms(post["text"]) if len(t) > 1 and not t.startswith("http")]
        if not words:
            continue
        start = rng.randrange(len(words))
        picked = words[start : start + rng.choice((1, 1, 2, 2, 3))]
        text = " ".join(picked)
        if len(queries) % 3 == 2:
            text += " " + rng.choice(extras)(post, picked)
        try:
            parse(text)
        except QueryError:
            continue
        queries.append(text.strip())
    return queries


# --- vectors ---


class Synthetic:
    """Stands in for Embedder: vectors from a mixture of topics (see the module's docstring), the same for the
    same batch of texts."""

    ckpt = "synthetic"
    fingerprint = "synthetic"
    dim = DIM

    def __init__(self, topics: int = 2000, spread: float = 0.6):
        rng = np.random.default_rng(1234)
        # variance decays with the direction
        self.scale = (1 / np.sqrt(np.arange(1, DIM + 1))).astype(np.float32)
        self.basis = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0].astype(np.float32)
        self.centers = (rng.standard_normal((topics, DIM)).astype(np.float32) * self.scale) @ self.basis.T
        offset = rng.standard_normal(DIM).astype(np.float32)
        self.offset = offset * np.linalg.norm(self.centers, axis=1).mean() / np.linalg.norm(offset)
        popularity = 1 / np.arange(1, topics + 1) ** 0.8
        self.popularity = popularity / popularity.sum()
        self.spread = spread

    def __call__(self, texts: list[str]) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32("\n".join(texts).encode()))
        topic = rng.choice(len(self.centers), size=len(texts), p=self.popularity)
        noise = rng.standard_normal((len(texts), DIM)).astype(np.float32) * self.scale * self.spread
        v = self.centers[topic] + noise @ self.basis.T + self.offset
        return v / np.linalg.norm(v, axis=1, keepdims=True)


class Precomputed:
    """Stands in for Embedder at build time: hands out the vectors made beforehand, in order."""

    def __init__(self, vectors: np.ndarray, model):
        self.vectors, self.next = vectors, 0
        self.ckpt, self.fingerprint, self.dim = model.ckpt, model.fingerprint, vectors.shape[1]

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = self.vectors[self.next : self.next + len(texts)]
        self.next += len(texts)
        return out


def model_vectors(
    embedder, texts: list[str], n: int, parents: list[tuple[int, int]]
) -> tuple[np.ndarray, float]:
    """The model's vectors of the real posts; a recombined post's is its parents' mean. Returns (vectors, posts/s)."""
    real = min(n, len(texts))
    start = time.perf_counter()
    own = np.concatenate([embedder(texts[i : i + 256]) for i in range(0, real, 256)])
    rate = real / (time.perf_counter() - start)
    if parents:
        mixed = own[[a for a, _ in parents]] + own[[b for _, b in parents]]
        own = np.concatenate([own, mixed / np.linalg.norm(mixed, axis=1, keepdims=True)])
    return own.astype(np.float32), rate


# --- timing ---


def time_modes(modes: dict, queries: list[str], runs: int) -> dict:
    """Per mode, the median over runs of queries/s, p50 and p99 (ms). Modes take turns within each run."""
    per_run = {name: [] for name in modes}
    for fn in modes.values():  # warm-up: SQLite's pages, faiss's lists
        for text in queries[:10]:
            fn(text)
    for _ in range(runs):
        for name, fn in modes.items():
            times = []
            for text in queries:
                start = time.perf_counter()
                fn(text)
                times.append(time.perf_counter() - start)
            ms = np.array(times) * 1e3
            per_run[name].append((len(times) / sum(times), np.percentile(ms, 50), np.percentile(ms, 99)))
    return {
        name: tuple(statistics.median(r[i] for r in rs) for i in range(3)) for name, rs in per_run.items()
    }


def recall_at_10(approximate: VectorIndex, vectors: np.ndarray, query_vectors: np.ndarray) -> float:
    exact = VectorIndex(vectors, approximate_from=math.inf)
    hits = [
        len(set(approximate.search(v, 10)[0].tolist()) & set(exact.search(v, 10)[0].tolist())) / 10
        for v in query_vectors
    ]
    return float(np.mean(hits))


def run_scale(n: int, texts: list[str], args, model, tmp: Path) -> dict:
    posts, parents = make_posts(n, texts)
    queries = make_queries(posts, args.queries)
    if args.ckpt:
        vectors, rate = model_vectors(model, texts, n, parents)
        print(f"{n:,} posts: the model embedded {min(n, len(texts)):,} real posts at {rate:,.0f} posts/s")
        source = Precomputed(vectors, model)
    else:
        source = model
    out = tmp / f"idx{n}"
    start = time.perf_counter()
    write_index(posts, n, out, source)
    build_s = time.perf_counter() - start
    del posts
    start = time.perf_counter()
    index = SearchIndex.open(out)
    open_s = time.perf_counter() - start
    approximate = index.vector_index.ivf is not None

    def hybrid(text):
        return rank.search(index, text, order="top", limit=20, embedder=model)

    def bm25(text):
        return rank.lexical(index, parse(text), CANDIDATES)

    def dense(text):
        q = parse(text)
        return rank.dense(index, q, model, CANDIDATES) if q.has_text else None

    modes = {"bm25": bm25, "dense": dense, "hybrid": hybrid}
    chosen = index.vector_index
    exact = VectorIndex(index.vectors, approximate_from=math.inf)
    if approximate:

        def exactly(fn):
            def run(text):
                index.vector_index = exact
                try:
                    return fn(text)
                finally:
                    index.vector_index = chosen

            return run

        modes.update({"dense, exact": exactly(dense), "hybrid, exact": exactly(hybrid)})
    times = time_modes(modes, queries, args.runs)
    query_vectors = np.stack([model([rank.dense_text(parse(t))])[0] for t in queries if parse(t).has_text])
    start = time.perf_counter()
    ivf = chosen if approximate else VectorIndex(index.vectors, approximate_from=0)
    ivf_s = time.perf_counter() - start
    result = {
        "posts": n,
        "build_s": build_s,
        "size": (out / DB_NAME).stat().st_size,
        "open_s": open_s,
        "backend": chosen.kind,
        "ivf": ivf.kind,
        "ivf_build_s": None if approximate else ivf_s,
        "recall": recall_at_10(ivf, index.vectors, query_vectors),
        "times": times,
        "queries": len(queries),
    }
    index.db.close()
    return result


# --- the alternatives to the chosen vector index ---


def alternatives(n: int, runs: int) -> None:
    """Vector indexes on the same synthetic vectors: build time, memory beside the float32 vectors, latency of a
    query for CANDIDATES results, recall@10 against exact search."""
    import faiss
    from rich.table import Table

    model = Synthetic()
    vectors = np.concatenate([model([str(i)] * 2048) for i in range(0, n, 2048)])[:n]
    queries = model([f"q{i}" for i in range(200)])
    exact = VectorIndex(vectors, approximate_from=math.inf)
    truth = [set(exact.search(q, 10)[0].tolist()) for q in queries]
    nlist = max(1, round(n / 2048))

    def ivf(codes):
        def make():
            quantizer = faiss.IndexFlatIP(DIM)
            if codes is None:
                index = faiss.IndexIVFFlat(quantizer, DIM, nlist, faiss.METRIC_INNER_PRODUCT)
            else:
                index = faiss.IndexIVFScalarQuantizer(
                    quantizer, DIM, nlist, codes, faiss.METRIC_INNER_PRODUCT
                )
            index.cp.niter = 10
            index.train(vectors[np.random.default_rng(0).choice(n, min(n, 40 * nlist), replace=False)])
            index.add(vectors)
            index.nprobe = 16
            return index

        return make

    def hnsw():
        index = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 64
        index.add(vectors)
        index.hnsw.efSearch = CANDIDATES
        return index

    def chosen():
        return VectorIndex(vectors, approximate_from=0)

    makers = {
        "exact (numpy, the chosen below the threshold)": lambda: exact,
        "faiss IndexFlatIP (exact)": lambda: faiss_flat(vectors),
        f"IVF{nlist},float16, nprobe 16 (chosen)": chosen,
        f"IVF{nlist},int8, nprobe 16": ivf(faiss.ScalarQuantizer.QT_8bit),
        f"IVF{nlist},float32, nprobe 16": ivf(None),
        "HNSW32,float32, efSearch 200": hnsw,
    }
    table = Table(title=f"vector indexes, {n:,} synthetic vectors x {DIM}, {CANDIDATES} results a query")
    for col in ("index", "build s", "memory MiB", "p50 ms", "p99 ms", "recall@10"):
        table.add_column(col, justify="left" if col == "index" else "right")
    for name, make in makers.items():
        start = time.perf_counter()
        index = make()
        build = time.perf_counter() - start
        if isinstance(index, VectorIndex):
            memory = 0 if index.ivf is None else faiss_bytes(index.ivf)
            search = index.search
        else:
            memory = faiss_bytes(index)

            def search(q, k, index=index):
                scores, rows = index.search(q[None], k)
                return rows[0] + 1, scores[0]

        times = []
        for _ in range(runs):
            for q in queries:
                start = time.perf_counter()
                search(q, CANDIDATES)
                times.append(time.perf_counter() - start)
        ms = np.array(times) * 1e3
        recall = np.mean(
            [len(set(search(q, 10)[0].tolist()) & t) / 10 for q, t in zip(queries, truth, strict=True)]
        )
        table.add_row(name, f"{build:.1f}", f"{memory / 2**20:,.0f}", f"{np.percentile(ms, 50):.2f}",
                      f"{np.percentile(ms, 99):.2f}", f"{recall:.3f}")  # fmt: skip
        print(f"{name}: done", flush=True)
    from rich.console import Console

    Console(width=200).print(table)


def faiss_flat(vectors: np.ndarray):
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def faiss_bytes(index) -> int:
    import faiss

    return len(faiss.serialize_index(index))


# --- the table ---


def print_table(results: list[dict], args, what: str) -> None:
    from rich.console import Console
    from rich.table import Table

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        "?",
    )
    console = Console(width=200)
    build = Table(title=f"index build and open: {what}; {cpu}, {os.cpu_count()} cores")
    for col in (
        "posts",
        "build posts/s",
        "size on disk",
        "bytes/post",
        "open s",
        "vector search",
        "recall@10",
    ):
        build.add_column(col, justify="right" if col != "vector search" else "left")
    for r in results:
        recall = f"{r['recall']:.3f}" + ("" if r["ivf_build_s"] is None else f" ({r['ivf']}, not used)")
        build.add_row(f"{r['posts']:,}", f"{r['posts'] / r['build_s']:,.0f}", f"{r['size'] / 2**20:,.0f} MiB",
                      f"{r['size'] / r['posts']:,.0f}", f"{r['open_s']:.1f}", r["backend"], recall)  # fmt: skip
    console.print(build)
    queries = Table(title=f"queries: {results[0]['queries']} a run, median of {args.runs} runs, one thread")
    for col in ("posts", "mode", "queries/s", "p50 ms", "p99 ms", "vs exact"):
        queries.add_column(col, justify="left" if col == "mode" else "right")
    for r in results:
        for mode, (qps, p50, p99) in r["times"].items():
            ratio = ""
            if f"{mode}, exact" in r["times"]:
                ratio = f"{r['times'][f'{mode}, exact'][2] / p99:.1f}x p99"
            queries.add_row(f"{r['posts']:,}", mode, f"{qps:,.0f}", f"{p50:.1f}", f"{p99:.1f}", ratio)
    console.print(queries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--posts", default="100000,1000000", help="comma-separated index sizes")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--queries", type=int, default=200, help="queries a run")
    ap.add_argument("--quick", action="store_true", help="20k posts, 1 run, 100 queries")
    ap.add_argument("--ckpt", help="a run whose model embeds the real posts (default: synthetic vectors)")
    ap.add_argument("--alternatives", type=int, metavar="N", help="time other vector indexes on N vectors")
    args = ap.parse_args()
    if args.alternatives:
        return alternatives(args.alternatives, args.runs)
    if args.quick:
        args.posts, args.runs, args.queries = "20000", 1, 100
    texts = real_texts()
    if args.ckpt:
        import torch

        from myna.search.index import Embedder

        torch.set_num_threads(os.cpu_count() or 1)
        model, what = Embedder.load(args.ckpt), f"vectors from {args.ckpt}"
    else:
        model, what = Synthetic(), f"synthetic vectors ({DIM} dims)"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.posts.split(",")):
            start = time.perf_counter()
            results.append(run_scale(n, texts, args, model, Path(tmp)))
            print(f"{n:,} posts measured in {time.perf_counter() - start:.0f} s", flush=True)
    print(f"approximate vector search from {APPROXIMATE_FROM:,} posts (myna/search/vectors.py)")
    print_table(results, args, what)


if __name__ == "__main__":
    main()
