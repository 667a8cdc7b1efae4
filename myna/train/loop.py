"""The training loop shared by pre-training, SFT and DPO: only the batches, the loss and the evaluation differ.

One optimizer step = grad_accum micro-batches per rank (gradients synchronised on the last one only), gradient
clipping, the learning-rate schedule, then logging, evaluation and checkpointing on their schedules. Step
numbers count finished optimizer steps: the record and the checkpoint of step N describe the model after N
updates, so resuming from step N runs step N + 1 next.

A batch is whatever the loaders yield; `loss_fn(model, batch)` interprets it and returns the loss, or
(loss, stats) where stats maps names to scalar tensors (e.g. DPO's reward margin) that the loop averages over
micro-batches and ranks into the step's record. `eval_fn(model, val_loader, autocast)` returns the evaluation's
record entries; by default the next-token loss and bits per byte of pre-training.
"""

import importlib.util
import json
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from myna.config import TrainConfig
from myna.io import atomic_write
from myna.progress import console
from myna.runs import read_metrics
from myna.train import checkpoint, host_memory
from myna.train.distributed import Dist, gradient_sync, unwrap, wrap
from myna.train.optim import build_optimizer, lr_at, set_lr

# Dense bf16 tensor-core peaks (no sparsity) by device name, for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

LossFn = Callable[[nn.Module, tuple], torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]]
EvalFn = Callable[[nn.Module, object, Callable[[], AbstractContextManager]], dict]


def next_token_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the next token (targets of -1 are ignored)."""
    x, y = batch
    _, loss = model(x, y)
    return loss


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None when it is not in PEAK_BF16_FLOPS (no MFU then)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and ("PCIe" in name or "NVL" in name):
        return None  # lower clocks than SXM; not in the table rather than reported wrong
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for cfg.dtype (None = plain fp32).

    "auto" is bf16 on CUDA and fp32 on CPU: on the CPUs measured (README, Pre-training) bf16 autocast was far
    slower without bf16 instructions and lost loss with them. Set dtype="bfloat16" to try it on another CPU.
    """
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name == "bfloat16":
        return torch.bfloat16
    if name == "float32":
        return None
    raise ValueError(f"dtype={name!r}: expected 'auto', 'float32' or 'bfloat16'")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    val_loader,
    batches: int,
    bytes_per_token: torch.Tensor | None,
    dist: Dist,
    autocast,
) -> tuple[float, float | None]:
    """Mean next-token loss over `batches` val batches (all ranks together) and bits per byte.

    bpb = summed cross-entropy in nats / ln 2 / the UTF-8 bytes of the target tokens; special tokens stand for
    no bytes, but predicting them (e.g. where a document ends) still costs nats, so bpb charges for it.
    """
    model.eval()
    nats = tokens = nbytes = 0.0
    for _ in range(batches):
        x, y = next(val_loader)
        with autocast():
            _, loss = model(x, y)
        valid = y >= 0
        n = valid.sum()
        nats += float(loss.float() * n)
        tokens += float(n)
        if bytes_per_token is not None:
            nbytes += float((bytes_per_token[y.clamp(min=0)] * valid).sum())
    model.train()
    nats, tokens, nbytes = dist.sum([nats, tokens, nbytes])
    bpb = nats / math.log(2) / nbytes if bytes_per_token is not None else None
    return nats / tokens, bpb


