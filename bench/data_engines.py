"""The local data engine against Ray Data on this machine: `myna data prepare` wall time and the driver's peak memory.

    pip install -e '.[ray]'
    python bench/data_engines.py                        # 100k and 300k posts, 3 runs per cell
    python bench/data_engines.py --posts 50000 --runs 1

The corpus is bench/data.py's: the bundled real sample multiplied with variations (other ids, authors, timestamps
and a few edited words per copy), as Twitter API v1.1 JSON lines in two files, so the Ray engine reads each in byte
ranges (--span-mb). Each run is the command a user types, in a fresh process and a fresh folder: the Ray rows include
starting a local Ray instance on 127.0.0.1. Peak memory is the `myna` process's own (the local engine's dedup holds
every key and signature there; Ray's workers hold theirs in other processes, counted apart by Ray, not here).
Prints a table: median of the runs, and the Ray / local ratio of the same size.
"""

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def corpus_maker():
    spec = importlib.util.spec_from_file_location("bench_data", ROOT / "bench" / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_corpus


def prepare(raw: Path, engine: str, span_mb: int) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one `myna data prepare` run in a fresh process and folder."""
    with tempfile.TemporaryDirectory(dir=raw.parent) as out:
        args = [sys.executable, "-m", "myna", "data", "prepare", str(raw), "--out", out, "--workers", "2"]
        args += ["--engine", engine, "--span-mb", str(span_mb)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        if status != 0:
            sys.exit(f"{engine} run failed:\n{stderr.decode(errors='replace')[-3000:]}")
        return seconds, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--posts", type=int, nargs="+", default=[100_000, 300_000])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--span-mb", type=int, default=16, help="Ray reads line files in ranges of this size")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    from myna.eval.run import hardware

    make_corpus = corpus_maker()
    table = Table(title=f"myna data prepare, local vs Ray Data ({os.cpu_count()} CPUs: {hardware()['cpu']})")
    for col in ("posts", "engine", "seconds", "posts/s", "peak RSS MiB", "Ray / local"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.posts:
            raw, _ = make_corpus(n, Path(tmp) / f"n{n}", n_files=2)
            medians = {}
            for engine in ("local", "ray"):
                runs = [prepare(raw, engine, args.span_mb) for _ in range(args.runs)]
                seconds = statistics.median(r[0] for r in runs)
                medians[engine] = seconds
                ratio = f"{seconds / medians['local']:.2f}x" if engine == "ray" else ""
                rss = statistics.median(r[1] for r in runs)
                table.add_row(f"{n:,}", engine, f"{seconds:.1f}", f"{n / seconds:,.0f}", f"{rss:,.0f}", ratio)
    Console().print(table)


if __name__ == "__main__":
    main()
