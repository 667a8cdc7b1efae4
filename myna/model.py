"""A decoder-only transformer in the Llama-3 family, readable top to bottom.

Token embedding -> n_layer x [RMSNorm -> attention (RoPE, grouped-query, optional QK-norm) -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> final RMSNorm -> lm_head. No biases anywhere. Attention goes through
F.scaled_dot_product_attention, so CUDA picks flash kernels; the same code runs on CPU.

A KVCache lets the inference engine feed a prompt (prefill) and then one token at a time (decode); the
forward writes each layer's new keys and values into the cache and attends over everything cached so far. Each
cache row keeps its own length, so rows holding different requests decode together (continuous batching).
"""

import copy
import math
from collections.abc import Sequence

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
    """The rotary tables, each [max_len, head_dim] in fp32: cos|cos and -sin|sin of the angles (one per pair)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32, device=device), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by position: the two halves of each head form the (real, imaginary) pairs.

    cos and sin are rope_tables' rows, [T, D] (every row at the same positions) or [B, T, D] (each row its own).
    Rolling x by half a head lines each element up with its pair, so a rotation is two products and a sum (Llama's
    rotate_half, without its concatenation): four operations forward and backward, and on CPU faster than slicing
    the halves (README, Benchmarks).
    """
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)  # broadcast over heads
    return x * cos + x.roll(x.size(-1) // 2, -1) * sin


class PackedLinear:
    """Runs nn.Linear layers that read the same input (q|k|v, gate|up, or one layer alone) as one matmul, for
    inference: `packed(x, *linears)` is the layers' outputs side by side.

    On CPU in fp32 the stacked weight is prepacked once in oneDNN's blocked layout, whose kernel runs the few-row
    matmuls of a decode step several times faster than the default one (README, Inference speed), at the cost of
    a copy of the weights. The copy is remade whenever a layer is replaced or its weight changes in place or moves
    (an optimizer step or load_state_dict bumps the tensor's version), so a model that is still training never
    decodes with stale weights. Elsewhere (CUDA, bf16, gradients on, a bias or hooks) each layer runs as itself.
    """

    def __init__(self):
        self._key = None
        self._packed = None  # the stacked weight in oneDNN's layout, or None where it does not apply

    def __call__(self, x: torch.Tensor, *linears: nn.Linear) -> torch.Tensor:
        if torch.compiler.is_compiling():  # GPT.decode under torch.compile: inductor's freezing packs weights
            w = torch.cat([m.weight for m in linears]) if len(linears) > 1 else linears[0].weight
            return F.linear(x, w)
        key = tuple((id(m), m.weight.data_ptr(), m.weight._version) for m in linears)
        if key != self._key:
            self._packed = self._pack(linears)
            self._key = key
        if self._packed is None or x.dtype != torch.float32 or torch.is_grad_enabled():
            ys = [m(x) for m in linears]
            return torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0]
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, None, "none", [], "")

    @staticmethod
    def _pack(linears: tuple[nn.Linear, ...]) -> torch.Tensor | None:
        plain = all(
            type(m) is nn.Linear and m.bias is None and not (m._forward_hooks or m._forward_pre_hooks)
            for m in linears
        )
        w = linears[0].weight
        if (
            not plain
            or w.device.type != "cpu"
            or w.dtype != torch.float32
            or not torch.backends.mkldnn.is_available()
        ):
            return None
        with torch.no_grad():
            stacked = torch.cat([m.weight.detach() for m in linears]) if len(linears) > 1 else w.detach()
            try:
                return torch.ops.mkldnn._reorder_linear_weight(stacked, 8)  # 8: a decode batch's rows
            except (AttributeError, RuntimeError):  # a torch build without these oneDNN ops: the plain layers
                return None

    def __getstate__(self) -> dict:
        return {"_key": None, "_packed": None}  # a deepcopy (DPO's reference model) or pickle starts afresh


