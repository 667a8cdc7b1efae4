"""Token shards: a flat binary format, its atomic writer and a validating memmap reader (numpy only: data workers
import this module, and they should not pay for torch; the training loader is myna.data.loader).

File layout of one shard `{prefix}_{i:06d}.bin` (all little-endian):

    offset  size  field
    0       8     magic b"MYNATOK\\0"
    8       4     version, uint32 (= 1)
    12      4     bytes per token, uint32: 2 (uint16) when vocab_size <= 65536, else 4 (uint32)
    16      8     token count, uint64
    24      8     vocab size, uint64
    32      4     bos id, uint32
    36      220   zero padding up to HEADER_SIZE = 256
    256     ...   the tokens, count * bytes-per-token bytes, nothing after them

The tokens are whole documents, each starting with bos (the writer adds it), so bos both starts and separates
documents. A document is never split across shards: every shard starts with bos, and a shard holds more than
`shard_tokens` only when one document alone is longer.
"""

import itertools
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from myna.io import atomic_write

MAGIC = b"MYNATOK\0"
VERSION = 1
HEADER_SIZE = 256
_HEADER = struct.Struct("<8sIIQQI")  # magic, version, bytes per token, token count, vocab size, bos id
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest shard dtype that holds every id below `vocab_size`."""
    if not 0 < vocab_size <= 2**32:
        raise ValueError(f"vocab_size={vocab_size}: expected 1..2**32")
    return _DTYPES[2] if vocab_size <= 2**16 else _DTYPES[4]


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    version: int
    dtype: np.dtype
    num_tokens: int
    vocab_size: int
    bos_id: int


def shard_info(path: str | Path) -> ShardInfo:
    """Read and check a shard's header against the file; ValueError says which file and what is wrong."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_SIZE:
        raise ValueError(f"{path}: truncated shard: {size} bytes, the header alone is {HEADER_SIZE}")
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
    magic, version, width, count, vocab_size, bos_id = _HEADER.unpack(head)
    if magic != MAGIC:
        raise ValueError(f"{path}: not a token shard: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ValueError(f"{path}: shard version {version}, this code reads version {VERSION}")
    if width not in _DTYPES:
        raise ValueError(f"{path}: bytes per token {width}, expected 2 or 4")
    if vocab_size == 0 or width != token_dtype(vocab_size).itemsize or bos_id >= vocab_size:
        raise ValueError(
            f"{path}: inconsistent header: vocab_size={vocab_size}, {width}-byte tokens, bos={bos_id}"
        )
    expected = HEADER_SIZE + count * width
    if size != expected:
        what = "truncated" if size < expected else "trailing bytes after the tokens"
        raise ValueError(
            f"{path}: {what}: header says {count} tokens ({expected} bytes), file has {size} bytes"
        )
    if count == 0:
        raise ValueError(f"{path}: shard holds no tokens")
    return ShardInfo(path, version, _DTYPES[width], count, vocab_size, bos_id)


def read_shard(path: str | Path) -> np.memmap:
    """The tokens of a validated shard, memory-mapped read-only."""
    info = shard_info(path)
    return np.memmap(info.path, dtype=info.dtype, mode="r", offset=HEADER_SIZE, shape=(info.num_tokens,))


class ShardWriter:
    """Appends documents to shards `{prefix}_{i:06d}.bin` in `out_dir`, each written atomically.

    `add(ids)` writes bos followed by `ids` (which must not contain bos; an empty document is a lone bos). A
    shard in progress lives in a hidden temp file and only gets its final name, with a complete header, when it
    is closed; an exception inside the `with` block deletes it, while shards already finished stay. Refuses to
    start (FileExistsError) when `out_dir` already holds `{prefix}_*.bin` shards, so runs never mix.
    """

    def __init__(
        self,
        out_dir: str | Path,
        prefix: str,
        vocab_size: int,
        shard_tokens: int = 2**27,
        bos_id: int = 0,
    ):
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        if not 0 <= bos_id < vocab_size:
            raise ValueError(f"bos_id={bos_id} outside the vocabulary 0..{vocab_size - 1}")
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens={shard_tokens}: expected >= 1")
        self.bos_id = bos_id
        self.shard_tokens = shard_tokens
        old = sorted(self.out_dir.glob(f"{prefix}_*.bin"))
        if old:
            # Mixing new shards with a previous run's leftovers would silently corrupt the dataset.
            raise FileExistsError(
                f"{self.out_dir}: {len(old)} shards named {prefix}_*.bin exist already: {old[0]}"
            )
        self.paths: list[Path] = []
        self.num_docs = 0
        self.num_tokens = 0
        self._shard_cm = None  # the atomic_write context of the shard in progress
        self._file = None
        self._shard_count = 0  # tokens in the shard in progress
        self._closed = False

    def add(self, ids: Iterable[int] | np.ndarray) -> None:
        """Append one document: bos, then `ids`."""
        self.add_many([ids if isinstance(ids, np.ndarray) else list(ids)])

    def add_many(self, docs: Sequence[Sequence[int] | np.ndarray]) -> None:
        """Append documents in order, as add() on each would, checking and converting them in one numpy pass."""
        if self._closed:
            raise ValueError(f"{self.out_dir}/{self.prefix}: writer is closed")
        if not docs:
            return
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        # via float64 (exact for every id below 2**53) so that a non-integer id is caught, not truncated
        values = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.float64, count=int(lengths.sum()))
        frac = np.flatnonzero(values != np.trunc(values))
        if frac.size:
            doc = self.num_docs + int(np.searchsorted(np.cumsum(lengths), int(frac[0]), side="right"))
            raise ValueError(f"document {doc}: token ids must be integers, got {values[frac[0]]}")
        flat = values.astype(np.int64)
        ends = np.cumsum(lengths + 1)  # end of each document in the output, bos included
        bad = np.flatnonzero((flat < 0) | (flat >= self.vocab_size) | (flat == self.bos_id))
        if bad.size:
            pos = int(bad[0])
            doc = self.num_docs + int(np.searchsorted(np.cumsum(lengths), pos, side="right"))
            if flat[pos] == self.bos_id:
                raise ValueError(f"document {doc}: contains bos ({self.bos_id}); the writer adds it")
            raise ValueError(f"document {doc}: token id {flat[pos]} outside 0..{self.vocab_size - 1}")
        tokens = np.empty(int(ends[-1]), dtype=self.dtype)
        starts = ends - lengths - 1
        tokens[starts] = self.bos_id
        body = np.ones(tokens.size, dtype=bool)
        body[starts] = False
        tokens[body] = flat
        # write whole documents into the current shard while they fit; a full shard is finished first
        done = 0  # documents written so far
        while done < len(docs):
            offset = int(starts[done])
            room = self.shard_tokens - (self._shard_count if self._file is not None else 0)
            fit = int(np.searchsorted(ends[done:] - offset, room, side="right"))
            if fit == 0 and self._file is not None and self._shard_count > 0:
                self._finish_shard()
                continue
            fit = max(fit, 1)  # a document longer than a whole shard gets a shard of its own
            if self._file is None:
                self._start_shard()
            chunk = tokens[offset : int(ends[done + fit - 1])]
            self._file.write(chunk.tobytes())
            self._shard_count += chunk.size
            self.num_tokens += chunk.size
            self.num_docs += fit
            done += fit

    def _start_shard(self) -> None:
        path = self.out_dir / f"{self.prefix}_{len(self.paths):06d}.bin"
        self._shard_cm = atomic_write(path, "wb")
        self._file = self._shard_cm.__enter__()
        self._file.write(bytes(HEADER_SIZE))  # the real header goes in once the count is known
        self._shard_count = 0
        self.paths.append(path)

    def _finish_shard(self) -> None:
        header = _HEADER.pack(
            MAGIC, VERSION, self.dtype.itemsize, self._shard_count, self.vocab_size, self.bos_id
        )
        self._file.seek(0)
        self._file.write(header)
        self._file = None
        self._shard_cm.__exit__(None, None, None)  # flush, fsync, rename into place

    def close(self) -> list[Path]:
        """Finish the shard in progress; returns every shard written."""
        if not self._closed and self._file is not None:
            self._finish_shard()
        self._closed = True
        return list(self.paths)

    def abort(self) -> None:
        """Delete the shard in progress (finished shards stay) and close the writer."""
        if self._file is not None:
            self._file = None
            self.paths.pop()
            err = RuntimeError("shard writer aborted")
            self._shard_cm.__exit__(RuntimeError, err, None)  # atomic_write deletes its temp file
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
