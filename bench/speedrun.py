"""Time to a target val loss: Myna's recipes against a GPT-2 baseline, same shards, same windows, same device.

    python bench/speedrun.py                                       # the cpu shape on this CPU, 700 steps, 2 repeats
    python bench/speedrun.py --steps 300 --repeats 1 --recipes gpt2 myna "myna:optimizer=adamw,schedule=cosine"
    python bench/speedrun.py --preset 124m --device cuda --data DIR --steps 150 --repeats 1   # bench/gpu.sh

The baseline is written here, as nanoGPT's model.py makes a GPT-2: LayerNorm without bias, GELU MLP 4x wide,
learned positions, tied embedding and head, no dropout, nanoGPT's initialisation; trained as nanoGPT's train.py
does, AdamW with weight decay 0.1, warmup then cosine to a tenth of the peak: its small-model settings (lr 1e-3,
beta2 0.99) for the `cpu` shape and smaller, its GPT-2 124M settings (lr 6e-4, beta2 0.95) for larger ones.
Myna's recipes are the named preset (a `myna:key=value,...` recipe overrides its TrainConfig or ModelConfig
fields). Every recipe has the preset's shape (layers, width, heads) at the bench's batch and sequence length, sees
the same training windows in the same order (the same seeded TokenLoader) and the same held-out windows (190, or
as many as the val split has), and warms up for the same number of steps. Only training steps are timed (on CUDA
after a synchronize); evaluation, every --eval-every steps, is not. On CUDA every recipe runs under bf16 autocast,
eager; on a CPU in fp32 with all cores' threads, inside host_memory.kept as Myna's training loop. Recipes run
back to back, the order reversed on every other repeat, in one process.

Target: the baseline's val loss at the last step (median over repeats). A recipe's time to target is the training
time at which its val loss first reaches it (linear between evaluations). The table gives tokens/s, final val loss,
time to target and the speed-up against the baseline; --plot FILE draws val loss against training seconds.
"""

import argparse
import contextlib
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from myna.config import ModelConfig, TrainConfig, preset  # noqa: E402
from myna.data.loader import TokenLoader  # noqa: E402
from myna.eval.run import hardware  # noqa: E402
from myna.model import GPT  # noqa: E402
from myna.train import host_memory  # noqa: E402
from myna.train.optim import build_optimizer, lr_at, set_lr  # noqa: E402
from myna.train.pretrain import apply_overrides  # noqa: E402

VAL_WINDOWS = 190
SMALL_WIDTH = 256  # up to this width the baseline takes nanoGPT's small-model settings, above it GPT-2 124M's


class Block(nn.Module):
    """nanoGPT's block: pre-LayerNorm (no bias), causal attention, GELU MLP 4x wide; no dropout."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width, bias=False), nn.LayerNorm(width, bias=False)
        self.qkv, self.proj = nn.Linear(width, 3 * width, bias=False), nn.Linear(width, width, bias=False)
        self.fc, self.out = nn.Linear(width, 4 * width, bias=False), nn.Linear(4 * width, width, bias=False)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT2(nn.Module):
    """nanoGPT's GPT with its initialisation (normal 0.02, residual projections scaled by 1/sqrt(2 * layers))."""

    def __init__(self, vocab: int, layers: int, width: int, heads: int, seq: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(seq, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width, bias=False)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied, as nanoGPT
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x)).float()
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def build(recipe: str, args: argparse.Namespace, vocab: int) -> tuple[nn.Module, TrainConfig]:
    """The model and training settings a recipe names: "gpt2", "myna", or "myna:key=value,..."."""
    name, _, overrides = recipe.partition(":")
    model_cfg, train = preset(args.preset, vocab_size=vocab)
    shape = {"batch_size": args.batch, "seq_len": args.seq, "steps": args.steps, "warmup_steps": args.warmup}
    if name == "gpt2":
        small = model_cfg.n_embd <= SMALL_WIDTH
        train = TrainConfig(
            **shape, lr=1e-3 if small else 6e-4, betas=(0.9, 0.99 if small else 0.95), weight_decay=0.1,
            min_lr_ratio=0.1, schedule="cosine", optimizer="adamw",
        )  # fmt: skip
        torch.manual_seed(0)
        return GPT2(vocab, model_cfg.n_layer, model_cfg.n_embd, model_cfg.n_head, args.seq), train
    if name != "myna":
        raise SystemExit(f"unknown recipe {recipe!r}: gpt2, myna or myna:key=value,...")
    model_cfg = replace(model_cfg, max_seq_len=max(model_cfg.max_seq_len, args.seq))
    kinds = {f.name: f.type for config in (ModelConfig, TrainConfig) for f in fields(config)}
    settings = {}
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        if key not in kinds:
            raise SystemExit(f"{recipe}: {key!r} is no ModelConfig or TrainConfig field")
        kind = kinds[key]
        if kind not in (bool, int, float, str):
            raise SystemExit(f"{recipe}: {key} is a {kind}, which a recipe cannot set")
        settings[key] = value == "true" if kind is bool else kind(value)
    model_cfg, train = apply_overrides(model_cfg, replace(train, **shape), settings)
    torch.manual_seed(0)
    return GPT(model_cfg), train


@torch.no_grad()
def val_loss(model: nn.Module, windows: list[tuple[torch.Tensor, torch.Tensor]], autocast) -> float:
    model.eval()
    with autocast():
        losses = [model(x, y)[1].item() for x, y in windows]
    model.train()
    return statistics.fmean(losses)


