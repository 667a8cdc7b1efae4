"""Token shards: a flat binary format, its atomic writer, a validating memmap reader and the training loader.

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

The loader cuts each shard into windows of seq_len + 1 tokens that start every seq_len tokens (x = w[:-1],
y = w[1:]); windows do not cross shards, so the last (len - 1) % seq_len tokens of a shard only ever appear as a
target. Windows are numbered 0..N-1 across the shards in order; that sequence repeated forever (epochs) is the
stream. A step takes the next batch_size * world_size windows of the stream and rank r keeps the ones whose index
within the step is r mod world_size, so the ranks' rows together are exactly the single-process batch.
"""

import struct
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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
        if self._closed:
            raise ValueError(f"{self.out_dir}/{self.prefix}: writer is closed")
        doc = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))
        if doc.size and not np.issubdtype(doc.dtype, np.integer):
            raise ValueError(f"document {self.num_docs}: token ids must be integers, got dtype {doc.dtype}")
        if doc.size:
            lo, hi = int(doc.min()), int(doc.max())
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"document {self.num_docs}: token id {bad} outside 0..{self.vocab_size - 1}")
            if (doc == self.bos_id).any():
                raise ValueError(
                    f"document {self.num_docs}: contains bos ({self.bos_id}); the writer adds it"
                )
        n = doc.size + 1
        if self._file is not None and self._shard_count + n > self.shard_tokens:
            self._finish_shard()
        if self._file is None:
            self._start_shard()
        self._file.write(np.array([self.bos_id], dtype=self.dtype).tobytes())
        self._file.write(doc.astype(self.dtype).tobytes())
        self._shard_count += n
        self.num_tokens += n
        self.num_docs += 1

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


def _resolve_paths(paths_or_dir: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(paths_or_dir, str | Path):
        p = Path(paths_or_dir)
        paths = sorted(p.glob("*.bin")) if p.is_dir() else [p]
    else:
        paths = [Path(p) for p in paths_or_dir]
    if not paths:
        raise ValueError(f"{paths_or_dir}: no shards (*.bin) found")
    return paths


class TokenLoader:
    """Endless (x, y) int64 batches of shape (batch_size, seq_len) from token shards; see the module docstring."""

    def __init__(
        self,
        paths_or_dir: str | Path | Iterable[str | Path],
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size={batch_size}, seq_len={seq_len}: both must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} outside 0..world_size-1 (world_size={world_size})")
        self.paths = _resolve_paths(paths_or_dir)
        infos = [shard_info(p) for p in self.paths]
        vocab_sizes = {i.vocab_size for i in infos}
        if len(vocab_sizes) > 1:
            raise ValueError(f"shards disagree on vocab_size {sorted(vocab_sizes)}: {self.paths[0]} ...")
        self.vocab_size = infos[0].vocab_size
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.shards = [read_shard(p) for p in self.paths]
        self._windows = [(len(s) - 1) // seq_len for s in self.shards]
        self._first = np.cumsum([0, *self._windows]).tolist()  # global index of each shard's first window
        self.num_windows = self._first[-1]
        if self.num_windows == 0:
            raise ValueError(f"{self.paths[0]} ...: no shard holds seq_len + 1 = {seq_len + 1} tokens")
        self._epoch = 0
        self._pos = 0  # index of the next window of the stream within the current epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.batch_size * self.world_size
        rows = []
        for j in range(self.rank, step, self.world_size):
            g = (self._pos + j) % self.num_windows
            s = bisect_right(self._first, g) - 1
            start = (g - self._first[s]) * self.seq_len
            rows.append(self.shards[s][start : start + self.seq_len + 1])
        self._epoch += (self._pos + step) // self.num_windows
        self._pos = (self._pos + step) % self.num_windows
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        if self.device.type == "cuda":
            # One pinned copy of the (B, T+1) windows; x and y are views of it on the device.
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        """Where the stream stands (the same on every rank): JSON-able, for checkpoints."""
        s = bisect_right(self._first, self._pos) - 1
        return {
            "epoch": self._epoch,
            "shard": s,
            "offset": (self._pos - self._first[s]) * self.seq_len,  # token offset of the next window
            "seq_len": self.seq_len,
            "shards": [[p.name, len(m)] for p, m in zip(self.paths, self.shards, strict=True)],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; the shards and seq_len must be the ones it was taken with."""
        mine = [[p.name, len(m)] for p, m in zip(self.paths, self.shards, strict=True)]
        if state["seq_len"] != self.seq_len or [list(x) for x in state["shards"]] != mine:
            raise ValueError(
                f"loader state was taken with seq_len={state['seq_len']} over {len(state['shards'])} shards; "
                f"this loader has seq_len={self.seq_len} over {len(mine)} shards (or their names/sizes differ)"
            )
        shard, offset = state["shard"], state["offset"]
        if (
            not 0 <= shard < len(self.shards)
            or offset % self.seq_len
            or offset // self.seq_len >= self._windows[shard]
        ):
            raise ValueError(f"loader state points outside the data: shard {shard}, offset {offset}")
        self._epoch = state["epoch"]
        self._pos = self._first[shard] + offset // self.seq_len
