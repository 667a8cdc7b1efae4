"""Training speed on this CPU: tokens/s, page faults and peak memory of the tiny and cpu presets, eager vs
torch.compile, fp32 vs bf16 autocast, each the median of several timed runs in a fresh process; ratios are against
eager fp32. Steps run inside host_memory.kept, as Myna's training loop runs them; --return-host-memory leaves
glibc's defaults (freed blocks go back to the kernel), to see what that costs.

    python bench/train_cpu.py [--presets tiny,cpu] [--dtypes fp32,bf16] [--runs 5] [--steps 5] [--curve DATA_DIR]

Threads follow OMP_NUM_THREADS (set it to 1 when other work shares the cores: OpenMP's spinning threads
slow down several-fold under contention). --curve DATA_DIR also trains the cpu preset for --curve-steps steps in fp32 and in bf16 on a prepared data
directory and prints both loss curves, to check that bf16 autocast does not hurt learning.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def measure(preset_name: str, compile: bool, dtype: str, runs: int, steps: int, keep: bool) -> dict:
    """One configuration, in this process: warm up (and compile), then `runs` timings of `steps` steps."""
    import torch

    from myna.config import preset
    from myna.model import GPT
    from myna.train import host_memory
    from myna.train.optim import build_optimizer

    torch.manual_seed(0)
    mcfg, tcfg = preset(preset_name, vocab_size=8192)
    model = GPT(mcfg)
    opt = build_optimizer(model, tcfg)
    fwd = torch.compile(model) if compile else model
    x = torch.randint(0, mcfg.vocab_size, (tcfg.batch_size, tcfg.seq_len + 1))

    def step():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
        with ctx:
            _, loss = fwd(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with host_memory.kept(keep):
        for _ in range(3):  # warm-up, and compilation when compiled
            step()
        times = []
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(runs):
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times.append(time.perf_counter() - t0)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    tokens = steps * tcfg.batch_size * tcfg.seq_len
    return {
        "tokens_per_s": tokens / statistics.median(times),
        "faults_per_step": faults / (runs * steps),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def curve(data_dir: str, steps: int) -> None:
    import tempfile

    from myna.train.pretrain import pretrain

    curves = {}
    for dtype in ("float32", "bfloat16"):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            pretrain(
                data_dir, Path(tmp) / "run", preset="cpu", steps=steps, dtype=dtype, eval_every=steps // 4
            )
            rows = [
                json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
            ]
            curves[dtype] = (
                {r["step"]: r["val_loss"] for r in rows if "val_loss" in r},
                time.perf_counter() - t0,
            )
    print(f"\ncpu preset, {steps} steps on {data_dir}: val loss")
    print(f"{'step':>6} {'fp32':>8} {'bf16':>8}")
    for s in curves["float32"][0]:
        print(f"{s:>6} {curves['float32'][0][s]:>8.4f} {curves['bfloat16'][0][s]:>8.4f}")
    print(f"{'time':>6} {curves['float32'][1]:>7.0f}s {curves['bfloat16'][1]:>7.0f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,cpu")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument(
        "--return-host-memory", action="store_true", help="glibc's defaults instead of host_memory.kept"
    )
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--curve", metavar="DATA_DIR", help="also compare fp32 and bf16 loss curves on this data")
    ap.add_argument("--curve-steps", type=int, default=200)
    ap.add_argument("--one", nargs=3, metavar=("PRESET", "COMPILE", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        p, c, d = args.one
        print(json.dumps(measure(p, c == "1", d, args.runs, args.steps, not args.return_host_memory)))
        return

    from rich.console import Console
    from rich.table import Table

    memory = "returned to the kernel" if args.return_host_memory else "kept"
    table = Table(
        title=f"training step on CPU: median of {args.runs} x {args.steps} steps, vocab 8192, host memory {memory}"
    )
    for col in ("preset", "mode", "dtype", "tokens/s", "vs eager fp32", "page faults / step", "peak RSS MB"):
        table.add_column(col, justify="right")
    for p in args.presets.split(","):
        base = None
        for c in ("0",) if args.no_compile else ("0", "1"):
            for d in args.dtypes.split(","):
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    p,
                    c,
                    d,
                    "--runs",
                    str(args.runs),
                    "--steps",
                    str(args.steps),
                    *(["--return-host-memory"] if args.return_host_memory else []),
                ]
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                base = base or r["tokens_per_s"]
                mode = "compiled" if c == "1" else "eager"
                table.add_row(
                    p,
                    mode,
                    d,
                    f"{r['tokens_per_s']:,.0f}",
                    f"{r['tokens_per_s'] / base:.2f}x",
                    f"{r['faults_per_step']:,.0f}",
                    f"{r['peak_rss_mb']:,.0f}",
                )
    Console().print(table)
    if args.curve:
        curve(args.curve, args.curve_steps)


if __name__ == "__main__":
    main()
