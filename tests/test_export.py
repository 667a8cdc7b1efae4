"""`myna export hf`: transformers loads the folder offline and computes what Myna computes: the same logits
(fp32), the same greedy replies, the same chat-template ids; Llama for runs without QK-norm, Qwen3 with it.
`myna export gguf`: gguf's reader reads back Myna's tensors and metadata, and transformers loads the file to the
same logits and a tokenizer that gives Myna's ids."""

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from helpers import myna

from myna.chat_format import MYNA_JINJA
from myna.config import ModelConfig
from myna.export import export_gguf, export_hf
from myna.infer.engine import Engine, SamplingParams
from myna.model import GPT
from myna.runs import load_model
from myna.template import render, render_prompt, turn_stop_ids
from myna.tokenizer import Tokenizer
from myna.train import checkpoint
from myna.train.distributed import Dist

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
os.environ["HF_HUB_OFFLINE"] = "1"  # everything is on disk: nothing may be fetched

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there, how are you? 😀"},
    {
        "role": "assistant",
        "content": "fine thanks",
        "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}],
    },
    {"role": "tool", "content": "42"},
    {"role": "user", "content": "what's up at the airport"},
]


def with_shape(run_dir: Path, root: Path, **shape) -> Path:
    """The serving tests' tokenizer with a fresh model of another shape (norm weights moved off 1, so they count)."""
    cfg = ModelConfig(**{**json.loads((run_dir / "config.json").read_text())["model"], **shape})
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": asdict(cfg)}))
    Tokenizer.from_file(run_dir / "tokenizer.json").save(run / "tokenizer.json")
    checkpoint.save(run, 1, model, torch.optim.AdamW(model.parameters()), {}, Dist())
    return run


@pytest.mark.parametrize(
    ("shape", "architecture"),
    [
        ({"qk_norm": False}, "LlamaForCausalLM"),
        ({"qk_norm": True, "tie_embeddings": False}, "Qwen3ForCausalLM"),
    ],
)
def test_transformers_computes_what_myna_computes(
    run_dir: Path, tmp_path: Path, shape: dict, architecture: str
):
    run = with_shape(run_dir, tmp_path, **shape)
    out = export_hf(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == architecture
    loaded = load_model(run)
    idx = torch.randint(0, loaded.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded.model(idx) - hf(idx).logits).abs().max() <= 1e-4


def test_greedy_replies_and_chat_template_ids_match(run_dir: Path, tmp_path: Path):
    out = export_hf(run_dir, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    loaded = load_model(run_dir)
    tok = loaded.tokenizer
    prompt = render_prompt(CHAT, tok).ids
    assert hf_tok.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"] == prompt
    assert hf_tok.apply_chat_template(CHAT)["input_ids"] == render(CHAT, tok).ids

    params = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=turn_stop_ids(tok))
    for messages in (CHAT, CHAT[1:2], [{"role": "user", "content": "my flight got cancelled again"}]):
        ids = render_prompt(messages, tok).ids
        with Engine(loaded.model, tok, max_batch=1) as engine:
            mine = engine.generate(ids, params).token_ids
        theirs = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24)[0, len(ids) :].tolist()
        assert theirs[: len(mine)] == mine  # transformers stops at the same token (generation_config's stops)
        assert len(theirs) == len(mine)


@pytest.mark.slow
def test_cli_exports_and_refuses_bad_input(run_dir: Path, tmp_path: Path):
    result = myna("export", "hf", "--ckpt", str(run_dir), "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    bad = myna("export", "hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "nothing"))
    assert bad.returncode == 1 and "not a run directory" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "nothing").exists()

    result = myna(
        "export", "gguf", "--ckpt", str(run_dir), "--out", str(tmp_path / "m.gguf"), "--dtype", "bf16"
    )
    assert result.returncode == 0, result.stderr
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.BF16
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    bad = myna("export", "gguf", "--ckpt", str(run_dir), "--out", str(tmp_path / "q.gguf"), "--dtype", "q4")
    assert bad.returncode == 2 and "invalid choice: 'q4'" in bad.stderr and not (tmp_path / "q.gguf").exists()


# Myna's names -> llama.cpp's, written out here as the file must hold them
GGUF_NAMES = {
    "tok_emb.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    **{
        f"blocks.{{}}.{mine}.weight": f"blk.{{}}.{theirs}.weight"
        for mine, theirs in [
            ("attn_norm", "attn_norm"),
            ("attn.q", "attn_q"),
            ("attn.k", "attn_k"),
            ("attn.v", "attn_v"),
            ("attn.o", "attn_output"),
            ("attn.q_norm", "attn_q_norm"),
            ("attn.k_norm", "attn_k_norm"),
            ("mlp_norm", "ffn_norm"),
            ("mlp.gate", "ffn_gate"),
            ("mlp.up", "ffn_up"),
            ("mlp.down", "ffn_down"),
        ]
    },
}


