"""The training loader over token shards: (x, y) batches, split by rank, resumable at an exact position.

The loader cuts each shard into windows of seq_len + 1 tokens that start every seq_len tokens (x = w[:-1],
y = w[1:]); windows do not cross shards, so the last (len - 1) % seq_len tokens of a shard only ever appear as a
target. Windows are numbered 0..N-1 across the shards in order; that sequence repeated forever (epochs) is the
stream. A step takes the next batch_size * world_size windows of the stream and rank r keeps the ones whose index
within the step is r mod world_size, so the ranks' rows together are exactly the single-process batch. With a
shuffle_seed, epoch e visits the windows in a permutation drawn from (seed, e): every rank draws the same one, and a
resumed loader draws it again, so the stream stays exactly reproducible.
"""

from bisect import bisect_right
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from myna.data.shards import read_shard, shard_info


def _resolve_paths(paths_or_dir: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(paths_or_dir, str | Path):
        p = Path(paths_or_dir)
        paths = sorted(p.glob("*.bin")) if p.is_dir() else [p]
    else:
        paths = [Path(p) for p in paths_or_dir]
    if not paths:
        raise ValueError(f"{paths_or_dir}: no shards (*.bin) found")
    return paths


def epoch_order(n: int, shuffle_seed: int | None, epoch: int) -> np.ndarray:
    """The order of n items in `epoch`: as they stand without a seed, else a permutation seeded by (seed, epoch)
    alone, so every rank and every resumed run draws the same one."""
    if shuffle_seed is None:
        return np.arange(n)
    return np.random.default_rng([shuffle_seed, epoch]).permutation(n)


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
        shuffle_seed: int | None = None,
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
        self.shuffle_seed = shuffle_seed  # None: windows in shard order; else a fresh permutation every epoch
        self._orders: dict[int, np.ndarray] = {}  # epoch -> window order, the current and the next epoch only
        self._epoch = 0
        self._pos = 0  # index of the next window of the stream within the current epoch

    def _window(self, epoch: int, i: int) -> int:
        """The global index of the i-th window of `epoch`."""
        if self.shuffle_seed is None:
            return i
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = epoch_order(self.num_windows, self.shuffle_seed, epoch)
        return int(self._orders[epoch][i])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.batch_size * self.world_size
        rows, where = [], []
        for j in range(self.rank, step, self.world_size):
            epoch, i = divmod(self._pos + j, self.num_windows)
            g = self._window(self._epoch + epoch, i)
            s = bisect_right(self._first, g) - 1
            start = (g - self._first[s]) * self.seq_len
            rows.append(self.shards[s][start : start + self.seq_len + 1])
            where.append((s, start))
        self._epoch += (self._pos + step) // self.num_windows
        self._pos = (self._pos + step) % self.num_windows
        tokens = np.stack(rows)
        if tokens.max() >= self.vocab_size:  # the header was checked, the body only here: a flipped bit
            r, t = np.unravel_index(int(tokens.argmax()), tokens.shape)
            s, start = where[r]
            raise ValueError(
                f"{self.paths[s]}: token {int(tokens[r, t])} at position {start + t} is outside the "
                f"vocabulary of {self.vocab_size}; the shard is damaged"
            )
        batch = torch.from_numpy(tokens.astype(np.int64))
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
            "shuffle_seed": self.shuffle_seed,
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
        if state.get("shuffle_seed") != self.shuffle_seed:
            raise ValueError(
                f"loader state was taken with shuffle_seed={state.get('shuffle_seed')}, this loader has "
                f"{self.shuffle_seed}: the window order would differ"
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
