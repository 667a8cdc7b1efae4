"""Model and training configurations: one dial (depth) that sizes everything, plus named presets.

`from_depth(depth, vocab)` follows nanochat: width = 64 * depth, heads of 64 (or 128 from width 1024 up),
SwiGLU hidden ~8/3 * width, a peak learning rate that shrinks with width, and a token horizon of 20 tokens
per parameter (Chinchilla) turned into optimizer steps. Presets are fixed shapes (GPT-2 small, Llama-3 8B/70B,
...) whose training settings come from the same rules unless a comment says otherwise.

Batch convention: `batch_size * grad_accum * seq_len` is the number of tokens per optimizer step on ONE rank;
with N data-parallel ranks the global batch is N times that (the trainer may divide grad_accum by N).
"""

import math
from dataclasses import dataclass, fields, replace

# The largest value of each shape setting Myna builds: far past any model it trains, small enough that a typo or
# a hostile config.json fails here, in a line, instead of allocating for minutes.
LIMITS = {
    "vocab_size": 1 << 22,
    "n_layer": 1024,
    "n_head": 1024,
    "n_kv_head": 1024,
    "n_embd": 1 << 16,
    "mlp_hidden": 1 << 18,
    "max_seq_len": 1 << 20,
}


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4  # < n_head = grouped-query attention
    n_embd: int = 256
    mlp_hidden: int = 768  # SwiGLU hidden size
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = True
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in LIMITS:
                if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= LIMITS[f.name]:
                    raise ValueError(f"{f.name}={value!r}: expected an integer from 1 to {LIMITS[f.name]:,}")
            elif f.type is bool or f.type == "bool":
                if not isinstance(value, bool):
                    raise ValueError(f"{f.name}={value!r}: expected true or false")
            elif not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ValueError(f"{f.name}={value!r}: expected a positive finite number")
        if self.norm_eps >= 1:
            raise ValueError(f"norm_eps={self.norm_eps}: expected a small positive number, below 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count computed from the shapes alone (equals GPT(cfg).num_params(...))."""
        c, h, kv, d = self.n_embd, self.n_head, self.n_kv_head, self.head_dim
        attn = c * h * d + 2 * c * kv * d + h * d * c + (2 * d if self.qk_norm else 0)
        block = attn + 3 * c * self.mlp_hidden + 2 * c  # + two RMSNorm weights
        emb = self.vocab_size * c
        head = 0 if self.tie_embeddings else self.vocab_size * c
        return self.n_layer * block + c + head + (0 if exclude_embeddings else emb)

    def weight_bytes(self) -> int:
        """Memory of the built model in fp32: its parameters and its two RoPE tables."""
        return 4 * (self.num_params() + self.max_seq_len * self.head_dim)


@dataclass
class TrainConfig:
    batch_size: int = 8  # sequences per micro-batch per rank
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per optimizer step (per rank)
    steps: int = 100
    lr: float = 3e-3  # peak AdamW learning rate
    muon_lr: float = 0.02  # used when optimizer == "muon" (for 2D hidden matrices)
    optimizer: str = "adamw"  # "adamw" | "muon"
    # Muon's Newton-Schulz iteration: "auto" = bf16 where matmuls have bf16 hardware (CUDA, CPUs with AVX512-BF16
    # or AMX; twice as fast as fp32 on the Zen 4 measured), fp32 elsewhere (emulated bf16 is slower); or
    # "float32" | "bfloat16"
    muon_dtype: str = "auto"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: str = "cosine"  # "cosine" | "wsd"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    decay_ratio: float = 0.2  # share of steps in WSD's final decay
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    log_every: int = 1
    seed: int = 1337
    dtype: str = "auto"  # "auto" | "float32" | "bfloat16" (autocast)
    compile: bool = False
    # recompute each transformer block's activations in backward: one block's activation memory instead of all
    # of them, for about a third more compute
    activation_checkpointing: bool = False

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step on one rank (multiply by the data-parallel world size)."""
        return self.batch_size * self.grad_accum * self.seq_len


TOKENS_PER_PARAM = 20  # Chinchilla-optimal token horizon
BASE_LR, BASE_WIDTH = 6e-4, 768  # GPT-2 small's AdamW peak lr; wider models get lr * sqrt(768 / width)


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


def scaled_lr(n_embd: int) -> float:
    """Peak AdamW lr for a width: 6e-4 at 768, scaled by 1/sqrt(width / 768)."""
    return BASE_LR * math.sqrt(BASE_WIDTH / n_embd)


def train_config_for(
    model: ModelConfig, seq_len: int, batch_size: int, tokens_per_step: int, **overrides
) -> TrainConfig:
    """Training settings from the shared rules: lr from width, steps from 20 tokens per parameter."""
    micro_tokens = batch_size * seq_len
    if tokens_per_step % micro_tokens:
        raise ValueError(f"tokens_per_step={tokens_per_step} is not a multiple of batch*seq={micro_tokens}")
    grad_accum = tokens_per_step // micro_tokens
    steps = max(1, math.ceil(TOKENS_PER_PARAM * model.num_params() / tokens_per_step))
    # AdamW + cosine (TrainConfig's defaults) stay the rule's recipe: Muon + WSD won on the cpu shape
    # (bench/speedrun.py) but is unmeasured at these widths and batches; bench/gpu.sh compares both on 124m.
    train = TrainConfig(
        batch_size=batch_size,
        seq_len=seq_len,
        grad_accum=grad_accum,
        steps=steps,
        lr=scaled_lr(model.n_embd),
        warmup_steps=max(10, min(2000, steps // 50)),  # ~2% warmup, at least 10 and at most 2000 steps
        eval_every=max(50, steps // 100),
    )
    return replace(train, **overrides)


def from_depth(depth: int, vocab_size: int) -> tuple[ModelConfig, TrainConfig]:
    """The one dial: depth -> width, heads, MLP, batch, learning rate and token horizon (nanochat-style)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    n_embd = 64 * depth
    head_dim = 128 if n_embd >= 1024 and n_embd % 128 == 0 else 64
    n_head = n_embd // head_dim
    gqa = n_head >= 16 and n_head % 4 == 0
    n_kv_head = n_head // 4 if gqa else n_head  # GQA (4 queries per kv head) from 16 heads up
    seq_len = 2048 if n_embd >= 1024 else 1024
    model = ModelConfig(
        vocab_size=vocab_size,
        n_layer=depth,
        n_head=n_head,
        n_kv_head=n_kv_head,
        n_embd=n_embd,
        mlp_hidden=_round_up(8 / 3 * n_embd, 64),
        max_seq_len=seq_len,
    )
    tokens_per_step = 2**19 if n_embd < 2048 else 2**20  # 0.5M tokens (GPT-3 small/medium), 1M from 2048 wide
    micro_tokens = 2**15 if depth <= 24 else 2**14  # deeper: less activation memory
    batch_size = micro_tokens // seq_len
    return model, train_config_for(model, seq_len, batch_size, tokens_per_step)


def _tiny(vocab: int) -> tuple[ModelConfig, TrainConfig]:
    # Tests: ~0.1M non-embedding params; trains in seconds on 2 CPU cores. Higher lr than the width rule
    # because a short run with QK-norm tolerates it.
    model = ModelConfig(
        vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, mlp_hidden=192, max_seq_len=128
    )
    train = TrainConfig(batch_size=8, seq_len=128, steps=200, lr=3e-3, warmup_steps=10, eval_every=50)
    return model, train


def _cpu(vocab: int) -> tuple[ModelConfig, TrainConfig]:
    # About 10 minutes of 2 CPU cores in fp32 (README): far short of 20 tokens/param, so the lr is set for a
    # short horizon rather than by the width rule, and the batch is small because more updates won at equal tokens.
    model = ModelConfig(
        vocab_size=vocab, n_layer=4, n_head=4, n_kv_head=4, n_embd=256, mlp_hidden=704, max_seq_len=256
    )
    # Muon on the block matrices with a warmup-stable-decay schedule: bench/speedrun.py has it reach a GPT-2
    # baseline's 700-step val loss in 37% of the baseline's time (AdamW + cosine: 62%) and end far lower. 760 steps
    # take the time 540 did before training kept its host memory and Newton-Schulz ran in bf16 (README,
    # Pre-training). This preset's first recipe: `optimizer: adamw`, `schedule: cosine`, `steps: 700` in a --config.
    train = TrainConfig(
        batch_size=8,
        seq_len=256,
        steps=760,
        lr=3e-3,
        optimizer="muon",
        schedule="wsd",
        warmup_steps=30,
        eval_every=100,
        save_every=200,
    )
    return model, train


def _gpt2_small(vocab: int) -> tuple[ModelConfig, TrainConfig]:
    return from_depth(12, vocab)  # 12 x 768, 12 heads of 64, SwiGLU 2048 (as many weights as GPT-2's 4x MLP)


def _gpt3_medium(vocab: int) -> tuple[ModelConfig, TrainConfig]:
    # GPT-3 Medium's shape: 24 x 1024, 16 heads of 64
    model = ModelConfig(
        vocab_size=vocab,
        n_layer=24,
        n_head=16,
        n_kv_head=16,
        n_embd=1024,
        mlp_hidden=_round_up(8 / 3 * 1024, 64),
        max_seq_len=2048,
    )
    return model, train_config_for(model, seq_len=2048, batch_size=16, tokens_per_step=2**19)


def _one_b(vocab: int) -> tuple[ModelConfig, TrainConfig]:
    # Llama-3.2-1B's trunk (16 x 2048, MLP 8192) with 16 heads of 128 and 4 kv heads
    model = ModelConfig(
        vocab_size=vocab,
        n_layer=16,
        n_head=16,
        n_kv_head=4,
        n_embd=2048,
        mlp_hidden=8192,
        max_seq_len=2048,
        rope_theta=500000.0,
    )
    return model, train_config_for(model, seq_len=2048, batch_size=8, tokens_per_step=2**20)


LLAMA3_VOCAB = 128256


def _llama3(n_layer: int, n_head: int, n_embd: int, mlp_hidden: int, tokens_per_step: int, lr: float):
    """Llama-3's shape family: 8 kv heads, 8k context, RoPE theta 500k, no QK-norm, untied, its 128k vocab."""
    model = ModelConfig(
        vocab_size=LLAMA3_VOCAB,
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=8,
        n_embd=n_embd,
        mlp_hidden=mlp_hidden,
        max_seq_len=8192,
        rope_theta=500000.0,
        qk_norm=False,
        tie_embeddings=False,
    )
    return model, train_config_for(model, seq_len=8192, batch_size=1, tokens_per_step=tokens_per_step, lr=lr)


def _llama3_8b(vocab: int) -> tuple[ModelConfig, TrainConfig]:
    # Llama-3-8B exactly (8,030,261,248 parameters), its published peak lr and ~4M-token batches; the horizon is
    # still 20 tokens/param
    return _llama3(32, 32, 4096, 14336, tokens_per_step=2**22, lr=3e-4)


def _llama3_70b(vocab: int) -> tuple[ModelConfig, TrainConfig]:
    # Llama-3-70B exactly: 70,553,706,496 parameters
    return _llama3(80, 64, 8192, 28672, tokens_per_step=2**24, lr=1.5e-4)


PRESETS: dict[str, str] = {
    "tiny": "2 x 64, GQA 2:1, seq 128: unit tests, trains in seconds on a CPU",
    "cpu": "4 x 256, seq 256: learns tweet language in ~10 minutes on 2 CPU cores",
    "124m": "GPT-2 small's shape: 12 x 768, 12 heads, tied, seq 1024",
    "350m": "GPT-3 Medium's shape: 24 x 1024, 16 heads, tied, seq 2048",
    "1b": "16 x 2048, 16 heads / 4 kv heads, MLP 8192, tied, seq 2048",
    "8b": "Llama-3-8B: 32 x 4096, 32 heads / 8 kv heads, MLP 14336, vocab 128256, untied",
    "70b": "Llama-3-70B: 80 x 8192, 64 heads / 8 kv heads, MLP 28672, vocab 128256, untied",
}
_BUILDERS = {
    "tiny": _tiny,
    "cpu": _cpu,
    "124m": _gpt2_small,
    "350m": _gpt3_medium,
    "1b": _one_b,
    "8b": _llama3_8b,
    "70b": _llama3_70b,
}
_DEFAULT_VOCAB = {"tiny": 8192, "cpu": 8192, "124m": 50304, "350m": 50304, "1b": 50304}
_PINNED_VOCAB = {"8b": LLAMA3_VOCAB, "70b": LLAMA3_VOCAB}


def preset(name: str, vocab_size: int | None = None) -> tuple[ModelConfig, TrainConfig]:
    """A named preset; `vocab_size` (the tokenizer's) replaces the preset's unless the preset pins it."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    if name in _PINNED_VOCAB:
        pinned = _PINNED_VOCAB[name]
        if vocab_size is not None and vocab_size > pinned:
            raise ValueError(
                f"preset {name!r} pins vocab_size={pinned}; a tokenizer of {vocab_size} ids won't fit"
            )
        return _BUILDERS[name](pinned)
    return _BUILDERS[name](vocab_size if vocab_size is not None else _DEFAULT_VOCAB[name])
