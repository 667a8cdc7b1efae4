"""`myna plan`: what a training run needs before a GPU is rented.

A model's parameters and training FLOPs per token; its memory per GPU under DDP, FSDP and HSDP, with and without
activation checkpointing, and the largest micro-batch that fits; then tokens per second at a stated MFU (model
FLOPs utilisation), tokens a day, days to a token budget and what the GPU-hours cost. Arithmetic on a ModelConfig
only: no torch, no GPU, so it plans a 405B model on a laptop in milliseconds.

The memory model is what Myna's trainer keeps (myna/train/distributed.py, loop.py, optim.py): fp32 parameters
(the master weights), fp32 gradients and AdamW's two fp32 moments; bf16 compute (autocast under DDP, FSDP2's
param_dtype under FSDP/HSDP); the loss in fp32. Only data parallelism is modelled, as only it is in Myna: tensor,
pipeline and context parallelism would shard weights and activations further.
"""

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

from rich.table import Table

from myna.config import LLAMA3_VOCAB, TOKENS_PER_PARAM, ModelConfig, from_depth, preset

GIB = 2**30
# bytes per element
FP32, BF16 = 4, 2


@dataclass(frozen=True)
class Gpu:
    name: str
    # dense bf16 tensor-core FLOP/s (no sparsity): the denominator of MFU
    peak_flops: float
    # HBM as sold, in 10^9 bytes (nvidia-smi shows a little more: 81,559 MiB on an 80 GB H100)
    memory_gb: float
    # default price of one GPU-hour, in US dollars
    usd_per_hour: float


# Peaks and memory from NVIDIA's datasheets (the same peaks as myna.train.loop.PEAK_BF16_FLOPS, which measures MFU).
# Prices are rough 2025 on-demand rates at GPU clouds, a placeholder for your own: --usd-per-gpu-hour sets it.
GPUS = {
    # H100 SXM: 989 TFLOPS dense bf16, 80 GB HBM3
    "h100": Gpu("H100 SXM 80GB", 989e12, 80, 2.50),
    # H200: the H100's compute with 141 GB of HBM3e
    "h200": Gpu("H200 141GB", 989e12, 141, 3.50),
    # A100 SXM: 312 TFLOPS dense bf16, 80 GB HBM2e
    "a100": Gpu("A100 80GB", 312e12, 80, 1.50),
    # B200: 4.5 PFLOPS dense fp8, bf16 at half the fp8 rate; 192 GB HBM3e
    "b200": Gpu("B200 192GB", 2250e12, 192, 5.00),
}
GpuName = Literal["h100", "h200", "a100", "b200"]

# Kept free of the plan: the CUDA context, NCCL's buffers and the caching allocator's fragmentation. A margin
# chosen, not measured; a micro-batch that fits only without it is not one to start a week-long run with.
HEADROOM = 0.10
# MFU reached by well-tuned dense training on H100s: torchtitan's Llama-3.1-8B on 8 GPUs runs at 39% (its
# docs/performance.md), Llama 3 405B's pre-training at 38-43% (the Llama 3 paper, table 4).
DEFAULT_MFU = 0.40
# Myna's hsdp shards within a node (distributed.py: shard_size defaults to LOCAL_WORLD_SIZE): 8 GPUs in an HGX node
GPUS_PER_NODE = 8
# Tokens in one post: the speedrun corpus's 2.54M training tokens over its 105,311 posts (Myna's 8,192-token BPE,
# <|bos|> included); a larger vocabulary packs a post into fewer
TOKENS_PER_POST = 24

# Published shapes (the Llama 3 paper, table 3): 8 kv heads, vocab 128,256, untied embeddings, 8k context. Myna's
# 8b and 70b presets are the first two; 405B has no preset.
PUBLISHED = {
    "llama3-8b": {"n_layer": 32, "n_embd": 4096, "n_head": 32, "mlp_hidden": 14336},
    "llama3-70b": {"n_layer": 80, "n_embd": 8192, "n_head": 64, "mlp_hidden": 28672},
    "llama3-405b": {"n_layer": 126, "n_embd": 16384, "n_head": 128, "mlp_hidden": 53248},
}