class _Metrics:
    """RUN/metrics.jsonl on rank 0: one JSON object per logged step, flushed as written."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # drop the records of steps the resumed run will redo, so every step appears once
            kept = [r for r in read_metrics(run_dir) if r["step"] <= resume_step]
            with atomic_write(self.path, "w") as f:
                f.write("".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a" if resume_step is not None else "w", encoding="utf-8")  # noqa: SIM115
        self.tb = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _last_record(run_dir: Path) -> dict:
    records = read_metrics(run_dir)
    return records[-1] if records else {}


def _restore(ckpt: Path, model: nn.Module, optimizer, train_loader, dist: Dist) -> int:
    """Load a checkpoint to resume from, with this rank's loader position and RNG states; returns its step.

    A damaged checkpoint stops the run with what is wrong and the one to fall back on, never silently.
    """
    try:
        state = checkpoint.load(ckpt, model, optimizer)
        try:
            loader, rng = state["loader"], state["rng"]
            train_loader.load_state_dict(loader[min(dist.rank, len(loader) - 1)])
            checkpoint.set_rng_state(rng[min(dist.rank, len(rng) - 1)])
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise checkpoint.CheckpointError(
                f"{ckpt / 'state.json'}: its loader or RNG state is damaged ({type(e).__name__}: {e})"
            ) from None
    except checkpoint.CheckpointError as e:
        raise checkpoint.CheckpointError(
            f"{e}\n{checkpoint.earlier_hint(ckpt.parent.parent, ckpt)}"
        ) from None
    return state["step"]


def _progress_bar(total: int, start: int) -> Progress:
    bar = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
    )
    bar.add_task("train", total=total, completed=start, info="")
    return bar


def _format(record: dict) -> str:
    parts = [f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}", f"{record['tokens_per_s']:,.0f} tok/s"]
    if "mfu" in record:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.4f}")
    if record.get("val_bpb") is not None:
        parts.append(f"bpb {record['val_bpb']:.4f}")
    shown = {"step", "loss", "lr", "tokens_per_s", "mfu", "val_loss", "val_bpb"}
    parts += [f"{k} {v:.4f}" for k, v in record.items() if k not in shown and isinstance(v, float)]
    return " | ".join(parts)


def train(
    model: nn.Module,
    cfg: TrainConfig,
    train_loader,
    val_loader,
    run_dir: str | Path,
    *,
    dist: Dist | None = None,
    bytes_per_token: torch.Tensor | None = None,
    loss_fn: LossFn = next_token_loss,
    eval_fn: EvalFn | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    resume: bool | str = False,
    extra_state: dict | None = None,
    final_checkpoint: bool = True,
) -> dict:
    """Train `model` (a plain module; wrapped here for DDP/FSDP/HSDP and activation checkpointing) for
    cfg.steps optimizer steps.

    `train_loader` and `val_loader` yield batches for `loss_fn(model, batch)`; they need state_dict and
    load_state_dict (TokenLoader) so that checkpoints can resume them exactly; val_loader is rewound to its
    starting state before every evaluation, so each one reads the same batches. `eval_fn(model, val_loader,
    autocast)` returns the record entries of an evaluation (default: `evaluate`'s val_loss and val_bpb over
    cfg.eval_batches). `bytes_per_token[id]` is the UTF-8 length of each token id (for bits per byte).
    resume=True restores model, optimizer, schedule position, loader and RNG states from the newest checkpoint
    in run_dir/checkpoints, resume="step_N" from that one. `on_step(step, record)` is called after every step.
    `extra_state` is stored in each checkpoint's state.json. final_checkpoint=False
    skips the checkpoint after the last step (benchmarks). Returns the last record.
    """
    dist = dist or Dist()
    run_dir = Path(run_dir)
    model = wrap(model.to(dist.device), dist, cfg.activation_checkpointing)
    optimizer = build_optimizer(unwrap(model), cfg)
    compiled = torch.compile(model) if cfg.compile else model

    if dist.is_main and (removed := checkpoint.remove_leftovers(run_dir)):
        dist.log(f"removed {len(removed)} half-written or half-deleted checkpoint(s) a kill left behind")
    start = 0
    if (ckpt := checkpoint.resume_point(run_dir, resume)) is not None:
        start = _restore(ckpt, model, optimizer, train_loader, dist)
        dist.log(f"resumed from {ckpt} (step {start})")
    val_start = val_loader.state_dict()  # every evaluation reads the same val batches
    autocast = _autocast(cfg.dtype, dist.device)
    if eval_fn is None:
        per_byte = bytes_per_token.to(dist.device) if bytes_per_token is not None else None

        def eval_fn(model, val_loader, autocast) -> dict:
            loss, bpb = evaluate(model, val_loader, cfg.eval_batches, per_byte, dist, autocast)
            return {"val_loss": loss, "val_bpb": bpb}

    tokens_per_step = cfg.tokens_per_step * dist.world_size
    peak = peak_flops(dist.device)
    flops_per_token = unwrap(model).flops_per_token(cfg.seq_len) if peak else 0.0

    metrics = _Metrics(run_dir, start if resume else None) if dist.is_main else None
    bar = _progress_bar(cfg.steps, start) if dist.is_main else None
    if bar is not None:
        bar.start()
    # a finished run that is resumed does no step: its result is the last record it wrote
    record: dict = _last_record(run_dir) if start >= cfg.steps else {}
    t_log, steps_since_log = time.perf_counter(), 0
    with host_memory.kept(dist.device.type == "cpu"):
        try:
            for step in range(start, cfg.steps):
                set_lr(optimizer, lr_at(step, cfg))
                sums = _accumulate(model, compiled, train_loader, loss_fn, cfg, dist, autocast)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                steps_since_log += 1

                is_eval = done % cfg.eval_every == 0 or done == cfg.steps
                if done % cfg.log_every == 0 or is_eval:
                    tokens_per_s = steps_since_log * tokens_per_step / (time.perf_counter() - t_log)
                    loss, stats = _averaged(*sums, cfg, dist)
                    record = {"step": done, "loss": loss, "lr": optimizer.param_groups[0]["lr"]}
                    record["tokens_per_s"] = tokens_per_s
                    if peak:
                        record["mfu"] = flops_per_token * tokens_per_s / (peak * dist.world_size)
                    record.update(stats)
                    if is_eval:
                        val_loader.load_state_dict(val_start)
                        record.update(eval_fn(compiled, val_loader, autocast))
                    if metrics is not None:
                        metrics.write(record)
                        bar.update(bar.task_ids[0], completed=done, info=_format(record))
                        if is_eval:
                            console.print(f"step {done}: {_format(record)}", highlight=False)
                    t_log, steps_since_log = time.perf_counter(), 0  # eval time is not training time
                elif bar is not None:
                    bar.update(bar.task_ids[0], completed=done)

                if (cfg.save_every and done % cfg.save_every == 0) or (
                    done == cfg.steps and final_checkpoint
                ):
                    state = {
                        "config": asdict(cfg),
                        "loader": dist.gather(train_loader.state_dict()),
                        "rng": dist.gather(checkpoint.rng_state()),
                        **(extra_state or {}),
                    }
                    checkpoint.save(run_dir, done, model, optimizer, state, dist, cfg.keep_last)
                    t_log, steps_since_log = time.perf_counter(), 0
                if on_step is not None:
                    on_step(done, record if record.get("step") == done else {"step": done})
        finally:
            if bar is not None:
                bar.stop()
            if metrics is not None:
                metrics.close()
    return record


def _autocast(dtype: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A factory of the forward's autocast context for TrainConfig.dtype (a no-op in plain fp32)."""
    amp_dtype = autocast_dtype(dtype, device)
    if amp_dtype is None:
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=amp_dtype)


