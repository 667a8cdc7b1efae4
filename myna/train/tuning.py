"""What SFT and DPO share: reading their JSONL records with rejects, the held-out split by a conversation's
opening, the epoch stream their loaders draw from, and a tuned run's settings derived from its base run."""

import json
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import orjson
import xxhash

from myna.config import ModelConfig, TrainConfig
from myna.data.readers import ReadOptions, json_records
from myna.data.schema import Reject
from myna.io import atomic_write
from myna.runs import read_config, resolve
from myna.train.distributed import Dist

HELD_OUT_FRACTION = 0.05
MIN_HELD_OUT = 8  # when 5% is fewer than this (and the data has at least twice as many)
EVAL_BATCHES = 32  # per rank and evaluation: the whole held-out set while it fits
SNIPPET_CHARS = 200


# ---------------------------------------------------------------------------------------------------------------
# Records and the held-out split


def data_file(data: str | Path, default_name: str) -> Path:
    """DIR/default_name for a data directory, the path itself for a file."""
    path = Path(data)
    if path.is_dir():
        path = path / default_name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file (expected a data directory holding it, or a JSONL file)"
        )
    return path


def read_records(path: Path, parse: Callable[[dict], dict]) -> tuple[list[dict], list[Reject]]:
    """The records `parse` accepts (JSON lines or one JSON array, gzip/zstd transparent), and a Reject (file:line,
    reason) for the rest.

    `parse(record)` returns what to keep or raises ValueError naming the field. Each kept item gets "id" (the
    record's own, else FILE:LINE) and "where" (FILE:LINE; the record's number in an array).
    """
    kept, rejects = [], []
    for item in json_records(str(path), ReadOptions()):
        if isinstance(item, Reject):
            rejects.append(item)
            continue
        rec, line, raw = item
        try:
            if not isinstance(rec, dict):
                raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
            parsed = parse(rec)
        except ValueError as e:
            rejects.append(Reject(str(path), line, str(e), raw.decode("utf-8", "replace")[:SNIPPET_CHARS]))
            continue
        rec_id = rec.get("id")
        kept.append({**parsed, "id": str(rec_id) if rec_id is not None else f"{path.name}:{line}"})
        kept[-1]["where"] = f"{path}:{line}"
    return kept, rejects


def write_rejects(out: Path, rejects: list[Reject], what: str, dist: Dist) -> None:
    """OUT/rejects.jsonl, and a log line naming the first few."""
    if not rejects:
        return
    if dist.is_main:
        with atomic_write(out / "rejects.jsonl", "wb") as f:
            f.write(b"".join(orjson.dumps(r.to_dict()) + b"\n" for r in rejects))
    shown = "; ".join(f"{r.file}:{r.line}: {r.reason}" for r in rejects[:3])
    dist.log(f"[yellow]{len(rejects)} {what} rejected (see {out}/rejects.jsonl): {shown}")


