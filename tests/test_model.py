"""The transformer and its configurations: parameter counts against published models, the KV cache against
the plain forward, and a real learning check on bundled tweet text."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from myna.config import PRESETS, ModelConfig, from_depth, preset
from myna.model import GPT, KVCache

TEXT = Path(__file__).parent / "fixtures" / "text" / "sentiment140_positive_1500.txt"

LLAMA3_8B_PARAMS = 8_030_261_248  # published count of Meta-Llama-3-8B
LLAMA3_70B_PARAMS = 70_553_706_496  # published count of Meta-Llama-3-70B (70.6B)


def meta_model(cfg: ModelConfig) -> GPT:
    with torch.device("meta"):
        return GPT(cfg)


def small_cfg(**kw) -> ModelConfig:
    base = ModelConfig(
        vocab_size=97, n_layer=2, n_head=4, n_kv_head=4, n_embd=32, mlp_hidden=96, max_seq_len=64
    )
    return replace(base, **kw)


def tweet_bytes(n: int) -> torch.Tensor:
    return torch.tensor(list(TEXT.read_bytes()[:n]), dtype=torch.long)


# --- sizes ---------------------------------------------------------------------------------------------


def test_llama3_8b_and_70b_have_the_published_parameter_counts():
    m8, _ = preset("8b")
    m70, _ = preset("70b")
    n8, n70 = meta_model(m8).num_params(), meta_model(m70).num_params()
    assert n8 == LLAMA3_8B_PARAMS
    assert n70 == LLAMA3_70B_PARAMS
    assert abs(n8 / 8.03e9 - 1) < 0.005 and abs(n70 / 70.6e9 - 1) < 0.005
    assert (m8.n_kv_head, m8.mlp_hidden, m8.vocab_size, m8.tie_embeddings, m8.qk_norm) == (
        8,
        14336,
        128256,
        False,
        False,
    )


def test_124m_is_gpt2_small_sized():
    cfg, train = preset("124m")
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.tie_embeddings) == (
        12,
        768,
        12,
        50304,
        True,
    )
    n = meta_model(cfg).num_params()
    # GPT-2 small is 124.4M, of which 0.8M are learned positions that RoPE does not need
    assert abs(n / 124e6 - 1) < 0.01, n
    assert train.seq_len == 1024 and train.tokens_per_step == 2**19


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_the_config_count_matches_the_model(name):
    cfg, train = preset(name)
    model = meta_model(cfg)
    assert cfg.num_params() == model.num_params()
    assert cfg.num_params(exclude_embeddings=True) == model.num_params(exclude_embeddings=True)
    assert len(model.blocks) == cfg.n_layer
    assert train.seq_len <= cfg.max_seq_len
    assert train.warmup_steps < train.steps


def test_preset_vocab_override_unless_pinned():
    assert preset("tiny", vocab_size=1000)[0].vocab_size == 1000
    assert preset("124m", vocab_size=8192)[0].vocab_size == 8192
    assert preset("8b", vocab_size=8192)[0].vocab_size == 128256  # Llama-3's vocabulary is pinned
    with pytest.raises(ValueError, match="pins vocab_size=128256"):
        preset("70b", vocab_size=200_000)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("13b")


@pytest.mark.parametrize("depth", [4, 12, 20, 32])
def test_from_depth_derives_a_consistent_model_and_schedule(depth):
    cfg, train = from_depth(depth, vocab_size=50304)
    assert cfg.n_layer == depth and cfg.n_embd == 64 * depth
    assert cfg.n_head * cfg.head_dim == cfg.n_embd and cfg.head_dim in (64, 128)
    assert cfg.mlp_hidden % 64 == 0 and abs(cfg.mlp_hidden / cfg.n_embd - 8 / 3) < 0.25
    tokens = train.steps * train.tokens_per_step
    assert (
        20 * cfg.num_params() <= tokens < 20 * cfg.num_params() + train.tokens_per_step
    )  # Chinchilla horizon
    assert meta_model(cfg).num_params() == cfg.num_params()


def test_from_depth_learning_rate_shrinks_with_width_and_gqa_appears_when_large():
    lrs = [from_depth(d, 8192)[1].lr for d in (4, 8, 12, 24, 48)]
    assert lrs == sorted(lrs, reverse=True)
    assert math.isclose(from_depth(12, 8192)[1].lr, 6e-4)
    assert from_depth(12, 8192)[0].n_kv_head == 12
    wide = from_depth(32, 8192)[0]
    assert wide.n_kv_head < wide.n_head


def test_flops_per_token_counts_every_matmul_weight_plus_attention():
    cfg, _ = preset("8b")
    model = meta_model(cfg)
    norms = cfg.n_layer * 2 * cfg.n_embd + cfg.n_embd
    matmul_weights = LLAMA3_8B_PARAMS - cfg.vocab_size * cfg.n_embd - norms  # all but the embedding lookup
    assert model.flops_per_token(4096) == 6 * matmul_weights + 12 * 32 * 4096 * 4096
    # a tied lm_head still runs its matmul, so tying changes the parameter count but not the FLOPs
    tied = meta_model(replace(cfg, tie_embeddings=True))
    assert tied.num_params() == model.num_params() - cfg.vocab_size * cfg.n_embd
    assert tied.flops_per_token(4096) == model.flops_per_token(4096)


# --- forward -------------------------------------------------------------------------------------------


def test_forward_shapes_hidden_states_and_loss_at_init():
    torch.manual_seed(0)
    cfg, _ = preset("tiny")
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 40))
    targets = torch.randint(0, cfg.vocab_size, (3, 40))
    logits = model(idx)
    assert logits.shape == (3, 40, cfg.vocab_size)
    logits2, loss = model(idx, targets)
    hidden = model.hidden(idx)
    assert torch.equal(logits, logits2)
    assert loss.shape == () and abs(loss.item() / math.log(cfg.vocab_size) - 1) < 0.1
    assert hidden.shape == (3, 40, cfg.n_embd)
    # the final-norm states: ~unit RMS at init (eps shaves a little off a residual stream of RMS ~0.02),
    # and the lm_head reads exactly them
    assert torch.allclose(hidden.pow(2).mean(-1).sqrt(), torch.ones(3, 40), atol=0.05)
    assert torch.allclose(model.lm_head(hidden), logits)
    logits3, hidden3 = model(idx), model.hidden(idx)
    assert torch.equal(logits3, logits) and torch.equal(hidden3, hidden)


def test_loss_ignores_targets_of_minus_one():
    torch.manual_seed(0)
    model = GPT(small_cfg())
    idx = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    masked = targets.clone()
    masked[:, :10] = -1
    logits, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 10:].reshape(-1, 97), targets[:, 10:].reshape(-1))
    assert torch.allclose(loss, expected)


def test_sequence_longer_than_max_seq_len_is_refused():
    model = GPT(small_cfg(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_init_is_deterministic_and_works_after_a_meta_build():
    cfg = small_cfg(n_kv_head=2)
    torch.manual_seed(0)
    ref = GPT(cfg)
    torch.manual_seed(7)
    ref.init_weights()
    model = meta_model(cfg).to_empty(device="cpu")  # what FSDP does: shapes first, storage later
    torch.manual_seed(7)
    model.init_weights()
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    idx = torch.randint(0, 97, (2, 20))
    assert torch.equal(ref(idx), model(idx))  # the RoPE buffers were rebuilt too
    depth_scaled = ref.blocks[0].attn.o.weight.std().item()
    assert 0.5 < depth_scaled / (0.02 / math.sqrt(2 * cfg.n_layer)) < 1.5


# --- KV cache ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # multi-head, QK-norm, tied
        dict(n_kv_head=1, qk_norm=False),  # multi-query, no QK-norm
        dict(n_kv_head=2, tie_embeddings=False),  # grouped-query, untied
    ],
    ids=["mha-qknorm", "mqa-noqknorm", "gqa-untied"],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_kv_cache_decoding_matches_the_full_forward(kw, batch):
    torch.manual_seed(0)
    cfg = small_cfg(**kw)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (batch, 24))
    full = model(idx)

    cache = KVCache(cfg, batch_size=batch, max_len=32)
    steps = [model(idx[:, :9], kv_cache=cache)]  # prefill from position 0
    for t in range(9, 15):  # one token at a time
        steps.append(model(idx[:, t : t + 1], kv_cache=cache))
    steps.append(model(idx[:, 15:], kv_cache=cache))  # a chunk after cached tokens: needs the offset mask
    assert cache.pos == 24
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)

    cache.reset()
    assert cache.pos == 0
    torch.testing.assert_close(model(idx[:, :5], kv_cache=cache), full[:, :5], atol=1e-5, rtol=0)


def test_kv_cache_hidden_states_and_overflow():
    torch.manual_seed(0)
    cfg = small_cfg(n_kv_head=2)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 6))
    hidden = model.hidden(idx)
    cache = KVCache(cfg, batch_size=2, max_len=6)
    h1 = model.hidden(idx[:, :4], kv_cache=cache)
    h2 = model.hidden(idx[:, 4:], kv_cache=cache)
    torch.testing.assert_close(torch.cat([h1, h2], dim=1), hidden, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="KVCache full"):
        model(idx[:, :1], kv_cache=cache)


def test_bf16_autocast_forward_with_an_fp32_cache():
    torch.manual_seed(0)
    cfg = small_cfg(n_kv_head=2)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    full = model(idx)
    cache = KVCache(cfg, batch_size=2, max_len=12, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
        first = model(idx[:, :8], kv_cache=cache)
        rest = model(idx[:, 8:], kv_cache=cache)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert first.dtype == torch.bfloat16
    torch.testing.assert_close(torch.cat([first, rest], 1).float(), full, atol=0.05, rtol=0.05)


# --- learning ------------------------------------------------------------------------------------------


def test_tiny_model_memorises_a_batch_of_real_tweets():
    torch.manual_seed(0)
    cfg, train = preset("tiny", vocab_size=256)  # UTF-8 bytes as tokens
    model = GPT(cfg)
    data = tweet_bytes(4 * 65).view(4, 65)
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=train.betas)
    losses = []
    for _ in range(100):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 5.0  # ~ln(256) at init
    assert losses[-1] < 1.0, losses[::10]


@pytest.mark.slow
def test_torch_compile_runs_forward_and_backward_like_eager():
    torch.manual_seed(0)
    cfg, _ = preset("tiny", vocab_size=256)
    model = GPT(cfg)
    data = tweet_bytes(2 * 33).view(2, 33)
    _, eager_loss = model(data[:, :-1], data[:, 1:])
    eager_loss.backward()
    eager_grad = model.blocks[0].attn.q.weight.grad.clone()
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, fullgraph=True)  # fullgraph: no graph breaks on the training path
    _, loss = compiled(data[:, :-1], data[:, 1:])
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.blocks[0].attn.q.weight.grad, eager_grad, atol=1e-5, rtol=1e-4)


def test_packed_documents_do_not_attend_to_each_other():
    torch.manual_seed(0)
    model = GPT(small_cfg()).eval()
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 9))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 9])
    with torch.no_grad():
        out = model(packed, doc_ids=doc_ids)
        alone_a, alone_b = model(a), model(b)
        unmasked = model(packed)
    # each document's logits equal those it gets alone (RoPE is relative, so its offset in the row is irrelevant)
    torch.testing.assert_close(out[:, :7], alone_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[:, 7:], alone_b, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(unmasked[:, 7:], alone_b, atol=1e-3)  # without the mask b sees a


def test_logits_at_picks_one_position_per_row_like_the_full_logits():
    torch.manual_seed(0)
    model = GPT(small_cfg()).eval()
    idx = torch.randint(0, 97, (3, 11))
    at = torch.tensor([10, 0, 4])
    with torch.no_grad():
        full = model(idx)
        picked = model(idx, logits_at=at)
    assert picked.shape == (3, 1, 97)
    torch.testing.assert_close(picked[:, 0], full[torch.arange(3), at])
