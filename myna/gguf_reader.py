"""A GGUF file of a Llama-family model as what a Hugging Face folder holds, in memory: config.json, tokenizer.json,
tokenizer_config.json and the weights under transformers' names, so it is imported the way a folder is.

`read_gguf` reads the metadata only (the file is memory-mapped; no tensor data is touched); `gguf_tensors` then
dequantises one tensor at a time to fp32. The file follows llama.cpp's conventions, which this module undoes:
tensor names from the gguf package's map, shapes stored innermost-first, and q/k rows in the rotate-pairs order
llama.cpp's llama RoPE wants (transformers rotates halves). The tokenizer is rebuilt from the vocabulary, merges
and token types with the split llama.cpp applies for `tokenizer.ggml.pre`.

Nothing in the file is trusted: every read is bounded by the file's size, every shape is checked against the
config, and every error is one ValueError line that names the file and the field.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import gguf
import numpy as np
import tokenizers
import torch

from myna.tokenizer import SPLIT_PATTERN, byte_alphabet

SUPPORTED_ARCHS = ("llama",)

# llama.cpp's splits (llama-vocab.cpp), applied one after another, each to the pieces the previous one left
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_QWEN2_SPLIT = SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")  # Llama 3's, with digits one at a time
PRE_SPLITS = {
    # Llama 3's split, which is also Myna's own SPLIT_PATTERN
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe"), [SPLIT_PATTERN]),
    # StarCoder's: digits one at a time, then GPT-2's
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell"), [r"\p{N}", _GPT2_SPLIT]),
    **dict.fromkeys(("gpt2", "gpt-2", "phi-2", "mpt", "olmo"), [_GPT2_SPLIT]),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), [_QWEN2_SPLIT]),
    # what llama.cpp applies when the file names none (or "default"); it is not GPT-2's split alone
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]"],
}
# llama.cpp takes a piece that is itself a vocabulary entry whole, without merging, for Llama 3's vocabularies
IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe"}

TOKENIZER_KINDS = {"llama": "SentencePiece", "bert": "WordPiece", "t5": "Unigram", "rwkv": "RWKV"}

_INT_TYPES = {
    gguf.GGUFValueType[t] for t in ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64")
}
_VALUE_TYPES = {
    int: _INT_TYPES,
    float: _INT_TYPES | {gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64},
    str: {gguf.GGUFValueType.STRING},
    bool: {gguf.GGUFValueType.BOOL},
}
_REQUIRED = object()


@dataclass
class GGUFModel:
    path: Path
    config: dict  # config.json of a LlamaForCausalLM
    tokenizer_json: str  # tokenizer.json (tokenizers.Tokenizer.from_str loads it)
    tokenizer_config: dict  # bos/eos/pad tokens, add_bos_token, chat_template when the file has one
    tensor_types: dict[str, str]  # GGUF tensor name -> its type's name ("Q4_1", "F32", ...)


class _TensorTypeError(ValueError):
    """A tensor whose type number gguf does not know (named apart from the reader's other errors)."""


class _BoundedReader(gguf.GGUFReader):
    """gguf's reader, refusing every read past the end of the file: the stock one returns a short array there, so
    a forged array length loops that many times without advancing, and a forged tensor type gives an error that
    does not say which tensor."""

    def _get(self, offset, dtype, count=1, override_order=None):
        if int(offset) + np.dtype(dtype).itemsize * int(count) > self.data.size:
            raise ValueError(f"truncated: a read at byte {int(offset)} runs past the end")
        return super()._get(offset, dtype, count, override_order)

    def _build_tensors(self, start_offs, fields):
        for field in fields:  # parts: name length, name, n_dims, dims, type, offset
            raw = int(field.parts[4][0])
            if raw not in gguf.GGMLQuantizationType._value2member_map_:
                raise _TensorTypeError(
                    f"tensor {field.name!r} has type number {raw}, which gguf does not know"
                )
        super()._build_tensors(start_offs, fields)


def read_gguf(path: str | Path) -> GGUFModel:
    """The config, tokenizer and tensor types of the GGUF file `path`, checked; no tensor data is read."""
    path = Path(path)
    reader = _open(path)
    # gguf reads the metadata of either byte order, but would dequantise big-endian blocks wrongly
    if reader.byte_order != "I":
        raise ValueError(f"{path}: a GGUF file of the other byte order (big-endian) is not supported")
    arch = _value(reader, path, "general.architecture", str)
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(
            f"{path}: architecture {arch!r} is not supported; Myna imports: {', '.join(SUPPORTED_ARCHS)}"
        )
    tokens = _array(reader, path, "tokenizer.ggml.tokens", str)
    config = _config(reader, path, len(tokens))
    tensor_types = _check_tensors(reader, path, config)
    tokenizer_json, tokenizer_config = _tokenizer(reader, path, tokens, config)
    return GGUFModel(path, config, tokenizer_json, tokenizer_config, tensor_types)


def gguf_tensors(model: GGUFModel) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of `model`'s file under its transformers name, dequantised to fp32 in transformers' shape and
    row order, one at a time (in the file's order)."""
    reader = _open(model.path)
    if _check_tensors(reader, model.path, model.config) != model.tensor_types:
        raise ValueError(f"{model.path}: its tensors changed since it was read")
    expected = _expected_tensors(model.config)
    heads = {"q_proj": model.config["num_attention_heads"], "k_proj": model.config["num_key_value_heads"]}
    for t in reader.tensors:
        name, shape = expected[t.name]
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:  # refused by _check_tensors already, unless gguf changed
            raise ValueError(
                f"{model.path}: tensor {t.name!r}: cannot dequantise {t.tensor_type.name}"
            ) from e
        # a copy where the data is the file's own read-only pages (F32), so the tensor owns writable memory
        w = torch.from_numpy(np.require(data, np.float32, ["C", "W"])).reshape(shape)
        if (proj := name.split(".")[-2]) in heads:  # llama.cpp permuted these rows for its RoPE
            w = rope_halves(w, heads[proj])
        yield name, w


def rope_halves(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of export.rope_pairs: each head's rows back from llama.cpp's rotate-pairs order to transformers'
    rotate-halves order (row 2i of a head goes to i, row 2i+1 to half + i)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open(path: Path) -> gguf.GGUFReader:
    try:
        return _BoundedReader(path)
    except _TensorTypeError as e:
        raise ValueError(f"{path}: {e}") from None
    except (ValueError, IndexError, KeyError, OverflowError, TypeError) as e:
        # bad magic, an unknown version or value type, a read past the end, a duplicate key, bad UTF-8
        raise ValueError(f"{path}: not a GGUF file ({e})") from None


def _value(reader: gguf.GGUFReader, path: Path, key: str, kind: type, default=_REQUIRED):
    """The scalar metadata value `key`, which must be of `kind` (int, float, str or bool)."""
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"{path}: metadata key {key!r} is missing")
        return default
    if len(field.types) != 1 or field.types[0] not in _VALUE_TYPES[kind]:
        raise ValueError(f"{path}: metadata key {key!r} is {field.types[0].name}, expected {kind.__name__}")
    try:
        return kind(field.contents())
    except UnicodeDecodeError:
        raise ValueError(f"{path}: metadata key {key!r} is not UTF-8 text") from None


def _array(reader: gguf.GGUFReader, path: Path, key: str, kind: type, default=_REQUIRED) -> list:
    """The array metadata value `key`, whose items must be of `kind`."""
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"{path}: metadata key {key!r} is missing")
        return default
    # types is [ARRAY, item type] (just [ARRAY] when empty)
    if field.types[0] != gguf.GGUFValueType.ARRAY or (
        field.types[1:] and field.types[1] not in _VALUE_TYPES[kind]
    ):
        raise ValueError(f"{path}: metadata key {key!r} is not an array of {kind.__name__}")
    try:
        return [kind(v) for v in field.contents()]
    except UnicodeDecodeError:
        raise ValueError(f"{path}: metadata key {key!r} holds text that is not UTF-8") from None


def _dim(reader: gguf.GGUFReader, path: Path, key: str, default=_REQUIRED) -> int:
    n = _value(reader, path, key, int, default)
    if n <= 0:
        raise ValueError(f"{path}: metadata key {key!r} is {n}, expected a positive count")
    return n


def _config(reader: gguf.GGUFReader, path: Path, n_tokens: int) -> dict:
    """config.json of a LlamaForCausalLM from the llama.* keys (llama.cpp's defaults where it has one)."""
    hidden = _dim(reader, path, "llama.embedding_length")
    heads = _dim(reader, path, "llama.attention.head_count")
    head_dim = _dim(reader, path, "llama.attention.key_length", hidden // heads or 1)
    if (value_dim := _dim(reader, path, "llama.attention.value_length", head_dim)) != head_dim:
        raise ValueError(
            f"{path}: llama.attention.value_length {value_dim} differs from key_length {head_dim}"
        )
    if (rope_dim := _dim(reader, path, "llama.rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(
            f"{path}: llama.rope.dimension_count {rope_dim}: RoPE on part of a head is not supported"
        )
    if (scaling := _value(reader, path, "llama.rope.scaling.type", str, "none")) != "none":
        raise ValueError(f"{path}: llama.rope.scaling.type {scaling!r}: RoPE scaling is not supported")
    vocab = _dim(reader, path, "llama.vocab_size", n_tokens)
    if vocab != n_tokens:
        raise ValueError(f"{path}: llama.vocab_size is {vocab} but tokenizer.ggml.tokens holds {n_tokens}")
    special = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        # a file without a pad token pads with its eos (a padded position is never attended to)
        default = _REQUIRED if name != "pad" else special.get("eos")
        special[name] = _value(reader, path, f"tokenizer.ggml.{key}", int, default)
        if not 0 <= special[name] < vocab:
            raise ValueError(
                f"{path}: tokenizer.ggml.{key} {special[name]} is outside the {vocab}-token vocabulary"
            )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _dim(reader, path, "llama.feed_forward_length"),
        "num_hidden_layers": _dim(reader, path, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _dim(reader, path, "llama.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "max_position_embeddings": _dim(reader, path, "llama.context_length"),
        "rms_norm_eps": _float32(_value(reader, path, "llama.attention.layer_norm_rms_epsilon", float)),
        "rope_theta": _float32(_value(reader, path, "llama.rope.freq_base", float, 10000.0)),
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": special["bos"],
        "eos_token_id": special["eos"],
        "pad_token_id": special["pad"],
    }


def _float32(x: float) -> float:
    """A float32 from the file as the shortest decimal that is that float32 (9.99999974738e-06 reads 1e-05)."""
    return float(str(np.float32(x)))


def _expected_tensors(config: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF name -> (transformers name, transformers shape) of every tensor a file of `config` may hold."""
    hidden, inter, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    block = {
        "input_layernorm": (hidden,),
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "post_attention_layernorm": (hidden,),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    shapes = {"model.embed_tokens": (config["vocab_size"], hidden), "model.norm": (hidden,)}
    shapes["lm_head"] = shapes["model.embed_tokens"]
    for i in range(config["num_hidden_layers"]):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in block.items()}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    return {
        names.get_name(f"{n}.weight", try_suffixes=(".weight",)): (f"{n}.weight", s)
        for n, s in shapes.items()
    }


def _check_tensors(reader: gguf.GGUFReader, path: Path, config: dict) -> dict[str, str]:
    """Every tensor known, of a type gguf dequantises and of the config's shape, and none missing; their types."""
    # each block holds 9 tensors: a forged block count fails here, before a name is made for every block
    if (needed := 9 * config["num_hidden_layers"] + 2) > len(reader.tensors):
        n = config["num_hidden_layers"]
        raise ValueError(
            f"{path}: llama.block_count {n} needs {needed} tensors, the file holds {len(reader.tensors)}"
        )
    expected = _expected_tensors(config)
    for t in reader.tensors:
        if t.name not in expected:
            raise ValueError(
                f"{path}: tensor {t.name!r} is not one a llama model has (Myna imports plain Llama)"
            )
        if not _can_dequantize(t.tensor_type):
            raise ValueError(
                f"{path}: tensor {t.name!r} is {t.tensor_type.name}, which gguf cannot dequantise"
            )
        if (found := tuple(int(n) for n in reversed(t.shape))) != (shape := expected[t.name][1]):
            raise ValueError(f"{path}: tensor {t.name!r} has shape {list(found)}, expected {list(shape)}")
    present = {t.name for t in reader.tensors}
    if missing := [n for n in expected if n not in present and n != "output.weight"]:
        raise ValueError(f"{path}: {len(missing)} tensors missing, the first {missing[0]!r}")
    return {t.name: t.tensor_type.name for t in reader.tensors}


@cache
def _can_dequantize(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether gguf dequantises `qtype` (tried on one block of zeros: gguf lists its types only privately)."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _tokenizer(reader: gguf.GGUFReader, path: Path, tokens: list[str], config: dict) -> tuple[str, dict]:
    """tokenizer.json and tokenizer_config.json of the file's byte-level BPE, as llama.cpp tokenizes with it."""
    kind = _value(reader, path, "tokenizer.ggml.model", str)
    if kind != "gpt2":
        what = f" ({TOKENIZER_KINDS[kind]})" if kind in TOKENIZER_KINDS else ""
        raise ValueError(
            f"{path}: tokenizer.ggml.model {kind!r}{what} is not supported; Myna imports: gpt2 (BPE)"
        )
    pre = _value(reader, path, "tokenizer.ggml.pre", str, "default")
    if pre not in PRE_SPLITS:
        raise ValueError(
            f"{path}: tokenizer.ggml.pre {pre!r} is not supported; Myna imports: {', '.join(PRE_SPLITS)}"
        )
    types = _array(reader, path, "tokenizer.ggml.token_type", int, [gguf.TokenType.NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(
            f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
        )

    alphabet = byte_alphabet()
    letters = set(alphabet.values())
    vocab, added = {}, []
    for i, (token, token_type) in enumerate(zip(tokens, types, strict=True)):
        if token_type in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
            # llama.cpp matches these whole in the text as written (so they stay as written in the vocabulary
            # too: tokenizers gives an added token the id of its vocabulary entry); control tokens are special
            added.append(_added_token(i, token, special=token_type == gguf.TokenType.CONTROL))
        elif not set(token) <= letters:  # a plain token stored as text, not in the byte alphabet
            token = "".join(alphabet[b] for b in token.encode())
        if vocab.setdefault(token, i) != i:
            raise ValueError(
                f"{path}: tokenizer.ggml.tokens: {token!r} is both token {vocab[token]} and token {i}"
            )

    merges = []
    for i, merge in enumerate(_array(reader, path, "tokenizer.ggml.merges", str)):
        pair = merge.split(" ")
        if len(pair) != 2 or not all(pair):
            raise ValueError(f"{path}: tokenizer.ggml.merges[{i}] {merge!r} is not two tokens")
        merges.append(pair)

    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                *(
                    {"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
                    for r in PRE_SPLITS[pre]
                ),
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,  # nothing added: the caller adds bos, by add_bos_token
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": pre in IGNORE_MERGES,
            "vocab": vocab,
            "merges": merges,
        },
    }
    tokenizer_json = json.dumps(spec, ensure_ascii=False)
    try:
        tokenizers.Tokenizer.from_str(tokenizer_json)
    # tokenizers raises a bare Exception, e.g. for a merge of tokens not in the vocabulary
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: tokenizer.ggml.tokens/merges: tokenizers refuses them: {reason}") from None

    tokenizer_config = {f"{name}_token": tokens[config[f"{name}_token_id"]] for name in ("bos", "eos", "pad")}
    # llama.cpp adds bos for Llama 3's vocabularies unless the file says otherwise, and for no other BPE
    tokenizer_config["add_bos_token"] = _value(
        reader, path, "tokenizer.ggml.add_bos_token", bool, pre in IGNORE_MERGES
    )
    if (template := _value(reader, path, "tokenizer.chat_template", str, None)) is not None:
        tokenizer_config["chat_template"] = template
    return tokenizer_json, tokenizer_config


def _added_token(i: int, content: str, special: bool) -> dict:
    return {
        "id": i,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }
