"""Optimizers and learning-rate schedules.

AdamW gets two parameter groups: matrices decay, while norms, biases, embeddings and every other 1-D parameter
do not (shrinking a gain or an embedding row towards zero is not regularisation, it is damage). Muon is the
option for the 2-D matrices inside the transformer blocks: SGD momentum whose update is replaced by the nearest
semi-orthogonal matrix (Newton-Schulz iteration), so every direction of the matrix moves by the same amount; the
embeddings, the output head and the 1-D parameters stay on AdamW inside the same optimizer object, so one
state_dict checkpoints both.
"""

import math

import torch
from torch import nn

from myna.config import TrainConfig

# Coefficients of the quintic Newton-Schulz iteration from the Muon write-up (Jordan et al., 2024): chosen to
# push every singular value into roughly [0.7, 1.2] within five steps, which is close enough to 1 for training.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def _no_decay(name: str, p: nn.Parameter, embeddings: set[int]) -> bool:
    return p.ndim < 2 or id(p) in embeddings or name.endswith(".bias")


def _embedding_ids(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay for matrices, none for norms, biases, embeddings and 1-D parameters."""
    emb = _embedding_ids(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once
        if p.requires_grad:
            (no_decay if _no_decay(name, p, emb) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "use_muon": False},
        {"params": no_decay, "weight_decay": 0.0, "use_muon": False},
    ]


def muon_param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Muon for the 2-D matrices inside `model.blocks`; AdamW groups (as param_groups) for everything else."""
    in_blocks = {id(p) for p in model.blocks.parameters()}
    emb = _embedding_ids(model)
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 2 and id(p) in in_blocks:
            muon.append(p)
        else:
            (no_decay if _no_decay(name, p, emb) else decay).append(p)
    groups = [
        {"params": muon, "lr": cfg.muon_lr, "weight_decay": cfg.weight_decay, "use_muon": True},
        {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "use_muon": False},
        {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0, "use_muon": False},
    ]
    return [g for g in groups if g["params"]]


def has_bf16_matmul(device: torch.device) -> bool:
    """Whether bf16 matmuls run in hardware on device: CUDA, or a CPU with AVX512-BF16 or AMX tiles."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private in torch.cpu: absent = no
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def newton_schulz_dtype(name: str, device: torch.device) -> torch.dtype:
    """TrainConfig.muon_dtype as a dtype: "auto" is bf16 where has_bf16_matmul, else fp32."""
    if name == "auto":
        return torch.bfloat16 if has_bf16_matmul(device) else torch.float32
    if name in ("float32", "bfloat16"):
        return getattr(torch, name)
    raise ValueError(f"muon_dtype={name!r}: expected 'auto', 'float32' or 'bfloat16'")


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T, by the quintic Newton-Schulz iteration, computed in dtype."""
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + 1e-7)  # Frobenius norm >= spectral norm, so singular values start in [0, 1]
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole matrix of a (possibly FSDP-sharded) tensor: Newton-Schulz needs all of it."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `ref` (sharded again when ref is a DTensor; every rank holds the same `full`)."""
    if hasattr(ref, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, ref.device_mesh, ref.placements)
    return full


class Muon(torch.optim.Optimizer):
    """Muon for groups with use_muon=True (Nesterov momentum, orthogonalised update, decoupled weight decay),
    AdamW for the other groups. Learning rates are per group, so the schedule scales each one."""

    def __init__(
        self,
        groups: list[dict],
        momentum: float = 0.95,
        betas=(0.9, 0.95),
        eps: float = 1e-8,
        ns_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(groups, {"momentum": momentum, "betas": betas, "eps": eps, "weight_decay": 0.0})
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)

    def _muon_step(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(p.grad)
            nesterov = p.grad.add(buf, alpha=mu)
            update = _like(orthogonalize(_full(nesterov), dtype=self.ns_dtype), p)
            # An orthogonal update has unit singular values; scale so tall matrices get the same RMS step.
            scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
            p.mul_(1 - lr * wd)
            p.add_(update, alpha=-lr * scale)

    def _adamw_step(self, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"].item()
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(eps)
            p.mul_(1 - lr * wd)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names; every group remembers its peak lr as "base_lr" for the schedule."""
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None
        )
    elif cfg.optimizer == "muon":
        device = next(model.parameters()).device
        ns_dtype = newton_schulz_dtype(cfg.muon_dtype, device)
        opt = Muon(muon_param_groups(model, cfg), betas=tuple(cfg.betas), ns_dtype=ns_dtype)
    else:
        raise ValueError(f"optimizer={cfg.optimizer!r}: expected 'adamw' or 'muon'")
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    return opt


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier (0..1] for the optimizer step `step` (0-based) of cfg.steps.

    Linear warmup over warmup_steps, then either cosine down to min_lr_ratio at the last step ("cosine"), or
    flat until the final decay_ratio of the steps and a straight line down to min_lr_ratio ("wsd").
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_ratio * cfg.steps))
        decay_start = max(cfg.warmup_steps, cfg.steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = (step + 1 - decay_start) / max(1, cfg.steps - decay_start)
        return 1.0 - (1 - cfg.min_lr_ratio) * min(1.0, progress)
    raise ValueError(f"schedule={cfg.schedule!r}: expected 'cosine' or 'wsd'")


def set_lr(opt: torch.optim.Optimizer, multiplier: float) -> None:
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * multiplier