def _accumulate(model, compiled, train_loader, loss_fn: LossFn, cfg: TrainConfig, dist: Dist, autocast):
    """Forward and backward over one optimizer step's cfg.grad_accum micro-batches; returns this rank's loss sum
    and the sums of loss_fn's stats, still on the device (read once, when the step is logged)."""
    loss_sum = torch.zeros((), device=dist.device)
    stat_sums: dict[str, torch.Tensor] = {}
    for micro in range(cfg.grad_accum):
        with gradient_sync(model, dist, micro == cfg.grad_accum - 1):
            with autocast():
                loss = loss_fn(compiled, next(train_loader))
            loss, stats = loss if isinstance(loss, tuple) else (loss, {})
            (loss / cfg.grad_accum).backward()
        loss_sum += loss.detach().float()
        for key, value in stats.items():
            stat_sums[key] = stat_sums.get(key, 0.0) + value.detach().float()
    return loss_sum, stat_sums


def _averaged(loss_sum: torch.Tensor, stat_sums: dict, cfg: TrainConfig, dist: Dist) -> tuple[float, dict]:
    """The step's loss and stats averaged over micro-batches and ranks, in one reduction."""
    keys = sorted(stat_sums)
    loss, *stats = dist.sum(
        [loss_sum.item() / cfg.grad_accum] + [stat_sums[k].item() / cfg.grad_accum for k in keys]
    )
    return loss / dist.world_size, {k: v / dist.world_size for k, v in zip(keys, stats, strict=True)}