def published_model(name: str) -> ModelConfig:
    """A published shape of PUBLISHED as a ModelConfig."""
    if name not in PUBLISHED:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(PUBLISHED)}")
    return ModelConfig(
        vocab_size=LLAMA3_VOCAB,
        n_kv_head=8,
        max_seq_len=8192,
        rope_theta=500000.0,
        qk_norm=False,
        tie_embeddings=False,
        **PUBLISHED[name],
    )


# FLOPs


def _block_matmul_weights(cfg: ModelConfig) -> int:
    """One block's nn.Linear weights: q, k, v, o (grouped-query: k and v are n_kv_head wide), gate, up, down."""
    d, q, kv = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    return d * q + 2 * d * kv + q * d + 3 * d * cfg.mlp_hidden


def matmul_weights(cfg: ModelConfig) -> int:
    """Weights a token is multiplied by: every nn.Linear, the lm_head included whether tied or not (its matmul
    runs either way); the embedding lookup and the norm weights cost no matmul."""
    return cfg.n_layer * _block_matmul_weights(cfg) + cfg.vocab_size * cfg.n_embd


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): GPT.flops_per_token's formula from the shapes alone (a 405B
    GPT takes seconds to build even on the meta device). 6 x the matmul weights (2 forward, 4 backward), plus
    12 * n_layer * n_embd * seq_len for attention's scores and values, the PaLM / nanoGPT convention that ignores
    the causal mask's savings. torchtitan counts the same way, and so does the MFU the trainer logs."""
    return 6.0 * matmul_weights(cfg) + 12.0 * cfg.n_layer * cfg.n_embd * seq_len


# Memory


@dataclass
class Memory:
    """Bytes one GPU holds at the peak of a micro-step: the start of backward, when every activation is alive."""

    # fp32 master weights (this GPU's shard under fsdp/hsdp)
    weights: float
    # fp32 gradients (under ddp twice: the .grad tensors and DDP's reduction buckets)
    grads: float
    # AdamW's exp_avg and exp_avg_sq, fp32
    optimizer: float
    # bf16 working copies: autocast's (ddp), or the blocks and root FSDP has gathered
    gathered: float
    # what the blocks keep for backward, bf16
    activations: float
    # the fp32 loss over the vocabulary and its gradient
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.gathered + self.activations + self.logits


def activation_elements(cfg: ModelConfig) -> int:
    """Elements one Block keeps for backward per token, counted op by op in Myna's Block with flash attention (no
    seq x seq scores) and a fused RMSNorm (it keeps its input and a per-row rstd). d = n_embd, kv = n_kv_head *
    head_dim, f = mlp_hidden.

    attention: the norm's input, q/k/v's shared input, SDPA's q, k, v and output: 4d + 2kv (o's input is a view of
    SDPA's output, which flash kernels lay out [B, T, H, D]); QK-norm adds its inputs q and k: d + kv.
    MLP: the norm's input, gate/up's shared input, silu's input, the product's two factors, down's input: 2d + 4f.
    Per-row statistics (rstd, attention's logsumexp) are left out. PyTorch's unfused rms_norm (CPU, eager) keeps
    the normalised input as well: d more per norm (tests/test_plan.py measures both).
    """
    d, kv, f = cfg.n_embd, cfg.n_kv_head * cfg.head_dim, cfg.mlp_hidden
    qk_norm = d + kv if cfg.qk_norm else 0
    return 4 * d + 2 * kv + qk_norm + 2 * d + 4 * f


def activation_bytes(cfg: ModelConfig, tokens: int, checkpointing: bool) -> float:
    """Activation memory of one micro-batch of `tokens` tokens, in bf16.

    Without checkpointing every block keeps activation_elements per token. With per-block checkpointing
    (distributed.checkpoint_activations) each block keeps only its input (n_embd), and backward rebuilds one
    block's activations at a time. Both add the final norm's and the lm_head's inputs (2 * n_embd).
    """
    per_block = activation_elements(cfg)
    kept = cfg.n_layer * cfg.n_embd + per_block if checkpointing else cfg.n_layer * per_block
    return BF16 * tokens * (kept + 2 * cfg.n_embd)


# Bytes per token and vocabulary entry at the loss's peak (model.lm_loss: logits.float(), then cross_entropy): the
# saved fp32 log-softmax, the gradient arriving at it and the one it passes on, 4 bytes each, alive together at
# the start of backward. The bf16 logits and their fp32 copy are freed when forward ends.
LOGIT_BYTES = 12


