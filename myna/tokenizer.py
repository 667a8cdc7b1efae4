"""Byte-level BPE tokenizer: trained with HF `tokenizers`, bulk-encoded by tiktoken from the same merges.

One text is encoded in three steps, with no normalisation (so decode(encode(x)) == x for every valid str):
1. split into pieces with SPLIT_PATTERN (GPT-4 style: words with one leading space or symbol, digits in groups of
   at most three, punctuation/emoji runs, newlines, other whitespace);
2. write each piece's UTF-8 bytes in GPT-2's printable byte alphabet (HF's ByteLevel with use_regex=False);
3. apply the BPE merges inside each piece; a piece that is itself a vocabulary entry becomes that one token.

tiktoken runs the same algorithm with the same regex: it ranks a pair by the id of the token the two parts make,
and HF's trainer gives each merged token the next id, so merge priority == token id. tiktoken documents that its
byte-hashing BPE equals pair-merge BPE under exactly that condition; `ignore_merges` makes HF take the same
whole-piece shortcut tiktoken takes. `Tokenizer` only builds the tiktoken path when the tokenizer.json has this
structure, otherwise every call goes through HF.

Myna's own tokenizers hold their special tokens at ids 0..7 in SPECIAL_TOKENS order; an imported model's
tokenizer keeps its own, named with their roles in tokenizer_format.json (`MYNA_FORMAT` has the fields). `encode` treats their strings in user text as ordinary text
(HF's encode_special_tokens is on, and the split pattern never yields a piece that spells one), so only
chat-template code, which appends the ids directly, can put a special token into a sequence.
"""

import json
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tiktoken
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from myna.chat_format import MYNA, MYNA_JINJA, ChatFormat
from myna.io import atomic_path, atomic_write, read_json

SPECIAL_TOKENS = (
    "<|bos|>",  # start of every document; also the document separator in token shards
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",  # end of a turn
    "<|tool_call|>",
    "<|tool_result|>",
    "<|pad|>",
)

# Alternatives are tried left to right at each position.
SPLIT_PATTERN = "|".join(
    [
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",  # English contractions: "don't" -> "don", "'t"
        r"[^\r\n\p{L}\p{N}]?\p{L}+",  # a word, keeping one leading space or symbol: " cat", "#tag", "@user"
        r"\p{N}{1,3}",  # numbers in groups of at most three digits
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",  # a run of punctuation or emoji, with an optional leading space
        r"\s*[\r\n]+",  # line breaks, with the spaces that end the line
        r"\s+(?!\S)",  # a run of spaces, leaving the last one to the word that follows
        r"\s+",  # what is left: e.g. a tab before a digit or a symbol
    ]
)

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# A tokenizer's tokens with a role, and its chat format. Myna's own tokenizers use this one; an imported model's
# is written beside its tokenizer.json as tokenizer_format.json (bos_token and add_bos_token are the model's own,
# for export).
FORMAT_FILE = "tokenizer_format.json"
MYNA_FORMAT = {
    "document_token": "<|bos|>",
    "end_token": "<|end|>",
    "pad_token": "<|pad|>",
    "bos_token": "<|bos|>",
    "add_bos_token": True,
    "chat_format": MYNA.to_dict(),
    "chat_template": MYNA_JINJA,
}