class KVCache:
    """Preallocated keys and values for every layer, each [B, n_kv_head, max_len, head_dim], and the number of
    tokens each row holds.

    Rows fill independently: the inference engine keeps one request per row, each at its own length, and decodes
    them in one forward. `lengths` lives on the host because it sets shapes (how many keys attention reads);
    GPT.forward calls `begin` before its first layer and `advance` after its last. `rows(a, b)` is a view of
    rows [a, b) over the same storage, so a forward on the view fills just those rows.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None):
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len
        self.lengths = torch.zeros(batch_size, dtype=torch.long)
        self._write = None  # (row index [B, 1], positions [B, T], end) of the forward in progress

    @property
    def pos(self) -> int:
        """The length all rows share (a batch fed in lockstep); an error when rows differ."""
        if int(self.lengths.min()) != int(self.lengths.max()):
            raise ValueError(f"rows hold different lengths {self.lengths.tolist()}: there is no single pos")
        return int(self.lengths[0])

    def reset(self) -> None:
        self.lengths.zero_()  # old entries are overwritten before they are read again

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows [start, stop) as a cache of their own, sharing this one's storage and lengths."""
        view = copy.copy(self)
        view.k = [k[start:stop] for k in self.k]
        view.v = [v[start:stop] for v in self.v]
        view.lengths = self.lengths[start:stop]
        return view

    def copy_row(self, src: int, dst: int) -> None:
        """Make row dst hold what row src holds (the engine refills a freed row with its last one)."""
        n = int(self.lengths[src])
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :n] = k[src, :, :n]
            v[dst, :, :n] = v[src, :, :n]
        self.lengths[dst] = n

    def begin(self, T: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Plan a forward of T new tokens per row: their absolute positions [B, T], and the attention mask.

        The mask [B, 1, T, end] lets the query at position p see keys 0..p of its own row, where end is the
        longest row's new length, so attention reads only that far. It is None where the plain kernel is
        exact: empty rows (causal attention over the new tokens) or one new token after equally long rows.
        """
        past, longest = int(self.lengths.min()), int(self.lengths.max())
        end = longest + T
        if end > self.max_len:
            raise ValueError(f"KVCache full: {longest} cached + {T} new > max_len={self.max_len}")
        pos = (self.lengths[:, None] + torch.arange(T)).to(device)
        rows = torch.arange(pos.size(0), device=device)[:, None]
        self._write = (rows, pos, end)
        mask = None
        if past != longest or (T > 1 and past > 0):
            mask = (torch.arange(end, device=device) <= pos[:, :, None])[:, None]
        return pos, mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, n_kv_head, T, D] at the planned positions; return every row's keys/values [0, end)."""
        rows, pos, end = self._write
        cache_k, cache_v = self.k[layer], self.v[layer]
        # advanced indices around a slice put their dimensions first: the target is [B, T, n_kv_head, D]
        cache_k[rows, :, pos] = k.transpose(1, 2).to(cache_k.dtype)
        cache_v[rows, :, pos] = v.transpose(1, 2).to(cache_v.dtype)
        return cache_k[:, :, :end], cache_v[:, :, :end]

    def advance(self, T: int) -> None:
        self.lengths += T
        self._write = None


class _DecodeWrite:
    """KVCache.update for GPT.decode: writes one new key/value per row at pos, returns keys/values [0, end)."""

    def __init__(self, ks: list[torch.Tensor], vs: list[torch.Tensor], pos: torch.Tensor, end: int):
        self.ks, self.vs, self.pos, self.end = ks, vs, pos, end
        self.rows = torch.arange(pos.size(0), device=pos.device)[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache_k, cache_v = self.ks[layer], self.vs[layer]
        cache_k[self.rows, :, self.pos] = k.transpose(1, 2).to(cache_k.dtype)
        cache_v[self.rows, :, self.pos] = v.transpose(1, 2).to(cache_v.dtype)
        return cache_k[:, :, : self.end], cache_v[:, :, : self.end]


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
        self.packed_qkv, self.packed_o = PackedLinear(), PackedLinear()  # for `cached`

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if kv_cache is not None:
            return self.cached(x, cos, sin, kv_cache, mask)
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim)
        k = self.k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]

        causal = mask is None and T > 1  # without a mask: causal (doc_ids bring their own)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_head != self.n_head
        )
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def cached(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """forward for inference, with the cache: the same math in fewer operations, which is what a decode step
        of a few rows costs. One matmul gives q|k|v; QK-norm and RoPE treat the q and k heads as one tensor; cos
        and sin are [B, T, head_dim], each row at its own positions. Without a mask: causal over the new tokens,
        or (one new token per row) every cached key.
        """
        B, T, _ = x.shape
        H, D = self.n_head, self.head_dim
        qkv = self.packed_qkv(x, self.q, self.k, self.v).view(B, T, H + 2 * self.n_kv_head, D)
        qk, v = qkv[:, :, : H + self.n_kv_head], qkv[:, :, H + self.n_kv_head :]
        if self.q_norm is not None:
            # per head, as q_norm and k_norm: rms_norm(x, weight) is bitwise rms_norm(x) * weight
            weight = torch.cat(
                [self.q_norm.weight.expand(H, D), self.k_norm.weight.expand(self.n_kv_head, D)]
            )
            qk = F.rms_norm(qk, (D,), None, self.q_norm.eps) * weight.to(qk.dtype)
        qk = apply_rope(qk, cos, sin)
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # [B, heads, T, D]
        k, v = kv_cache.update(self.layer_idx, k, v.transpose(1, 2))
        k, v = k.to(q.dtype), v.to(q.dtype)  # the cache may be held in another dtype than autocast's
        causal = mask is None and T > 1
        gqa = self.n_kv_head != self.n_head
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        return self.packed_o(y.transpose(1, 2).reshape(B, T, H * D), self.o)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)
        self.packed_gate_up, self.packed_down = (
            PackedLinear(),
            PackedLinear(),
        )  # for inference (with a KV cache)

    def forward(self, x: torch.Tensor, inference: bool = False) -> torch.Tensor:
        if not inference:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        gate, up = self.packed_gate_up(x, self.gate, self.up).chunk(2, dim=-1)
        return self.packed_down(F.silu(gate) * up, self.down)


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
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache, mask)
        return x + self.mlp(self.mlp_norm(x), inference=kv_cache is not None)


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
        self.packed_head = PackedLinear()  # the lm_head on the inference path
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

    def decode(
        self,
        idx: torch.Tensor,
        pos: torch.Tensor,
        mask: torch.Tensor,
        ks: list[torch.Tensor],
        vs: list[torch.Tensor],
    ) -> torch.Tensor:
        """One new token per row, tensors only, for torch.compile (the engine's `compile=True`): logits [B, 1, V].

        idx and pos [B, 1] are each row's token and its position; mask [B, 1, 1, end] lets each row see its keys
        0..pos; ks and vs are each layer's cache rows [B, n_kv_head, max_len, head_dim], written at pos. The same
        math as forward with a KVCache (Attention.cached), always through the mask, so no shape depends on data.
        """
        writer = _DecodeWrite(ks, vs, pos, mask.size(-1))
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        x = self.tok_emb(idx)
        for block in self.blocks:
            x = block(x, cos, sin, writer, mask)
        return self.packed_head(self.norm(x), self.lm_head)

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

    def hidden(
        self,
        idx: torch.Tensor,
        *,
        doc_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The trunk: idx [B, T] -> final-normed hidden states [B, T, n_embd], without the lm_head.

        With a kv_cache, each row continues from its own cached length and this call's keys/values are appended.
        doc_ids [B, T] marks which packed document each token belongs to: attention stays causal and within one
        document, so several conversations share a row without seeing each other. RoPE is relative, so a
        document packed at offset 200 gets the same attention as one starting at 0. An FSDP-sharded model is
        called through forward, whose hooks gather the root's weights.
        """
        B, T = idx.shape
        start = int(kv_cache.lengths.max()) if kv_cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence reaches position {start + T} > max_seq_len={self.cfg.max_seq_len}")

        mask = None
        if kv_cache is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            if doc_ids is not None:
                raise ValueError("doc_ids (packed training rows) and kv_cache (decoding) do not combine")
            pos, mask = kv_cache.begin(T, idx.device)
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        if doc_ids is not None:
            same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
            mask = (same_doc & torch.ones(T, T, dtype=torch.bool, device=idx.device).tril())[:, None]

        x = self.tok_emb(idx)
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache, mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        doc_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_at: torch.Tensor | None = None,
    ):
        """idx [B, T] -> logits [B, T, vocab]; with targets [B, T] (-1 = no target) -> (logits, loss).

        logits_at [B] picks one position per row: logits are then [B, 1, vocab], computed for those positions
        only (inference needs the next token of each row's last real position; the rest of the lm_head is waste).
        doc_ids and kv_cache: see hidden.
        """
        hidden = self.hidden(idx, doc_ids=doc_ids, kv_cache=kv_cache)
        lm_head = self.lm_head if kv_cache is None else lambda h: self.packed_head(h, self.lm_head)
        if logits_at is not None:
            if targets is not None:
                raise ValueError("logits_at (inference) and targets (training) do not combine")
            return lm_head(hidden[torch.arange(idx.size(0), device=idx.device), logits_at][:, None])
        logits = lm_head(hidden)
        return logits if targets is None else (logits, lm_loss(logits, targets))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over the targets that are not -1 ("mean", or "sum" in nats), in fp32: bf16
    log-softmax over a large vocabulary loses precision."""
    return F.cross_entropy(
        logits.float().flatten(0, -2), targets.flatten(), ignore_index=-1, reduction=reduction
    )


# Texts of different lengths in one batch: right padding leaves each text's states as they are alone (attention is
# causal, so no real token sees the padding after it), and pooling reads the real positions only.


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> ids [B, T] right-padded with pad_id, and each row's length [B] (on the CPU)."""
    lengths = torch.tensor([len(s) for s in seqs])
    idx = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for row, s in enumerate(seqs):
        idx[row, : len(s)] = torch.as_tensor(s)
    return idx, lengths


def mean_pool(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B, T, C] -> [B, C]: the mean over each row's first lengths[b] positions."""
    lengths = lengths.to(hidden.device)
    mask = (torch.arange(hidden.size(1), device=hidden.device)[None, :] < lengths[:, None]).to(hidden.dtype)
    return (hidden * mask[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)