def gguf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] != "blocks":
        return GGUF_NAMES[name]
    return GGUF_NAMES[".".join(["blocks", "{}", *parts[2:]])].format(parts[1])


def rope_halves(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permute: each head's rows from rotate-pairs order back to rotate-halves order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def field(reader, key: str):
    return reader.fields[key].contents()


# a llama.cpp "llama" with grouped-query attention, and the session's run: "qwen3", tied embeddings
@pytest.mark.parametrize(
    ("shape", "dtype"), [({"qk_norm": False, "n_head": 4, "n_kv_head": 2}, "f32"), (None, "f16")]
)
def test_gguf_reads_back_to_the_same_tensors_and_metadata(run_dir: Path, tmp_path: Path, shape, dtype: str):
    run = run_dir if shape is None else with_shape(run_dir, tmp_path, **shape)
    out = export_gguf(run, tmp_path / "m.gguf", dtype=dtype)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    loaded = load_model(run)
    cfg, tok = loaded.config, loaded.tokenizer
    arch = "qwen3" if cfg.qk_norm else "llama"
    reader = gguf.GGUFReader(out)

    mine = {
        gguf_name(k): v
        for k, v in loaded.model.state_dict().items()
        if not (k == "lm_head.weight" and cfg.tie_embeddings)
    }
    theirs = {t.name: t for t in reader.tensors}
    assert sorted(theirs) == sorted(mine)
    for name, w in mine.items():
        t = theirs[name]
        got = torch.from_numpy(t.data.astype("float32").reshape(w.shape))
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            got = rope_halves(got, cfg.n_head if "attn_q" in name else cfg.n_kv_head)
        if w.dim() == 1 or dtype == "f32":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            assert torch.equal(got, w)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            assert torch.equal(got, w.half().float())  # f16 rounding, nothing more

    assert field(reader, "general.architecture") == arch
    assert {
        key: field(reader, f"{arch}.{key}")
        for key in [
            "context_length",
            "embedding_length",
            "block_count",
            "feed_forward_length",
            "attention.head_count",
            "attention.head_count_kv",
            "rope.dimension_count",
        ]
    } == {
        "context_length": cfg.max_seq_len,
        "embedding_length": cfg.n_embd,
        "block_count": cfg.n_layer,
        "feed_forward_length": cfg.mlp_hidden,
        "attention.head_count": cfg.n_head,
        "attention.head_count_kv": cfg.n_kv_head,
        "rope.dimension_count": cfg.head_dim,
    }
    assert field(reader, f"{arch}.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert [tok.hf.token_to_id(t) for t in tokens] == list(range(cfg.vocab_size))
    types = field(reader, "tokenizer.ggml.token_type")
    assert [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL] == sorted(tok.special_ids.values())
    assert set(types) == {gguf.TokenType.CONTROL, gguf.TokenType.NORMAL}
    merges = json.loads((run / "tokenizer.json").read_text())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [
        m if isinstance(m, str) else " ".join(m) for m in merges
    ]
    assert field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_id
    assert field(reader, "tokenizer.ggml.eos_token_id") == tok.eot_id
    assert field(reader, "tokenizer.ggml.padding_token_id") == tok.pad_id
    assert field(reader, "tokenizer.chat_template") == MYNA_JINJA


# transformers' qwen3 GGUF loader reads no head size and takes Qwen3Config's 128 (llama.cpp reads key_length):
# the qwen3 run has heads of 128, so the test shows the file is right, not that default
@pytest.mark.parametrize(
    ("shape", "architecture"),
    [
        ({"qk_norm": False, "n_head": 4, "n_kv_head": 2}, "LlamaForCausalLM"),
        ({"n_embd": 256, "n_head": 2, "n_kv_head": 1, "tie_embeddings": False}, "Qwen3ForCausalLM"),
    ],
)
def test_transformers_loads_the_gguf(run_dir: Path, tmp_path: Path, shape: dict, architecture: str):
    run = with_shape(run_dir, tmp_path, **shape)
    export_gguf(run, tmp_path / "m.gguf", dtype="f32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    assert type(hf).__name__ == architecture
    loaded = load_model(run)
    idx = torch.randint(0, loaded.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded.model(idx) - hf.eval()(idx).logits).abs().max() <= 1e-4
    # the tokenizer too: the gpt2 BPE with the llama-bpe split is Myna's, and the template renders its ids
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for message in CHAT:
        text = message["content"]
        assert hf_tok(text)["input_ids"] == loaded.tokenizer.document(text)
    assert (
        hf_tok.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]
        == render_prompt(CHAT, loaded.tokenizer).ids
    )


def test_gguf_refuses_an_unknown_dtype(run_dir: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="--dtype 'q4': expected one of f16, bf16, f32"):
        export_gguf(run_dir, tmp_path / "m.gguf", dtype="q4")
    assert list(tmp_path.iterdir()) == []
