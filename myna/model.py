"""A decoder-only transformer in the Llama-3 family, readable top to bottom.

Token embedding -> n_layer x [RMSNorm -> attention (RoPE, grouped-query, optional QK-norm) -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> final RMSNorm -> lm_head. No biases anywhere. Attention goes through
F.scaled_dot_product_attention, so CUDA picks flash kernels; the same code runs on CPU.

A KVCache lets the inference engine feed a prompt (prefill) and then one token at a time (decode); the
forward writes each layer's new keys and values into the cache and attends over everything cached so far.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from myna.config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, no bias (Llama's norm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # weight in x's dtype: under autocast q/k arrive in bf16, and mixed dtypes miss the fused kernel
        return F.rms_norm(x, (x.size(-1),), self.weight.to(x.dtype), self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each [max_len, head_dim // 2], in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by position: the two halves of each head form the (real, imaginary) pairs."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Preallocated keys and values for every layer, each [B, n_kv_head, max_len, head_dim].

    `pos` counts the tokens already cached; GPT.forward advances it after its last layer.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None):
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0  # old entries are overwritten before they are read again

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, n_kv_head, T, D] at [pos, pos+T) and return the cached [0, pos+T)."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KVCache full: {self.pos} cached + {k.size(2)} new > max_len={self.max_len}")
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.k = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        # QK-norm (per head, one weight shared by all heads) keeps attention logits bounded at high lr
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
        doc_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim)
        k = self.k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]

        mask, causal = doc_mask, doc_mask is None
        if kv_cache is not None:
            past = kv_cache.pos
            k, v = kv_cache.update(self.layer_idx, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)  # the cache may be held in another dtype than autocast's
            if past > 0:
                causal = False
                if T > 1:  # query i sits at absolute position past+i and sees keys 0..past+i
                    mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_head != self.n_head
        )
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm transformer block; the unit FSDP shards."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
        doc_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache, doc_mask)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # RoPE tables are derived, not learned: non-persistent, so checkpoints hold only parameters
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 * n_layer).

        Also recomputes the RoPE tables, so a model built on the meta device and moved with
        `to_empty(device=...)` is fully usable after this call.
        """
        if self.cfg.tie_embeddings and self.lm_head.weight is not self.tok_emb.weight:
            self.lm_head.weight = self.tok_emb.weight  # `to_empty` after a meta build unties shared weights
        std = 0.02
        out_std = std / math.sqrt(2 * self.cfg.n_layer)  # each block adds two residual branches
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=std)
        for block in self.blocks:
            for linear in (block.attn.q, block.attn.k, block.attn.v, block.mlp.gate, block.mlp.up):
                nn.init.normal_(linear.weight, mean=0.0, std=std)
            for linear in (block.attn.o, block.mlp.down):
                nn.init.normal_(linear.weight, mean=0.0, std=out_std)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        cos, sin = rope_tables(
            self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, self.rope_cos.device
        )
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters (a tied lm_head counted once); exclude_embeddings drops the token-embedding table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward).

        6 * N, where N counts every matmul weight a token passes through: all nn.Linear weights, the
        lm_head included whether tied or not since its matmul runs either way (the embedding lookup and the
        norm weights are free); plus 12 * n_layer * n_embd * seq_len for attention scores and values
        (the PaLM / nanoGPT convention, which ignores the causal mask's savings).
        """
        n = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6.0 * n + 12.0 * self.cfg.n_layer * self.cfg.n_embd * seq_len

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        doc_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_hidden: bool = False,
    ):
        """idx [B, T] -> logits [B, T, vocab]; with targets -> (logits, loss); return_hidden -> (that, hidden).

        With a kv_cache, positions continue from kv_cache.pos and this call's keys/values are appended.
        doc_ids [B, T] marks which packed document each token belongs to: attention stays causal and within one
        document, so several conversations share a row without seeing each other. RoPE is relative, so a
        document packed at offset 200 gets the same attention as one starting at 0.
        """
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence reaches position {start + T} > max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]

        doc_mask = None
        if doc_ids is not None:
            if kv_cache is not None:
                raise ValueError("doc_ids (packed training rows) and kv_cache (decoding) do not combine")
            same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
            doc_mask = (same_doc & torch.ones(T, T, dtype=torch.bool, device=idx.device).tril())[:, None]

        x = self.tok_emb(idx)
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache, doc_mask)
        if kv_cache is not None:
            kv_cache.pos += T
        hidden = self.norm(x)
        logits = self.lm_head(hidden)

        out = logits
        if targets is not None:
            # fp32 loss: bf16 log-softmax over a large vocabulary loses precision
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
            out = (logits, loss)
        return (out, hidden) if return_hidden else out