def memory_per_gpu(
    cfg: ModelConfig,
    parallel: Literal["ddp", "fsdp", "hsdp"],
    gpus: int,
    seq_len: int,
    micro_batch: int,
    checkpointing: bool,
    shard_size: int = GPUS_PER_NODE,
) -> Memory:
    """One GPU's memory when `gpus` GPUs train `cfg` on micro-batches of micro_batch x seq_len tokens.

    ddp: every GPU holds everything; gradients twice, as DDP reduces through its own fp32 buckets (Myna leaves
    gradient_as_bucket_view off; one GPU trains without DDP, so without them); and autocast's bf16 copies of the
    matmul weights, kept for backward.
    fsdp: parameters, gradients and optimizer state split over all GPUs. Gathered in bf16: the two blocks FSDP2
    holds at once (the one computing and the one prefetched) and the root (embedding, final norm, lm_head), which
    FSDP2 keeps whole from forward to the end of backward, with the lm_head's bf16 gradient.
    hsdp: fsdp within groups of shard_size GPUs (a node), the groups replicas of each other.
    """
    params = cfg.num_params()
    tokens = micro_batch * seq_len
    if parallel == "ddp":
        shards, gathered = 1, BF16 * matmul_weights(cfg)
    elif parallel in ("fsdp", "hsdp"):
        shards = gpus if parallel == "fsdp" else min(shard_size, gpus)
        # RMSNorm weights: two per block, and QK-norm's two per head dimension
        block = _block_matmul_weights(cfg) + 2 * cfg.n_embd + (2 * cfg.head_dim if cfg.qk_norm else 0)
        root = params - cfg.n_layer * block
        gathered = BF16 * (2 * block + root + cfg.vocab_size * cfg.n_embd)
    else:
        raise ValueError(f"parallel={parallel!r}: expected ddp, fsdp or hsdp")
    return Memory(
        weights=FP32 * params / shards,
        grads=FP32 * params / shards * (2 if parallel == "ddp" and gpus > 1 else 1),
        optimizer=2 * FP32 * params / shards,
        gathered=gathered,
        activations=activation_bytes(cfg, tokens, checkpointing),
        logits=LOGIT_BYTES * tokens * cfg.vocab_size,
    )


def usable_bytes(gpu: Gpu) -> float:
    """GPU memory a plan may fill: what the card has, less HEADROOM."""
    return gpu.memory_gb * 1e9 * (1 - HEADROOM)


def largest_micro_batch(cfg: ModelConfig, gpu: Gpu, seq_len: int, **layout) -> int:
    """The most sequences of seq_len per GPU that fit in usable_bytes (0: not even the states fit).

    Memory is a fixed part (states, gathered copies) plus a part linear in the micro-batch (activations, logits).
    """
    fixed = memory_per_gpu(cfg, seq_len=seq_len, micro_batch=0, **layout).total
    per_sequence = memory_per_gpu(cfg, seq_len=seq_len, micro_batch=1, **layout).total - fixed
    return max(0, math.floor((usable_bytes(gpu) - fixed) / per_sequence))


# Time and money


def tokens_per_second(cfg: ModelConfig, seq_len: int, gpu: Gpu, mfu: float) -> float:
    """Training tokens per second on one GPU that runs at `mfu` of its peak (MFU counts model FLOPs only: the
    recomputation activation checkpointing adds is not in it, so checkpointing lowers the MFU a run reaches)."""
    return mfu * gpu.peak_flops / flops_per_token(cfg, seq_len)


@dataclass
class Layout:
    """One way of laying the model out over the GPUs, its memory at the plan's micro-batch and its largest."""

    parallel: str
    checkpointing: bool
    memory: Memory
    largest_micro_batch: int


@dataclass
class Plan:
    model: str
    params: int
    flops_per_token: float
    seq_len: int
    # sequences per GPU per micro-step
    micro_batch: int
    gpus: int
    gpu: str
    mfu: float
    usd_per_gpu_hour: float
    # per GPU, after HEADROOM
    usable_bytes: float
    layouts: list[Layout]
    tokens_per_s_per_gpu: float
    # one micro-batch's forward and backward (an optimizer step is grad_accum of them)
    step_s: float
    # all GPUs together
    tokens_per_day: float
    # the training budget, and it in posts of TOKENS_PER_POST
    tokens: float
    posts: float
    days: float
    gpu_hours: float
    cost_usd: float

    def to_dict(self) -> dict:
        d = asdict(self)
        for row, layout in zip(d["layouts"], self.layouts, strict=True):
            row["memory"]["total"] = layout.memory.total
        return d


