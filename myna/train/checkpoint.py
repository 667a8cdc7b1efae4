"""Checkpoints: RUN/checkpoints/step_{N:08d}/, written whole or not at all.

A checkpoint holds the model, the optimizer and state.json (step, config, data position, RNG states). Without
FSDP rank 0 writes model.safetensors (tied weights stored once, their other names kept in the metadata) and
optimizer.pt (the optimizer state keyed by parameter name, torch.save'd, loaded with weights_only=True). Under
FSDP every rank writes its shards into dcp/ with torch.distributed.checkpoint, which can load them back into any
layout: another world size, or one plain process with no process group at all.

Atomicity: everything is written into a hidden temp folder next to the final one, fsynced, and renamed into
place once state.json (written last) is in it; a folder named step_* is therefore always complete, and a crash
at any moment leaves the previous checkpoints untouched. Old checkpoints beyond keep_last are renamed away before
they are deleted, so a half-deleted one never carries a step_* name either.
"""

import json
import os
import random
import re
import shutil
import warnings
from base64 import b64decode, b64encode
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from myna.train.distributed import Dist

STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------------------------
# RNG states as JSON


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(b64decode(state["torch"])), dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(b64decode(state["cuda"])), dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses tensors that share memory: store each once and name its aliases in the metadata."""
    first: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            tensors[name] = t.detach().cpu().contiguous()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})
    _fsync_file(path)


def _retire(path: Path) -> None:
    """Rename out of the step_* namespace, then delete: a half-deleted folder never looks like a checkpoint."""
    trash = path.with_name(f".trash_{path.name}_{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash)


def save(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    dist: Dist,
    keep_last: int = 2,
) -> Path:
    """Write the checkpoint of `step` atomically (every rank calls this) and keep only the newest keep_last."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(f".tmp_{final.name}")
    if dist.is_main:
        if tmp.exists():  # left by a crash during an earlier write of this step
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    if dist.parallel == "fsdp":
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / "dcp")
    elif dist.is_main:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        _save_safetensors(model_sd, tmp / "model.safetensors")
        torch.save(optim_sd, tmp / "optimizer.pt")
        _fsync_file(tmp / "optimizer.pt")
    dist.barrier()
    if dist.is_main:
        with open(tmp / "state.json", "w", encoding="utf-8") as f:
            json.dump({"step": step, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        if dist.parallel == "fsdp":
            _fsync_dir(tmp / "dcp")
        _fsync_dir(tmp)
        if final.exists():
            _retire(final)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            _retire(old)
    dist.barrier()
    return final


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_state(path: str | Path) -> dict:
    return json.loads((Path(path) / "state.json").read_text(encoding="utf-8"))


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for name, source in aliases.items():
        tensors[name] = tensors[source]
    return tensors


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore model (and optimizer) from the checkpoint folder `path`; returns its state.json.

    Works for any writer/reader pair of layouts: a sharded (FSDP) checkpoint reshards into whatever `model` is,
    a plain one is loaded as full state dicts and sliced by set_state_dict where `model` is sharded.
    """
    path = Path(path)
    if (path / "dcp").is_dir():
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = (
            get_state_dict(model, optimizer) if optimizer else (get_model_state_dict(model), {})
        )
        target = {"model": model_sd, "optim": optim_sd} if optimizer else {"model": model_sd}
        with warnings.catch_warnings():  # loading without a process group is intended: one plain process
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(target, checkpoint_id=path / "dcp")
        options = StateDictOptions()
    else:
        model_sd = _load_safetensors(path / "model.safetensors")
        optim_sd = torch.load(path / "optimizer.pt", weights_only=True) if optimizer else {}
        options = StateDictOptions(full_state_dict=True)
    set_state_dict(
        model,
        optimizer or [],
        model_state_dict=model_sd,
        optim_state_dict=optim_sd,
        options=options,
    )
    return read_state(path)