def check_format(fmt: object, specials: set[str], where: str) -> dict:
    """A tokenizer format whose tokens are special tokens of the tokenizer; errors name `where`."""
    if not isinstance(fmt, dict) or set(fmt) != set(MYNA_FORMAT):
        raise ValueError(f"{where}: tokenizer format: expected the fields {sorted(MYNA_FORMAT)}")
    for key in ("document_token", "end_token", "pad_token", "bos_token"):
        if fmt[key] not in specials:
            raise ValueError(f"{where}: {key} {fmt[key]!r} is not one of the tokenizer's special tokens")
    if not isinstance(fmt["chat_template"], str) or not isinstance(fmt["add_bos_token"], bool):
        raise ValueError(
            f"{where}: tokenizer format: chat_template must be text and add_bos_token true/false"
        )
    return fmt


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by HF's ByteLevel pre-tokenizer.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68 bytes take the
    characters from U+0100 upwards, in byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def new_hf_tokenizer() -> tokenizers.Tokenizer:
    hf = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    return hf


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str | Path | None = None) -> "Tokenizer":
    """Train a byte-level BPE with `vocab_size` ids (specials and the 256 bytes included).

    Training stops early when the texts hold fewer distinct merges; `Tokenizer.vocab_size` tells the real size.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size}: need at least {MIN_VOCAB_SIZE} (256 bytes + specials)")
    hf = new_hf_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    tok = Tokenizer(hf)
    if out_path is not None:
        tok.save(out_path)
    return tok


MAX_TOKENIZER_BYTES = 128 << 20  # a 256k-token vocabulary with its merges is ~30 MB


class Tokenizer:
    """A trained tokenizer: HF for exact reference behaviour, tiktoken for fast bulk encoding."""

    def __init__(self, hf: tokenizers.Tokenizer, source: str = "<in memory>", fmt: dict | None = None):
        self.hf = hf
        # User text is text: never match special-token strings inside it.
        self.hf.encode_special_tokens = True
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.special_ids = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        if fmt is None:  # one of Myna's own tokenizers
            if missing := [s for s in SPECIAL_TOKENS if s not in self.special_ids]:
                raise ValueError(f"{source}: special tokens missing from the tokenizer: {missing}")
            fmt = MYNA_FORMAT
        self.format = check_format(fmt, set(self.special_ids), source)
        self.chat = ChatFormat.from_dict(fmt["chat_format"], source)
        if self.chat.stop not in self.special_ids:
            raise ValueError(f"{source}: the chat format's stop {self.chat.stop!r} is not a special token")
        self.bos_id = self.special_ids[fmt["document_token"]]  # starts every document (and separates them)
        self.eot_id = self.special_ids[fmt["end_token"]]  # ends a turn, so a reply
        self.pad_id = self.special_ids[fmt["pad_token"]]
        self._special_split = re.compile(
            "|".join(map(re.escape, sorted(self.special_ids, key=len, reverse=True)))
        )

        spec = json.loads(hf.to_str())
        unbyte = {c: b for b, c in byte_alphabet().items()}
        special_set = set(self.special_ids.values())
        # Raw bytes of every id; specials stand for no text (what bits-per-byte counts).
        self.token_bytes: list[bytes] = [b""] * self.vocab_size
        for piece, i in hf.get_vocab(with_added_tokens=False).items():
            if i in special_set:
                continue
            if not all(c in unbyte for c in piece):
                raise ValueError(f"{source}: not a byte-level BPE: vocabulary entry {piece!r} (id {i})")
            self.token_bytes[i] = bytes(unbyte[c] for c in piece)
        self.tiktoken = self._build_tiktoken() if _is_tiktoken_equivalent(spec) else None

    def _build_tiktoken(self) -> tiktoken.Encoding:
        special_set = set(self.special_ids.values())
        ranks = {b: i for i, b in enumerate(self.token_bytes) if i not in special_set}
        return tiktoken.Encoding(
            name=f"myna_bpe_{self.vocab_size}",
            pat_str=SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=dict(self.special_ids),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """tokenizer.json, with the tokenizer_format.json beside it when there is one (an imported model's)."""
        if (size := Path(path).stat().st_size) > MAX_TOKENIZER_BYTES:
            raise ValueError(
                f"{path}: {size:,} bytes, over the {MAX_TOKENIZER_BYTES:,} a tokenizer.json may be"
            )
        try:
            hf = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path}: not a readable tokenizer.json: {e}") from e
        fmt_path = Path(path).with_name(FORMAT_FILE)
        return cls(hf, source=str(path), fmt=read_json(fmt_path) if fmt_path.is_file() else None)

    def save(self, path: str | Path) -> None:
        """tokenizer.json at `path`, and beside it tokenizer_format.json unless the format is Myna's own."""
        with atomic_path(path) as tmp:
            self.hf.save(str(tmp))
        fmt_path = Path(path).with_name(FORMAT_FILE)
        if self.format == MYNA_FORMAT:
            fmt_path.unlink(missing_ok=True)  # an imported model's, left from an earlier save here
        else:
            with atomic_write(fmt_path, "w") as f:
                json.dump(self.format, f, indent=1, ensure_ascii=False)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, with no bos/eot added and special-token strings kept as text."""
        if self.tiktoken is not None:
            return self.tiktoken.encode_ordinary(text)
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_special(self, text: str) -> list[int]:
        """Ids of template text: special-token strings in it become their ids (never use it on user text)."""
        ids, at = [], 0
        for m in self._special_split.finditer(text):
            ids += self.encode(text[at : m.start()]) if m.start() > at else []
            ids.append(self.special_ids[m.group()])
            at = m.end()
        return ids + (self.encode(text[at:]) if at < len(text) else [])

    def document(self, text: str) -> list[int]:
        """<|bos|> + the text's ids: a document as pre-training saw every one (the model's raw-text input)."""
        return [self.bos_id, *self.encode(text)]

    def encode_batch(self, texts: Sequence[str], num_threads: int = os.cpu_count() or 1) -> list[list[int]]:
        """`encode` over many texts in `num_threads` threads (the HF fallback sizes its own thread pool)."""
        texts = list(texts)
        if self.tiktoken is None:
            return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]
        if num_threads <= 1 or len(texts) < 2 * num_threads:
            return self._encode_chunk(texts)
        # tiktoken's own batch call makes one thread-pool task per text, which costs more than encoding a
        # tweet; give each task a contiguous chunk instead (tiktoken releases the GIL while it encodes).
        size = -(-len(texts) // (4 * num_threads))
        chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
        with ThreadPoolExecutor(num_threads) as pool:
            return [ids for part in pool.map(self._encode_chunk, chunks) for ids in part]

    def _encode_chunk(self, texts: list[str]) -> list[list[int]]:
        encode = self.tiktoken.encode_ordinary  # bound once: the lookups cost ~5% on tweet-length texts
        return [encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special ids show as their strings, broken UTF-8 as U+FFFD."""
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw text bytes of `ids`; special ids contribute nothing."""
        return b"".join(self.token_bytes[i] for i in ids)


def _is_tiktoken_equivalent(spec: dict) -> bool:
    """True when tiktoken, given our pattern and ranks = HF ids, encodes exactly like this HF tokenizer."""
    model = spec["model"]
    if spec.get("normalizer") is not None or model.get("type") != "BPE":
        return False
    if not all(t["special"] for t in spec.get("added_tokens", [])):
        return False  # HF would cut plain added tokens out of the text; tiktoken has no such step
    if not model.get("ignore_merges") or model.get("dropout") or model.get("byte_fallback"):
        return False
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return False
    expected = json.loads(new_hf_tokenizer().to_str())["pre_tokenizer"]
    if spec.get("pre_tokenizer") != expected:
        return False
    vocab = model["vocab"]
    if any(c not in vocab for c in byte_alphabet().values()):
        return False
    # Merge priority must equal the id of the merged token (strictly increasing along the merge list).
    last = -1
    for merge in model["merges"]:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        token_id = vocab.get(left + right)
        if token_id is None or token_id <= last:
            return False
        last = token_id
    return True