# The vocabulary of --depth shapes without --vocab-size: GPT-2's 50,257 padded to a multiple of 64, as Myna's GPU
# presets use
DEPTH_VOCAB = 50304


def resolve_model(
    preset_name: str | None, model: str | None, depth: int | None, vocab_size: int | None
) -> tuple[str, ModelConfig, int, int]:
    """(name, shape, seq_len, micro-batch) of the one model asked for: a Myna preset, a published shape or a
    from_depth dial. A preset's and a dial's sequence length and micro-batch are its training settings'; a
    published shape trains on its full context, one sequence at a time."""
    if sum(x is not None for x in (preset_name, model, depth)) != 1:
        raise ValueError("give one of --preset, --model or --depth")
    if preset_name is not None:
        cfg, train = preset(preset_name, vocab_size)
        return preset_name, cfg, train.seq_len, train.batch_size
    if depth is not None:
        cfg, train = from_depth(depth, vocab_size or DEPTH_VOCAB)
        return f"depth {depth}", cfg, train.seq_len, train.batch_size
    if vocab_size is not None:
        raise ValueError(f"--vocab-size does not apply to {model}: a published shape has its own")
    cfg = published_model(model)
    return model, cfg, cfg.max_seq_len, 1


def count(text: str) -> float:
    """A count written 15.6T, 300B, 2.5M, 20k or 1.5e12."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}.get(text[-1:].lower())
    try:
        return float(text[:-1]) * scale if scale else float(text)
    except ValueError:
        raise ValueError(f"{text!r}: expected a number such as 15.6T, 300B, 2.5M or 1.5e12") from None


def plan(
    # a Myna preset: tiny, cpu, 124m, 350m, 1b, 8b, 70b
    preset: str | None = None,
    # or a published shape: llama3-8b, llama3-70b, llama3-405b
    model: str | None = None,
    # or config.from_depth's one dial (width 64 x depth)
    depth: int | None = None,
    # the tokenizer's vocabulary (default: the preset's; 50304 for --depth)
    vocab_size: int | None = None,
    # GPUs training together
    gpus: int = 8,
    # the GPU kind
    gpu: GpuName = "h100",
    # tokens per sequence (default: the preset's, or the published model's context)
    seq_len: int | None = None,
    # sequences per GPU per micro-step (default: the preset's; 1 for a published shape)
    micro_batch: int | None = None,
    # tokens to train on, e.g. 15.6T (default: 20 per parameter, Chinchilla)
    tokens: float | None = None,
    # model FLOPs utilisation the run reaches
    mfu: float = DEFAULT_MFU,
    # price of a GPU-hour in US dollars (default: a rough cloud rate for the GPU kind)
    usd_per_gpu_hour: float | None = None,
    # hsdp: GPUs per shard group (a node)
    shard_size: int = GPUS_PER_NODE,
) -> Plan:
    """The plan for training one model on `gpus` GPUs of kind `gpu`."""
    name, cfg, default_seq, default_batch = resolve_model(preset, model, depth, vocab_size)
    seq_len = seq_len or default_seq
    micro_batch = default_batch if micro_batch is None else micro_batch
    if gpus < 1 or seq_len < 1 or micro_batch < 1 or shard_size < 1:
        raise ValueError("--gpus, --seq-len, --micro-batch and --shard-size must be at least 1")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu {mfu}: expected a fraction in (0, 1], e.g. 0.4")
    if gpu not in GPUS:
        raise ValueError(f"unknown gpu {gpu!r}; expected one of {', '.join(GPUS)}")
    card = GPUS[gpu]
    # a plan may ask for a longer context than the preset trains on; only the RoPE table would grow
    cfg = replace(cfg, max_seq_len=max(cfg.max_seq_len, seq_len))
    # hsdp's shard groups must tile the GPUs, as the trainer's mesh does
    hsdp = gpus % min(shard_size, gpus) == 0
    layouts = []
    for parallel in ("ddp", "fsdp", "hsdp") if hsdp else ("ddp", "fsdp"):
        for checkpointing in (False, True):
            layout = {"parallel": parallel, "gpus": gpus, "checkpointing": checkpointing}
            layout["shard_size"] = shard_size
            memory = memory_per_gpu(cfg, seq_len=seq_len, micro_batch=micro_batch, **layout)
            largest = largest_micro_batch(cfg, card, seq_len, **layout)
            layouts.append(Layout(parallel, checkpointing, memory, largest))

    per_gpu = tokens_per_second(cfg, seq_len, card, mfu)
    per_day = gpus * per_gpu * 86400
    tokens = TOKENS_PER_PARAM * cfg.num_params() if tokens is None else tokens
    days = tokens / per_day
    price = card.usd_per_hour if usd_per_gpu_hour is None else usd_per_gpu_hour
    return Plan(
        model=name,
        params=cfg.num_params(),
        flops_per_token=flops_per_token(cfg, seq_len),
        seq_len=seq_len,
        micro_batch=micro_batch,
        gpus=gpus,
        gpu=card.name,
        mfu=mfu,
        usd_per_gpu_hour=price,
        usable_bytes=usable_bytes(card),
        layouts=layouts,
        tokens_per_s_per_gpu=per_gpu,
        step_s=micro_batch * seq_len / per_gpu,
        tokens_per_day=per_day,
        tokens=tokens,
        posts=tokens / TOKENS_PER_POST,
        days=days,
        gpu_hours=gpus * days * 24,
        cost_usd=gpus * days * 24 * price,
    )


# Printing


def _si(x: float) -> str:
    """1.2T, 340B, 5.6M, 7.8k."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def _duration(days: float) -> str:
    if days >= 1:
        return f"{days:,.1f} days"
    hours = days * 24
    return f"{hours:.1f} hours" if hours >= 1 else f"{hours * 60:.1f} minutes"


