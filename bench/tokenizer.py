"""Tokenizer speed: BPE training time and encode throughput of HF tokenizers vs our fast path vs raw tiktoken.

    python bench/tokenizer.py                       # Sentiment140 100k + UMSAB, when /work/shared/data is there
    python bench/tokenizer.py --text a.txt b.txt.gz --vocab-sizes 4096 32768 --runs 5

All three encoders run over the same texts with the same merges: "HF" is tokenizers' encode_batch, "myna" is
Tokenizer.encode_batch (tiktoken behind a thin wrapper), "tiktoken" is the wrapped tiktoken.Encoding's own
encode_ordinary_batch. Every row also checks that the three give identical ids on every text. Throughput counts
UTF-8 bytes of the texts; times are medians over --runs. "B/tok" is bytes per token.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from myna.io import open_binary  # noqa: E402
from myna.tokenizer import train_tokenizer  # noqa: E402

SHARED = Path("/work/shared/data")
DEFAULT_TEXTS = [
    SHARED / "sentiment140_sample100k" / "positive.txt.gz",
    SHARED / "sentiment140_sample100k" / "negative.txt.gz",
    *sorted((SHARED / "umsab_multilingual_sentiment").glob("[!a]*/*_text.txt")),  # every language but all/
]
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tok" / "tweets.txt"


def read_lines(paths: list[Path]) -> list[str]:
    lines = []
    for path in paths:
        with open_binary(path) as f:
            lines += [line for line in f.read().decode("utf-8").splitlines() if line]
    return lines


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_one(lines: list[str], mb: float, vocab_size: int, runs: int, threads: int) -> list[str]:
    """Train at `vocab_size`, check the three encoders agree, time them; one table row."""
    t0 = time.perf_counter()
    tok = train_tokenizer(lines, vocab_size)
    train_s = time.perf_counter() - t0
    assert tok.tiktoken is not None, "tokenizer structure not tiktoken-equivalent"

    hf_ids = [e.ids for e in tok.hf.encode_batch(lines, add_special_tokens=False)]
    ours = tok.encode_batch(lines, num_threads=threads)
    raw = tok.tiktoken.encode_ordinary_batch(lines, num_threads=threads)
    mismatches = sum(a != b for a, b in zip(hf_ids, ours, strict=True)) + (ours != raw)
    n_tokens = sum(map(len, ours))

    t_hf = median_time(lambda: tok.hf.encode_batch(lines, add_special_tokens=False), runs)
    t_ours = median_time(lambda: tok.encode_batch(lines, num_threads=threads), runs)
    t_raw = median_time(lambda: tok.tiktoken.encode_ordinary_batch(lines, num_threads=threads), runs)
    return [
        f"{tok.vocab_size:,}" + ("" if tok.vocab_size == vocab_size else f" of {vocab_size:,}"),
        f"{train_s:.1f}",
        f"{mb * 1e6 / n_tokens:.2f}",
        f"{mb / t_hf:.1f}",
        f"{mb / t_ours:.1f}",
        f"{mb / t_raw:.1f}",
        f"{t_hf / t_ours:.1f}x",
        f"{t_raw / t_ours:.1f}x",
        "yes" if mismatches == 0 else f"NO: {mismatches} differ",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", nargs="+", type=Path, help="text files, one document per line (gzip/zstd ok)")
    ap.add_argument("--vocab-sizes", nargs="+", type=int, default=[4096, 32768])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="tiktoken threads (HF uses all)")
    args = ap.parse_args()

    paths = args.text or ([p for p in DEFAULT_TEXTS if p.exists()] if SHARED.exists() else [FIXTURE])
    lines = read_lines(paths)
    mb = sum(len(line.encode("utf-8")) for line in lines) / 1e6
    console = Console(width=120)
    console.print(f"{len(lines):,} texts, {mb:.1f} MB from {len(paths)} files; {os.cpu_count()} CPUs")

    table = Table(title=f"Tokenizer speed (median of {args.runs} runs)")
    cols = (
        "vocab",
        "train s",
        "B/tok",
        "HF MB/s",
        "myna MB/s",
        "tiktoken MB/s",
        "myna/HF",
        "myna/tt",
        "same ids",
    )
    for col in cols:
        table.add_column(col, justify="right")
    for vocab_size in args.vocab_sizes:
        table.add_row(*bench_one(lines, mb, vocab_size, args.runs, args.threads))
    console.print(table)


if __name__ == "__main__":
    main()
