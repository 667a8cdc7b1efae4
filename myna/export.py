"""`myna export hf` and `myna export gguf`: a run as a Hugging Face folder that transformers (and so vLLM) load
as it is, or as one GGUF file for llama.cpp and Ollama.

Myna's model is a Llama: RoPE on the two halves of each head (transformers' rotate_half), RMSNorm, SwiGLU,
grouped-query attention, no biases. Without QK-norm it is exactly LlamaForCausalLM; with it, Qwen3ForCausalLM,
whose per-head q/k RMSNorm sits where Myna's does (after the projections, before RoPE). Every ModelConfig Myna
builds is one of the two, so nothing is refused; the tests compare logits and greedy generations with
transformers'. The chat template travels as Jinja in tokenizer_config.json and renders template.py's ids.

The GGUF file follows llama.cpp's convert_hf_to_gguf.py: architecture "llama" or "qwen3", tensors named by the
gguf package's own map from transformers' names, and for "llama" the q/k rows reordered to the rotate-pairs
layout llama.cpp's llama uses (its qwen3 rotates halves, as Myna does, so its rows stay). transformers reads
the file back to the same logits (tests).
"""

import json
import shutil
from pathlib import Path

import gguf
import torch
from safetensors.torch import save_file

from myna.gguf_reader import PRE_SPLITS
from myna.io import atomic_dir, atomic_path
from myna.runs import load_model
from myna.template import turn_stop_ids
from myna.tokenizer import Tokenizer

# Myna's names inside a block -> transformers' (the same for Llama and Qwen3)
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj",
    "attn.q_norm": "self_attn.q_norm",
    "attn.k_norm": "self_attn.k_norm",
    "mlp_norm": "post_attention_layernorm",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}
TOP_NAMES = {"tok_emb": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}


def hf_name(name: str) -> str:
    """transformers' name of one of Myna's tensors."""
    module, _, kind = name.rpartition(".")
    if module in TOP_NAMES:
        return f"{TOP_NAMES[module]}.{kind}"
    _, layer, inner = module.split(".", 2)  # blocks.N.<inner>
    return f"model.layers.{layer}.{BLOCK_NAMES[inner]}.{kind}"


def export_hf(ckpt: str | Path, out: str | Path) -> Path:
    """Write the run (or checkpoint) `ckpt` to the folder `out`, whole or not at all; returns `out`."""
    loaded = load_model(ckpt)
    cfg, tok = loaded.config, loaded.tokenizer
    arch = "Qwen3" if cfg.qk_norm else "Llama"
    tensors = {
        hf_name(k): v.contiguous()
        for k, v in loaded.model.state_dict().items()
        if not (k == "lm_head.weight" and cfg.tie_embeddings)  # tied: the embedding is the head
    }
    fmt = tok.format
    bos_id = tok.special_ids[fmt["bos_token"]]
    config = {
        "architectures": [f"{arch}ForCausalLM"],
        "model_type": arch.lower(),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": tok.eot_id,
        "pad_token_id": tok.pad_id,
        "torch_dtype": "float32",
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": fmt["bos_token"],
        "eos_token": fmt["end_token"],
        "pad_token": fmt["pad_token"],
        "model_max_length": cfg.max_seq_len,
        "chat_template": fmt["chat_template"],
    }
    # a reply ends at its stop token, or where the model opens a new turn or document (template.turn_stop_ids)
    generation_config = {
        "bos_token_id": bos_id,
        "eos_token_id": [tok.eot_id, *turn_stop_ids(tok)],
        "pad_token_id": tok.pad_id,
    }
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(loaded.run_dir / "tokenizer.json", tmp / "tokenizer.json")  # HF's format as it is
        for name, value in (
            ("config.json", config),
            ("tokenizer_config.json", tokenizer_config),
            ("generation_config.json", generation_config),
        ):
            (tmp / name).write_text(json.dumps(value, indent=1, ensure_ascii=False), encoding="utf-8")
    return Path(out)


# --dtype -> the name of the file type llama.cpp records for it (gguf.LlamaFileType)
GGUF_DTYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "f32": "ALL_F32"}


