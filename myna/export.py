"""`myna export hf`: a run as a Hugging Face folder that transformers (and so vLLM) load as it is.

Myna's model is a Llama: RoPE on the two halves of each head (transformers' rotate_half), RMSNorm, SwiGLU,
grouped-query attention, no biases. Without QK-norm it is exactly LlamaForCausalLM; with it, Qwen3ForCausalLM,
whose per-head q/k RMSNorm sits where Myna's does (after the projections, before RoPE). Every ModelConfig Myna
builds is one of the two, so nothing is refused; the tests compare logits and greedy generations with
transformers'. The chat template travels as Jinja in tokenizer_config.json and renders template.py's ids.
"""

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from myna.io import atomic_dir
from myna.runs import load_model
from myna.template import turn_stop_ids

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

# template.py's format in Jinja: a prompt for generation puts the system messages first, as render_prompt does
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if add_generation_prompt -%}"
    "{%- set ordered = (messages | selectattr('role', 'equalto', 'system') | list)"
    " + (messages | rejectattr('role', 'equalto', 'system') | list) -%}"
    "{%- else -%}{%- set ordered = messages -%}{%- endif -%}"
    "{%- for m in ordered -%}"
    "{{- {'system': '<|system|>', 'user': '<|user|>', 'assistant': '<|assistant|>',"
    " 'tool': '<|tool_result|>'}[m['role']] -}}"
    "{{- m['content'] or '' -}}"
    "{%- for call in m.get('tool_calls') or [] -%}"
    "{%- set fn = call['function'] if 'function' in call else call -%}"
    "{{- '<|tool_call|>' + ({'name': fn['name'], 'arguments': fn['arguments']} | tojson) -}}"
    "{%- endfor -%}"
    "{{- '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


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
    names = {i: s for s, i in tok.special_ids.items()}
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
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eot_id,
        "pad_token_id": tok.pad_id,
        "torch_dtype": "float32",
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names[tok.bos_id],
        "eos_token": names[tok.eot_id],
        "pad_token": names[tok.pad_id],
        "model_max_length": cfg.max_seq_len,
        "chat_template": CHAT_TEMPLATE,
    }
    # a reply ends at <|end|>, or where the model opens a new turn or document (template.turn_stop_ids)
    generation_config = {
        "bos_token_id": tok.bos_id,
        "eos_token_id": [tok.eot_id, *turn_stop_ids(tok)],
        "pad_token_id": tok.pad_id,
    }
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(loaded.run_dir / "tokenizer.json", tmp / "tokenizer.json")
        for name, value in (
            ("config.json", config),
            ("tokenizer_config.json", tokenizer_config),
            ("generation_config.json", generation_config),
        ):
            (tmp / name).write_text(json.dumps(value, indent=1, ensure_ascii=False), encoding="utf-8")
    return Path(out)