def run(recipe: str, data: Path, args: argparse.Namespace) -> dict:
    """Train one recipe from scratch; returns its (training seconds, val loss) curve and tokens/s."""
    device = torch.device(args.device)
    train = TokenLoader(data / "shards" / "train", args.batch, args.seq, shuffle_seed=1337)
    val = TokenLoader(data / "shards" / "val", 10, args.seq)
    # each held-out window once: at most VAL_WINDOWS, fewer where long sequences outrun the sample's val split
    windows = [tuple(t.to(device) for t in next(val)) for _ in range(min(VAL_WINDOWS, val.num_windows) // 10)]
    torch.manual_seed(0)
    model, cfg = build(recipe, args, train.vocab_size)
    model.to(device)
    opt = build_optimizer(model, cfg)
    cuda = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    curve, seconds = [(0.0, val_loss(model, windows, autocast))], 0.0
    with host_memory.kept(not cuda):  # as Myna's training loop does on a CPU, for every recipe
        for step in range(args.steps):
            x, y = (t.to(device) for t in next(train))
            sync()
            t0 = time.perf_counter()
            set_lr(opt, lr_at(step, cfg))
            with autocast():
                _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            seconds += time.perf_counter() - t0
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                curve.append((seconds, val_loss(model, windows, autocast)))
                print(
                    f"  {recipe} step {step + 1}: val {curve[-1][1]:.4f} at {seconds:.0f} s", file=sys.stderr
                )
    tokens_per_s = args.steps * args.batch * args.seq / seconds
    return {"curve": curve, "tokens_per_s": tokens_per_s, "final": curve[-1][1]}


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """Training seconds at which the curve first reaches target (linear between evaluations), or None."""
    for (t0, l0), (t1, l1) in zip(curve, curve[1:], strict=False):
        if l1 <= target:
            return t1 if l0 == l1 else t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def prepared_sample(cache: Path) -> Path:
    """The bundled sample prepared with a 4,096-token vocabulary (once; later runs reuse it)."""
    if not (cache / "shards" / "train").is_dir():
        sample = ROOT / "data" / "sample"
        cmd = [
            sys.executable,
            "-m",
            "myna",
            "data",
            "prepare",
            str(sample / "posts"),
            str(sample / "conversations"),
        ]
        subprocess.run([*cmd, "--out", str(cache), "--vocab-size", "4096"], check=True)
    return cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="a prepared data folder (default: the sample's, vocab 4,096)")
    ap.add_argument("--preset", default="cpu", help="the Myna preset whose shape every recipe takes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, help="sequences per step (default: 8 on a CPU, 32 on CUDA)")
    ap.add_argument("--seq", type=int, help="sequence length (default: 256 on a CPU, the preset's on CUDA)")
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument(
        "--warmup", type=int, help="warmup steps of every recipe (default: steps / 20, at most 30)"
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--recipes", nargs="+", default=["gpt2", "myna"])
    ap.add_argument("--plot", type=Path, help="val loss against training seconds, as a PNG")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or (32 if cuda else 8)
    args.seq = args.seq or (preset(args.preset)[1].seq_len if cuda else 256)
    args.warmup = args.warmup if args.warmup is not None else min(30, max(1, args.steps // 20))
    if not cuda:
        torch.set_num_threads(os.cpu_count() or 1)
    data = args.data or prepared_sample(ROOT / "runs" / "bench-speedrun-cpu-data")
    if "gpt2" not in args.recipes:
        args.recipes.insert(0, "gpt2")
    results: dict[str, list[dict]] = {r: [] for r in args.recipes}
    for repeat in range(args.repeats):
        for recipe in args.recipes if repeat % 2 == 0 else args.recipes[::-1]:
            results[recipe].append(run(recipe, data, args))
    target = statistics.median(r["final"] for r in results["gpt2"])
    base_time = statistics.median(time_to(r["curve"], target) or math.inf for r in results["gpt2"])

    from rich.console import Console
    from rich.table import Table

    where = (
        f"{torch.cuda.get_device_name()} bf16"
        if cuda
        else f"{torch.get_num_threads()} threads of {hardware()['cpu']} fp32"
    )
    table = Table(
        title=f"time to the GPT-2 baseline's {args.steps}-step val loss ({target:.3f}), "
        f"{where}, preset {args.preset}, batch {args.batch} x {args.seq}, median of {args.repeats}"
    )
    for col in ("recipe", "tokens/s", f"val loss at {args.steps}", "time to target", "speed-up"):
        table.add_column(col, justify="right")
    for recipe, runs in results.items():
        reached = [time_to(r["curve"], target) for r in runs]
        t = statistics.median(x if x is not None else math.inf for x in reached)
        table.add_row(
            recipe,
            f"{statistics.median(r['tokens_per_s'] for r in runs):,.0f}",
            f"{statistics.median(r['final'] for r in runs):.3f}",
            f"{t:.0f} s" if math.isfinite(t) else "not reached",
            f"{base_time / t:.2f}x" if math.isfinite(t) else "-",
        )
    Console().print(table)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for recipe, runs in results.items():
            xs, ys = zip(*runs[0]["curve"][1:], strict=True)
            ax.plot(xs, ys, label=recipe)
        ax.axhline(target, color="grey", linestyle=":", label="target")
        ax.set(xlabel="training seconds", ylabel="val loss", title=f"time to loss, {where}")
        ax.legend()
        fig.savefig(args.plot, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
