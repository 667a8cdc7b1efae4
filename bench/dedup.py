"""MinHash throughput: Myna's numpy signatures vs datasketch on the same real tweets, then a 1M-row dedup.

    python bench/dedup.py [--data DIR] [--docs 20000] [--repeats 5] [--rows 1000000] [--workers 2]

Both sides hash the same 5-character shingles of the same comparison keys with 64 permutations;
datasketch's time includes building each doc's shingle set, which it needs as input. Times are medians.
The 1M rows are the 100k Sentiment140 tweets, each copied ten times with one word changed in each
copy (a heavy near-duplicate load).
"""

import argparse
import gzip
import html
import random
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasketch import MinHash

from myna.data.dedup import DedupConfig, comparison_key, dedup, minhash_signatures


def load(data: Path) -> list[str]:
    texts = []
    for name in ("sentiment140_positive.txt.gz", "sentiment140_negative.txt.gz"):
        with gzip.open(data / name, "rt", encoding="utf-8") as f:
            texts += [html.unescape(line.rstrip("\n")) for line in f if line.strip()]
    return texts


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def datasketch_signatures(keys: list[str], k: int, num_perm: int) -> None:
    for key in keys:
        key = key if len(key) >= k else key.ljust(k, "\0")
        m = MinHash(num_perm=num_perm)
        m.update_batch([key[i : i + k].encode() for i in range(len(key) - k + 1)])


def million(texts: list[str], rows: int) -> pa.Table:
    rng = random.Random(0)
    vocab = [w for t in texts[:5000] for w in t.split() if w.isalpha()]
    out = []
    while len(out) < rows:
        copy = len(out) // len(texts)
        for t in texts[: rows - len(out)]:
            words = t.split()
            if copy and words:
                words[rng.randrange(len(words))] = rng.choice(vocab)
            out.append(" ".join(words))
    n = len(out)
    return pa.table(
        {
            "id": [str(i) for i in range(n)],
            "author_id": [str(i % 50_000) for i in range(n)],
            "created_at": pa.array([None] * n, pa.timestamp("us", tz="UTC")),
            "text": out,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "sample" / "posts"
    )
    parser.add_argument("--docs", type=int, default=20_000, help="docs per signature timing")
    parser.add_argument("--datasketch-docs", type=int, default=3_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the end-to-end dedup (0: skip)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    texts = load(args.data)
    keys = [comparison_key(t) for t in texts]
    cfg = DedupConfig()
    rows = []
    ds_keys = keys[: args.datasketch_docs]
    ds = median_seconds(lambda: datasketch_signatures(ds_keys, cfg.shingle, cfg.num_perm), args.repeats)
    rows.append(("datasketch MinHash", len(ds_keys), ds))
    ours_keys = keys[: args.docs]
    ours = median_seconds(lambda: minhash_signatures(ours_keys, cfg), args.repeats)
    rows.append(("myna minhash_signatures, 1 process", len(ours_keys), ours))
    many = keys * max(1, 200_000 // len(keys))
    par_cfg = DedupConfig(workers=args.workers)
    par = median_seconds(lambda: minhash_signatures(many, par_cfg), max(1, args.repeats // 2))
    rows.append((f"myna minhash_signatures, {args.workers} processes", len(many), par))

    base = len(ds_keys) / ds
    print(f"\nMinHash signatures, {cfg.num_perm} permutations, {cfg.shingle}-char shingles (median)\n")
    print(f"{'implementation':<40} {'docs':>8} {'seconds':>9} {'docs/s':>10} {'vs datasketch':>14}")
    for name, n, seconds in rows:
        print(f"{name:<40} {n:>8} {seconds:>9.3f} {n / seconds:>10.0f} {n / seconds / base:>13.1f}x")

    if args.rows:
        table = million(texts, args.rows)
        start = time.perf_counter()
        result = dedup(table, par_cfg)
        seconds = time.perf_counter() - start
        sig_mb = result.keep.size * cfg.num_perm * np.dtype(np.uint32).itemsize / 2**20
        print(f"\ndedup of {table.num_rows:,} rows, {args.workers} processes: {seconds:.1f} s")
        print(f"  LSH {result.bands} bands x {result.rows} rows; signatures at most {sig_mb:.0f} MiB")
        print(f"  kept {int(result.keep.sum()):,}; dropped {dict(result.dropped)}")


if __name__ == "__main__":
    main()