def _pairs(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def tables(p: Plan) -> list[Table]:
    """The plan as three rich tables: the model, memory per GPU by layout, time and cost."""
    model = _pairs(
        f"{p.model} on {p.gpus:,} x {p.gpu}",
        [
            ("parameters", f"{p.params:,} ({_si(p.params)})"),
            ("FLOPs per token", f"{_si(p.flops_per_token)} (6N + attention)"),
            ("micro-batch per GPU", f"{p.micro_batch} x {p.seq_len:,} tokens"),
        ],
    )

    memory = Table(
        title=f"memory per GPU in GiB at micro-batch {p.micro_batch}: {p.usable_bytes / GIB:.1f} usable "
        f"({HEADROOM:.0%} headroom); AC = activation checkpointing",
        title_justify="left",
    )
    parts = ("weights", "grads", "optimizer", "gathered", "activations", "logits")
    memory.add_column("layout", no_wrap=True)
    for column in (*parts, "total", "largest micro-batch"):
        memory.add_column(column, justify="right")
    for layout in p.layouts:
        m = layout.memory
        total = f"{m.total / GIB:,.1f}"
        total = total if m.total <= p.usable_bytes else f"[red]{total}[/]"
        largest = str(layout.largest_micro_batch) if layout.largest_micro_batch else "[red]none fits[/]"
        name = layout.parallel + (" + AC" if layout.checkpointing else "")
        memory.add_row(name, *(f"{getattr(m, part) / GIB:,.1f}" for part in parts), total, largest)

    cost = _pairs(
        f"time and cost at {p.mfu:.0%} MFU",
        [
            ("tokens/s per GPU", f"{p.tokens_per_s_per_gpu:,.0f}"),
            ("micro-step (forward + backward)", f"{p.step_s:.3g} s"),
            ("tokens a day", _si(p.tokens_per_day)),
            ("tokens to train on", f"{_si(p.tokens)} (~{_si(p.posts)} posts of {TOKENS_PER_POST} tokens)"),
            ("time", _duration(p.days)),
            ("GPU-hours", f"{p.gpu_hours:,.0f}"),
            ("cost", f"${p.cost_usd:,.0f} at ${p.usd_per_gpu_hour:.2f} a GPU-hour"),
        ],
    )
    return [model, memory, cost]
