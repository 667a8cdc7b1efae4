"""Time to a target val loss on this CPU: Myna's recipes against a GPT-2 baseline, same shards, same windows.

    python bench/speedrun_cpu.py                                   # 700 steps, gpt2 and myna, 2 repeats
    python bench/speedrun_cpu.py --steps 300 --repeats 1 --recipes gpt2 myna "myna:optimizer=muon,schedule=wsd"

The baseline is written here, as nanoGPT's model.py and train.py make a small GPT-2: LayerNorm without bias, GELU MLP
4x wide, learned positions, tied embedding and head, no dropout, AdamW at 1e-3 with beta2 0.99 and weight decay 0.1,
warmup then cosine to 1e-4. Myna's recipes are its `cpu` preset (a `name:key=value,...` recipe overrides its
TrainConfig or ModelConfig fields). Every recipe has the shape 4 layers x 256, 4 heads, sequence 256, batch 8 x 256,
and sees the same training windows in the same order (the same seeded TokenLoader) and the same 190 held-out
windows. Only training steps are timed; evaluation (every --eval-every steps) is not. Recipes run back to back, the
order reversed on every other repeat, in one process with all cores' threads.

Target: the baseline's val loss at the last step (median over repeats). A recipe's time to target is the training
time at which its val loss first reaches it (linear between evaluations). The table gives tokens/s, final val loss,
time to target and the speed-up against the baseline; --plot FILE draws val loss against training seconds.
"""

import argparse
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
from myna.train.optim import build_optimizer, lr_at, set_lr  # noqa: E402

VOCAB, LAYERS, WIDTH, HEADS, SEQ, BATCH = 4096, 4, 256, 4, 256, 8
VAL_WINDOWS = 190


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
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x)).float()
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def build(recipe: str, steps: int) -> tuple[nn.Module, TrainConfig]:
    """The model and training settings a recipe names: "gpt2", "myna", or "myna:key=value,..."."""
    name, _, overrides = recipe.partition(":")
    if name == "gpt2":
        train = TrainConfig(
            batch_size=BATCH, seq_len=SEQ, steps=steps, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1,
            warmup_steps=30, min_lr_ratio=0.1, schedule="cosine",
        )  # fmt: skip
        return GPT2(VOCAB, LAYERS, WIDTH, HEADS, SEQ), train
    if name != "myna":
        raise SystemExit(f"unknown recipe {recipe!r}: gpt2, myna or myna:key=value,...")
    model_cfg, train = preset("cpu", vocab_size=VOCAB)
    train = replace(train, batch_size=BATCH, seq_len=SEQ, steps=steps)
    model_fields, train_fields = (
        {f.name: f for f in fields(ModelConfig)},
        {f.name: f for f in fields(TrainConfig)},
    )
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        target = "model" if key in model_fields else "train" if key in train_fields else None
        if target is None:
            raise SystemExit(f"{recipe}: {key!r} is no ModelConfig or TrainConfig field")
        kind = (model_fields if target == "model" else train_fields)[key].type
        parsed = (
            value == "true" if kind in (bool, "bool") else value if kind in (str, "str") else float(value)
        )
        if isinstance(parsed, float) and parsed.is_integer() and kind in (int, "int"):
            parsed = int(parsed)
        if target == "model":
            model_cfg = replace(model_cfg, **{key: parsed})
        else:
            train = replace(train, **{key: parsed})
    torch.manual_seed(0)
    return GPT(model_cfg), train


@torch.no_grad()
def val_loss(model: nn.Module, windows: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    losses = [model(x, y)[1].item() for x, y in windows]
    model.train()
    return statistics.fmean(losses)


def run(recipe: str, data: Path, steps: int, eval_every: int) -> dict:
    """Train one recipe from scratch; returns its (training seconds, val loss) curve and tokens/s."""
    torch.manual_seed(0)
    model, cfg = build(recipe, steps)
    opt = build_optimizer(model, cfg)
    train = TokenLoader(data / "shards" / "train", BATCH, SEQ, shuffle_seed=1337)
    val = TokenLoader(data / "shards" / "val", 10, SEQ)
    windows = [next(val) for _ in range(VAL_WINDOWS // 10)]
    curve, seconds = [(0.0, val_loss(model, windows))], 0.0
    for step in range(steps):
        x, y = next(train)
        t0 = time.perf_counter()
        set_lr(opt, lr_at(step, cfg))
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve.append((seconds, val_loss(model, windows)))
            print(f"  {recipe} step {step + 1}: val {curve[-1][1]:.4f} at {seconds:.0f} s", file=sys.stderr)
    return {"curve": curve, "tokens_per_s": steps * BATCH * SEQ / seconds, "final": curve[-1][1]}


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
        subprocess.run([*cmd, "--out", str(cache), "--vocab-size", str(VOCAB)], check=True)
    return cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", type=Path, help="a prepared data folder with vocab 4,096 (default: the sample's)"
    )
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--recipes", nargs="+", default=["gpt2", "myna"])
    ap.add_argument("--plot", type=Path, help="val loss against training seconds, as a PNG")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    data = args.data or prepared_sample(ROOT / "runs" / "bench-speedrun-cpu-data")
    if "gpt2" not in args.recipes:
        args.recipes.insert(0, "gpt2")
    results: dict[str, list[dict]] = {r: [] for r in args.recipes}
    for repeat in range(args.repeats):
        for recipe in args.recipes if repeat % 2 == 0 else args.recipes[::-1]:
            results[recipe].append(run(recipe, data, args.steps, args.eval_every))
    target = statistics.median(r["final"] for r in results["gpt2"])
    base_time = statistics.median(time_to(r["curve"], target) or math.inf for r in results["gpt2"])

    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"time to the GPT-2 baseline's {args.steps}-step val loss ({target:.3f}), "
        f"{torch.get_num_threads()} threads of {hardware()['cpu']}, median of {args.repeats}"
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
        ax.set(xlabel="training seconds", ylabel="val loss", title="time to loss on this CPU")
        ax.legend()
        fig.savefig(args.plot, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
