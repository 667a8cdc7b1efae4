"""Data pipeline benchmark: posts/s per stage with 1 and 2 workers, peak memory, tokenizer training and encode speed.

    python bench/data.py                 # 1M posts, 3 runs per cell (about 15 minutes on 2 cores)
    python bench/data.py --posts 200000 --runs 1

The corpus is the bundled real sample multiplied with variations (each copy gets other ids, authors, timestamps and
a few edited words) written as Twitter API v1.1 JSON lines in 8 files, so ingest parallelises over files as it would
on a real dump; the API labels each post's language, so clean does not run language identification on them. The
same texts as plain lines (no language given) measure ingest + clean with fastText language identification. Each stage runs in a fresh subprocess so its peak RSS is its own. Prints a table: median of the runs.
"""

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["ingest", "clean", "dedup", "tokenize"]
WORDS = "so very really just now today lol omg yes no maybe great bad new old".split()


def real_texts() -> list[str]:
    from myna.data import readers

    texts = []
    for f in sorted((ROOT / "data" / "sample" / "posts").iterdir()):
        if f.suffix == ".md":
            continue
        texts += [r["text"] for r in readers.read_posts(f) if isinstance(r, dict)]
    return texts


def make_corpus(n_posts: int, out: Path, n_files: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """n_posts real texts, varied so that exact dedup does not collapse the copies, written twice: as v1.1 status
    objects carrying `lang` as Twitter's API does (raw/), and as plain text lines with no language (text/)."""
    from myna.data.clean import detect_language

    rng = random.Random(seed)
    texts = real_texts()
    langs = [detect_language(t)[0] for t in texts]  # once per real text, as the API would have labelled it
    t0 = datetime(2020, 1, 1, tzinfo=UTC)
    raw, plain = out / "raw", out / "text"
    raw.mkdir(parents=True, exist_ok=True)
    plain.mkdir(parents=True, exist_ok=True)
    files = [open(raw / f"dump_{i:02d}.jsonl", "wb") for i in range(n_files)]
    lines = [open(plain / f"dump_{i:02d}.txt", "w", encoding="utf-8") for i in range(n_files)]
    for i in range(n_posts):
        text = texts[i % len(texts)]
        if i >= len(texts):  # a copy: a couple of words inserted, so exact dedup does not collapse it
            words = text.split()
            for _ in range(2):
                words.insert(rng.randrange(len(words) + 1), rng.choice(WORDS) + str(rng.randrange(1000)))
            text = " ".join(words)
        when = (t0 + timedelta(seconds=i * 7)).strftime("%a %b %d %H:%M:%S +0000 %Y")
        status = {
            "id": 10**17 + i,
            "id_str": str(10**17 + i),
            "created_at": when,
            "full_text": text,
            "user": {"id_str": str(rng.randrange(50_000)), "screen_name": "u"},
            "lang": langs[i % len(texts)],
            "favorite_count": rng.randrange(50),
            "retweet_count": rng.randrange(5),
            "entities": {"hashtags": [], "user_mentions": [], "urls": []},
        }
        files[i % n_files].write(orjson.dumps(status) + b"\n")
        lines[i % n_files].write(text.replace("\n", " ") + "\n")
    for f in files + lines:
        f.close()
    return raw, plain


def run_stage(stage: str, raw: Path, work: Path, workers: int) -> dict:
    """Run one stage in this process (called in a child); returns seconds and the rows it handled."""
    from myna.data import pipeline

    cfg = pipeline.PrepareConfig(workers=workers, force=True)
    t0 = time.perf_counter()
    if stage == "tokenizer":
        return {"seconds": 0, "rows": 0, "peak_mib": 0, **pipeline.build_tokenizer(work, cfg)}
    if stage == "tokenizer":
        return {"seconds": 0, "rows": 0, "peak_mib": 0, **pipeline.build_tokenizer(work, cfg)}
    if stage == "ingest":
        s = pipeline.ingest([raw], work, cfg)
        rows = s["posts"] + s["rejected"]
    elif stage == "clean":
        s = pipeline.clean(work, cfg)
        rows = s["input"]
    elif stage == "dedup":
        s = pipeline.dedup_and_split(work, cfg)
        rows = s["input"]
    else:
        s = pipeline.tokenize(work, cfg)
        rows = s["train"]["docs"] + s["val"]["docs"]
    secs = time.perf_counter() - t0
    peak = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    return {"seconds": secs, "rows": rows, "peak_mib": peak / 1024}


def child(stage: str, raw: Path, work: Path, workers: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        stage,
        "--raw",
        str(raw),
        "--work",
        str(work),
        "--workers",
        str(workers),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def tokenizer_bench(work: Path, runs: int) -> list[tuple[str, str, str]]:
    """Tokenizer training time on the corpus, and single-thread encode MB/s of Myna's path beside tiktoken's
    own calls and HF tokenizers on the same text (ids are identical: tests/test_tokenizer.py)."""
    import pyarrow.parquet as pq

    from myna.tokenizer import Tokenizer, train_tokenizer

    texts = pq.read_table(work / "corpus.parquet", columns=["text"]).column(0).to_pylist()[:200_000]
    t0 = time.perf_counter()
    train_tokenizer(texts, 8192, work / "bench_tok.json")
    train_s = time.perf_counter() - t0
    tok = Tokenizer.from_file(work / "bench_tok.json")
    mb = sum(len(t.encode()) for t in texts) / 1e6
    enc = tok.tiktoken
    ways = {
        "Myna Tokenizer.encode_batch": lambda: tok.encode_batch(texts, num_threads=1),
        "tiktoken encode_ordinary, one call per post": lambda: [enc.encode_ordinary(t) for t in texts],
        "tiktoken encode_ordinary_batch": lambda: enc.encode_ordinary_batch(texts, num_threads=1),
        "HF tokenizers encode, one call per post": lambda: [tok.hf.encode(t).ids for t in texts],
    }
    speed = {}
    for name, fn in ways.items():
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        speed[name] = mb / statistics.median(times)
    ours = speed["Myna Tokenizer.encode_batch"]
    rows = [("tokenizer training (200k posts, vocab 8192)", f"{train_s:.1f} s", "")]
    rows += [(f"encode: {name}", f"{v:.1f} MB/s", f"{ours / v:.2f}x") for name, v in speed.items()]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--posts", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--child")
    ap.add_argument("--raw")
    ap.add_argument("--work")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_stage(args.child, Path(args.raw), Path(args.work), args.workers)))
        return

    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        raw, plain = make_corpus(args.posts, tmp)
        print(f"corpus: {args.posts:,} posts in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        cells: dict[tuple[str, int], list[dict]] = {}
        for workers in (1, 2):
            for _ in range(args.runs):
                for corpus, stages in ((raw, STAGES), (plain, ["ingest", "clean"])):
                    work = tmp / f"{corpus.name}-w{workers}"
                    for stage in stages:
                        if stage == "tokenize" and not (work / "tokenizer.json").exists():
                            child("tokenizer", corpus, work, workers)  # trained once, outside the timing
                        r = child(stage, corpus, work, workers)
                        key = stage if corpus is raw else f"{stage} (text)"
                        cells.setdefault((key, workers), []).append(r)
                        rate = r["rows"] / r["seconds"]
                        print(f"{key} workers={workers}: {rate:,.0f} posts/s", file=sys.stderr)
        table = Table(
            title=f"bench/data.py: {args.posts:,} posts, median of {args.runs} runs, {os.cpu_count()} cores"
        )
        for col in (
            "stage",
            "posts/s, 1 worker",
            "posts/s, 2 workers",
            "2w / 1w",
            "peak RSS 1w (largest process)",
            "peak RSS 2w (largest process)",
        ):
            table.add_column(col, justify="right" if col != "stage" else "left")
        for stage in [*STAGES, "ingest (text)", "clean (text)"]:
            rate = {w: statistics.median(r["rows"] / r["seconds"] for r in cells[(stage, w)]) for w in (1, 2)}
            peak = {w: max(r["peak_mib"] for r in cells[(stage, w)]) for w in (1, 2)}
            table.add_row(
                stage,
                f"{rate[1]:,.0f}",
                f"{rate[2]:,.0f}",
                f"{rate[2] / rate[1]:.2f}x",
                f"{peak[1]:,.0f} MiB",
                f"{peak[2]:,.0f} MiB",
            )
        for name, pair in (
            ("ingest + clean, v1.1 JSON (lang given)", ("ingest", "clean")),
            ("ingest + clean, text (lang detected)", ("ingest (text)", "clean (text)")),
        ):
            secs = {
                w: sum(statistics.median(r["seconds"] for r in cells[(s, w)]) for s in pair) for w in (1, 2)
            }
            both = {w: args.posts / secs[w] for w in (1, 2)}
            table.add_row(name, f"{both[1]:,.0f}", f"{both[2]:,.0f}", f"{both[2] / both[1]:.2f}x", "", "")
        Console().print(table)
        tt = Table(title=f"tokenizer: 200k posts, 1 thread, median of {args.runs} runs")
        tt.add_column("measure")
        tt.add_column("value", justify="right")
        tt.add_column("Myna / this", justify="right")
        for row in tokenizer_bench(tmp / "raw-w1", args.runs):
            tt.add_row(*row)
        Console().print(tt)


if __name__ == "__main__":
    main()