def held_out(keys: list[str], fraction: float = HELD_OUT_FRACTION, minimum: int = MIN_HELD_OUT) -> list[bool]:
    """Which items are held out: those whose key hashes into the lowest `fraction`; at least
    min(minimum, len // 2) of them (the smallest hashes). Equal keys always land on the same side."""
    h = [xxhash.xxh64(k.encode("utf-8")).intdigest() / 2**64 for k in keys]
    want = min(minimum, len(keys) // 2)
    val = [x < fraction for x in h]
    if sum(val) < want:
        cut = sorted(h)[want - 1]
        val = [x <= cut for x in h]
    return val


def opening(messages: list[dict]) -> str:
    """The held-out key of a conversation: its first non-system message."""
    first = next((m for m in messages if m["role"] != "system"), messages[0])
    return first.get("content") or json.dumps(first, sort_keys=True)


def read_and_split(
    data: str | Path, default_name: str, parse: Callable[[dict], dict], messages_key: str, what: str
) -> tuple[Path, list[dict], list[Reject], list[bool]]:
    """The records of `data` (a dir's default_name, or a file), their rejects, and which are held out (by opening).

    An error when no line is usable or when every record lands on the held-out side (they share one opening).
    """
    path = data_file(data, default_name)
    records, rejects = read_records(path, parse)
    if not records:
        first = f"; first: {rejects[0].file}:{rejects[0].line}: {rejects[0].reason}" if rejects else ""
        raise ValueError(f"{path}: no usable {what} ({len(rejects)} lines rejected{first})")
    side = held_out([opening(r[messages_key]) for r in records])
    if all(side):
        raise ValueError(f"{path}: {len(records)} {what}(s) all share one opening; nothing left to train on")
    return path, records, rejects, side


# ---------------------------------------------------------------------------------------------------------------
# The stream of epochs


class EpochStream:
    """Positions in an endless sequence of epochs, each a list of items from `items_of(epoch)`.

    A step takes the next `per_step` positions; every rank computes the same items and keeps its share (index
    within the step = rank mod world_size), like TokenLoader. With repeat=False there is only epoch 0 and the
    positions after it are None (padding for the evaluation's last batch).
    """

    def __init__(self, items_of: Callable[[int], list], repeat: bool = True):
        self.items_of, self.repeat = items_of, repeat
        self._items: dict[int, list] = {}
        self.epoch, self.pos = 0, 0

    def items(self, epoch: int) -> list:
        if epoch not in self._items:
            self._items = {e: v for e, v in self._items.items() if e >= epoch - 1}
            self._items[epoch] = self.items_of(epoch)
            if not self._items[epoch]:
                raise ValueError("an epoch with no items")
        return self._items[epoch]

    def state_dict(self, **settings) -> dict:
        """The position in the stream, with the settings (data fingerprint, seed, ...) it is valid under."""
        return {"epoch": self.epoch, "pos": self.pos, **settings}

    def load_state_dict(self, state: dict, hint: str, **settings) -> None:
        """Continue from a state_dict taken under the same settings; else a ValueError ending with `hint`."""
        theirs = {k: state.get(k) for k in settings}
        if theirs != settings:
            raise ValueError(
                f"loader state was taken over other data or settings (saved {theirs}, now {settings}): {hint}"
            )
        self.epoch, self.pos = state["epoch"], state["pos"]
        if self.pos >= len(self.items(self.epoch)):
            raise ValueError(f"loader state points past its epoch: {state}")

    def take(self, n: int) -> list:
        out = []
        for _ in range(n):
            if not self.repeat and self.epoch > 0:
                out.append(None)
                continue
            out.append(self.items(self.epoch)[self.pos])
            self.pos += 1
            if self.pos == len(self.items(self.epoch)):
                self.epoch, self.pos = self.epoch + 1, 0
        return out


def lengths_fingerprint(lengths: list[int]) -> str:
    return xxhash.xxh64(np.asarray(lengths, dtype=np.int64).tobytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# A tuned run's settings


def base_settings(base: str | Path) -> tuple[Path, Path, dict]:
    """(base run dir, its checkpoint, its config.json)."""
    run_dir, ckpt = resolve(base)
    config = read_config(run_dir)
    if not isinstance(config.get("train"), dict):
        raise ValueError(f"{run_dir}/config.json: no 'train' section to derive fine-tuning settings from")
    return run_dir, ckpt, config


def tuned_config(base_train: dict, lr_scale: float, overrides: dict, mcfg: ModelConfig) -> TrainConfig:
    """The base run's TrainConfig with a scaled-down lr, no weight decay, grad_accum 1; then `overrides`."""
    train_keys = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - train_keys
    if unknown:
        raise ValueError(
            f"unknown settings {sorted(unknown)}: expected TrainConfig fields (the model is the base's)"
        )
    base = TrainConfig(**{**base_train, "betas": tuple(base_train["betas"])})
    tcfg = replace(
        base,
        lr=base.lr * lr_scale,
        muon_lr=base.muon_lr * lr_scale,
        weight_decay=0.0,
        grad_accum=1,
        eval_batches=EVAL_BATCHES,
        compile=False,
    )
    tcfg = replace(tcfg, **overrides)
    if tcfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"seq_len={tcfg.seq_len} exceeds the base model's max_seq_len={mcfg.max_seq_len}")
    return tcfg


def schedule_for(tcfg: TrainConfig, steps: int, overrides: dict) -> TrainConfig:
    """Steps and the settings that follow from them (5% warmup, eval and checkpoint every 10%), unless given."""
    derived = {"steps": steps, "warmup_steps": max(1, steps // 20), "eval_every": max(1, steps // 10)}
    derived["save_every"] = overrides.get("eval_every", derived["eval_every"])
    return replace(tcfg, **{k: v for k, v in derived.items() if k not in overrides})