def rope_pairs(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Each head's rows from rotate-halves order to rotate-pairs order: llama.cpp's llama rotates adjacent pairs
    (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _splits(pre: dict | None) -> list[str]:
    """The split regexes a tokenizer.json pre-tokenizer applies, one after another, in llama.cpp's terms."""
    if pre is None:
        return []
    if pre["type"] == "Sequence":
        return [r for p in pre["pretokenizers"] for r in _splits(p)]
    if (
        pre["type"] == "Split"
        and "Regex" in pre["pattern"]
        and pre["behavior"] == "Isolated"
        and not pre["invert"]
    ):
        return [pre["pattern"]["Regex"]]
    if pre["type"] == "ByteLevel":  # with its own regex it splits as GPT-2 did
        return PRE_SPLITS["gpt2"] if pre.get("use_regex", True) else []
    if pre["type"] == "Digits" and pre.get("individual_digits"):
        return [r"\p{N}"]
    raise ValueError(f"the tokenizer's {pre['type']} pre-tokenizer has no llama.cpp equivalent")


def gguf_pre_tokenizer(tok: Tokenizer) -> str:
    """llama.cpp's name for the tokenizer's split (tokenizer.ggml.pre): the first whose regexes are the same."""
    splits = _splits(json.loads(tok.hf.to_str())["pre_tokenizer"])
    name = next((name for name, known in PRE_SPLITS.items() if known == splits), None)
    if name is None:
        raise ValueError("the tokenizer splits text in a way llama.cpp names none of; GGUF cannot express it")
    return name


def export_gguf(ckpt: str | Path, out: str | Path, dtype: str = "f16") -> Path:
    """Write the run (or checkpoint) `ckpt` as the GGUF file `out`, whole or not at all; matrices in `dtype`,
    norm weights in f32 (as llama.cpp's converter keeps them); returns `out`."""
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(GGUF_DTYPES)}")
    loaded = load_model(ckpt)
    cfg, tok = loaded.config, loaded.tokenizer
    arch = "qwen3" if cfg.qk_norm else "llama"
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.n_layer)  # from transformers' names
    qtype = gguf.GGMLQuantizationType[dtype.upper()]

    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(loaded.run_dir.name)
    writer.add_file_type(gguf.LlamaFileType[GGUF_DTYPES[dtype]])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.mlp_hidden)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)

    vocab = {i: piece for piece, i in tok.hf.get_vocab(with_added_tokens=True).items()}
    special = set(tok.special_ids.values())
    merges = json.loads(tok.hf.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(gguf_pre_tokenizer(tok))
    # llama.cpp wants a token per embedding row: rows past the tokenizer's (a padded vocabulary) get unused
    # placeholders, as its own converter writes them
    writer.add_token_list([vocab.get(i, f"[PAD{i}]") for i in range(cfg.vocab_size)])
    writer.add_token_types(
        [
            gguf.TokenType.CONTROL
            if i in special
            else gguf.TokenType.NORMAL
            if i in vocab
            else gguf.TokenType.UNUSED
            for i in range(cfg.vocab_size)
        ]
    )
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tok.special_ids[tok.format["bos_token"]])
    writer.add_eos_token_id(tok.eot_id)
    writer.add_pad_token_id(tok.pad_id)
    # Myna's documents start with <|bos|> (llama.cpp then drops the template's own); an import keeps its setting
    writer.add_add_bos_token(tok.format["add_bos_token"])
    writer.add_chat_template(tok.format["chat_template"])

    for name, w in loaded.model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        w = w.float()
        if arch == "llama" and name.endswith(("attn.q.weight", "attn.k.weight")):
            w = rope_pairs(w, cfg.n_head if ".q." in name else cfg.n_kv_head)
        w_type = qtype if w.dim() > 1 else gguf.GGMLQuantizationType.F32
        data = gguf.quants.quantize(w.contiguous().numpy(), w_type)
        writer.add_tensor(names.get_name(hf_name(name), try_suffixes=(".weight",)), data, raw_dtype=w_type)

    with atomic_path(out) as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(out)
