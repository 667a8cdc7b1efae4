"""Checkpoints: RUN/checkpoints/step_{N:08d}/, written whole or not at all, read without unpickling anything.

A checkpoint holds the model, the optimizer and state.json (step, config, data position, RNG states, and the
optimizer's settings). Every tensor is stored as safetensors: raw numbers behind a JSON header, so loading a
checkpoint never runs code, whoever wrote it. Without FSDP rank 0 writes model.safetensors (tied weights stored
once, their other names kept in the metadata) and optimizer.safetensors. Under FSDP and HSDP every rank writes its
own shards into dcp/ through torch distributed checkpoint's safetensors writer (HSDP's replicas share the writing:
each shard is written once), which loads them back into any layout: another world size or mesh, or one plain
process with no process group at all.

Every load checks the files against the model before it trusts them: exactly the model's tensors (names, shapes,
dtypes), every shard present, every value finite. Anything else raises CheckpointError naming the file and what
is wrong. Checkpoints from before this format (optimizer.pt, dcp/.metadata) are pickles: they are refused, and
`convert_legacy` rewrites one whose author the user trusts.

Atomicity: everything is written into a hidden temp folder next to the final one, fsynced, and renamed into
place once state.json (written last) is in it; a folder named step_* is therefore always complete, and a crash
at any moment leaves the previous checkpoints untouched. Old checkpoints beyond keep_last are renamed away before
they are deleted, so a half-deleted one never carries a step_* name either.
"""

import json
import math
import os
import random
import re
import shutil
import warnings
from base64 import b64decode, b64encode
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from myna.io import read_json
from myna.train.distributed import Dist, unwrap

MAX_STATE_BYTES = 256 << 20  # state.json: loader positions and RNG states of every rank, a few KB each


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what is wrong."""


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


def remove_leftovers(run_dir: str | Path) -> list[Path]:
    """Delete what a kill during save() left in RUN/checkpoints (a half-written .tmp_step_N, a half-deleted
    .trash_step_N_PID) and return it; call it before training starts, when nothing else writes there."""
    root = Path(run_dir) / "checkpoints"
    leftovers = re.compile(r"^\.(?:tmp_step_\d{8}|trash_step_\d{8}_\d+)$")
    found = [p for p in root.iterdir() if leftovers.match(p.name) and p.is_dir()] if root.is_dir() else []
    for p in found:
        shutil.rmtree(p)
    return found


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
# The flat, tensor-only form both layouts store


def _ties(model: nn.Module) -> dict[str, str]:
    """{other name: first name} of parameters shared under two names (tied embeddings): stored once."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in unwrap(model).named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _flat_optimizer(optim_sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's tensors named PARAM/KEY, and the rest (param groups, non-tensor state) for state.json."""
    tensors, other = {}, {}
    for param, entries in optim_sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param}/{key}"] = value
            else:
                other.setdefault(param, {})[key] = value
    return tensors, {"param_groups": optim_sd["param_groups"], "state": other}


def _nested_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for name, t in tensors.items():
        param, key = name.rsplit("/", 1)
        state.setdefault(param, {})[key] = t
    for param, entries in meta["state"].items():
        state.setdefault(param, {}).update(entries)
    # JSON turned tuples (AdamW's betas) into lists; "params" is the one list
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(path), metadata=metadata)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


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
    aliases = _ties(model)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    model_sd = {k: v for k, v in model_sd.items() if k not in aliases}
    optim_tensors, optim_meta = _flat_optimizer(optim_sd)
    if dist.sharded:
        flat = {f"model.{k}": v for k, v in model_sd.items()} | {
            f"optim.{k}": v for k, v in optim_tensors.items()
        }
        dcp.save(flat, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / "dcp"), save_distributed=True))
    elif dist.is_main:
        _save_safetensors(model_sd, tmp / "model.safetensors", {"aliases": json.dumps(aliases)})
        _save_safetensors(optim_tensors, tmp / "optimizer.safetensors", {})
    dist.barrier()
    if dist.is_main:
        with open(tmp / "state.json", "w", encoding="utf-8") as f:
            json.dump({"step": step, **state, "optimizer": optim_meta}, f)
            f.flush()
            os.fsync(f.fileno())
        if dist.sharded:
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
# Reading: check everything against the model first, then load


def save_weights(run_dir: str | Path, step: int, model: nn.Module, state: dict) -> Path:
    """A checkpoint of the model alone (an imported model has no optimizer state): what `load` reads without an
    optimizer, and what `pretrain --init`, `sft` and `dpo` start from."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(f".tmp_{final.name}")
    tmp.mkdir(parents=True)
    aliases = _ties(model)
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k not in aliases}
    _save_safetensors(weights, tmp / "model.safetensors", {"aliases": json.dumps(aliases)})
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}), encoding="utf-8")
    _fsync_dir(tmp)
    os.rename(tmp, final)
    return final


def read_state(path: str | Path) -> dict:
    """state.json of a checkpoint folder: a JSON object with a non-negative integer step."""
    file = Path(path) / "state.json"
    try:
        state = read_json(file, MAX_STATE_BYTES)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{file}: 'step' must be a non-negative integer, got {step!r}")
    return state


def _refuse_pickles(path: Path, with_optimizer: bool) -> None:
    legacy = path / "dcp" / ".metadata"
    if not legacy.exists() and with_optimizer and not (path / "optimizer.safetensors").exists():
        legacy = path / "optimizer.pt"
    if legacy.exists():
        raise CheckpointError(
            f"{legacy}: a pickle (the checkpoint format before safetensors), and unpickling a file can run any "
            f"code, so Myna never does it on load. If you trust whoever wrote it, convert it once: "
            f"myna checkpoint convert {path} --trust-checkpoint"
        )


Spec = tuple[tuple[int, ...], torch.dtype]


def specs(tensors: dict[str, torch.Tensor]) -> dict[str, Spec]:
    """(shape, dtype) of each tensor: what read_tensors expects to find."""
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}  # a DTensor's shape is the global one


def _check_names(found: dict[str, Spec], expected: dict[str, Spec], where: str) -> None:
    """Exactly the expected tensors, each with the expected shape and dtype; the error names the differences."""

    def some(names) -> str:
        names = sorted(names)
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    problems = []
    if missing := expected.keys() - found.keys():
        problems.append(f"missing {some(missing)}")
    if extra := found.keys() - expected.keys():
        problems.append(f"unexpected {some(extra)}")
    for name in sorted(expected.keys() & found.keys()):
        if found[name] != expected[name]:
            (fs, fd), (es, ed) = found[name], expected[name]
            problems.append(f"{name} is {list(fs)} {fd}, the model needs {list(es)} {ed}")
    if problems:
        raise CheckpointError(f"{where}: does not match the model: " + "; ".join(problems[:6]))


def _check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    bad = [
        name
        for name, t in tensors.items()
        if t.is_floating_point()
        and not bool(torch.isfinite(t.to_local() if isinstance(t, DTensor) else t).all())
    ]
    count = len(bad)
    if torch.distributed.is_initialized():  # a NaN in one rank's shard stops every rank, not just that one
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        flag = torch.tensor([count], device=device)
        torch.distributed.all_reduce(flag)
        count = int(flag.item())
    if count:
        raise CheckpointError(
            f"{where}: NaN or infinite values in {', '.join(bad[:5]) or 'another rank shard'}"
        )


def read_tensors(file: Path, expected: dict[str, Spec]) -> dict[str, torch.Tensor]:
    """A safetensors file holding exactly `expected`, finite; its header is checked before any data is read."""
    try:
        with safe_open(str(file), framework="pt") as f:
            found = {}
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = f.get_slice(name)
                found[name] = (tuple(sl.get_shape()), _DTYPES.get(sl.get_dtype()))
            _check_names(found, expected, str(file))
            tensors = {name: f.get_tensor(name) for name in found}
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; the checkpoint is incomplete") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror or e})") from None
    except SafetensorError as e:
        raise CheckpointError(
            f"{file}: not a complete safetensors file ({e}); it is truncated or damaged"
        ) from None
    _check_finite(tensors, str(file))
    return tensors


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_sharded(path: Path, targets: dict[str, torch.Tensor]) -> None:
    """Fill `targets` (flat names, any layout) from dcp/: the shards' headers are checked against them first."""
    reader = dcp.HuggingFaceStorageReader(str(path))
    try:
        metadata = reader.read_metadata()
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{path}: unreadable shard headers ({e}); a shard is truncated or damaged"
        ) from None
    found = {}
    for name, md in metadata.state_dict_metadata.items():
        chunks = {(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks}
        if sum(math.prod(size) for _, size in chunks) != math.prod(md.size):
            raise CheckpointError(f"{path}: {name} is incomplete; a shard file is missing")
        found[name] = (tuple(md.size), md.properties.dtype)
    # a model-only load (inference) reads the model's tensors and leaves the optimizer's
    sections = {name.split(".", 1)[0] for name in targets}
    wanted = {k: v for k, v in found.items() if k.split(".", 1)[0] in sections}
    _check_names(wanted, specs(targets), str(path))
    with warnings.catch_warnings():  # loading without a process group is intended: one plain process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(targets, storage_reader=reader)
    _check_finite(targets, str(path))


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore model (and optimizer) from the checkpoint folder `path`; returns its state.json.

    Works for any writer/reader pair of layouts: a sharded (FSDP) checkpoint reshards into whatever `model` is,
    a plain one is loaded as full state dicts and sliced by set_state_dict where `model` is sharded.
    """
    path = Path(path)
    state = read_state(path)
    _refuse_pickles(path, optimizer is not None)
    aliases = _ties(model)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)  # fills a fresh optimizer's state to load into
        optim_tensors, _ = _flat_optimizer(optim_sd)
        optim_meta = _optimizer_meta(state, path, optim_sd)
    else:
        model_sd, optim_tensors = get_model_state_dict(model), {}
    model_sd = {k: v for k, v in model_sd.items() if k not in aliases}
    if (path / "dcp").is_dir():
        flat = {f"model.{k}": v for k, v in model_sd.items()} | {
            f"optim.{k}": v for k, v in optim_tensors.items()
        }
        _read_sharded(path / "dcp", flat)
        model_sd = {k: flat[f"model.{k}"] for k in model_sd}
        optim_tensors = {k: flat[f"optim.{k}"] for k in optim_tensors}
        options = StateDictOptions()
    else:
        model_sd = read_tensors(path / "model.safetensors", specs(model_sd))
        if optimizer is not None:
            optim_tensors = read_tensors(path / "optimizer.safetensors", specs(optim_tensors))
        options = StateDictOptions(full_state_dict=True)
    model_sd |= {alias: model_sd[name] for alias, name in aliases.items()}
    set_state_dict(
        model,
        optimizer or [],
        model_state_dict=model_sd,
        optim_state_dict=_nested_optimizer(optim_tensors, optim_meta) if optimizer is not None else {},
        options=options,
    )
    return state


def _optimizer_meta(state: dict, path: Path, fresh: dict) -> dict:
    """state.json's optimizer settings, checked against the optimizer being restored."""
    meta = state.get("optimizer")
    where = f"{path / 'state.json'}: 'optimizer'"
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list):
        raise CheckpointError(f"{where}: missing or not an object with param_groups")
    saved = [g.get("params") if isinstance(g, dict) else None for g in meta["param_groups"]]
    if saved != [g["params"] for g in fresh["param_groups"]]:
        raise CheckpointError(f"{where}: its parameter groups are not this model's")
    for group, expected in zip(meta["param_groups"], fresh["param_groups"], strict=True):
        if group.keys() != expected.keys():
            raise CheckpointError(
                f"{where}: a parameter group has settings {sorted(group)}, not {sorted(expected)}"
            )
    entries = meta.get("state")
    if not isinstance(entries, dict) or not all(
        isinstance(v, dict) and k in fresh["state"] for k, v in entries.items()
    ):
        raise CheckpointError(f"{where}: 'state' must map this model's parameter names to objects")
    return meta


def resume_point(run_dir: str | Path, resume: bool | str) -> Path | None:
    """The checkpoint a run resumes from: none (False), the newest (True), or the named step_N folder."""
    if resume is False:
        return None
    if resume is True:
        return latest(run_dir)
    found = {p.name: p for p in list_checkpoints(run_dir)}
    if resume not in found:
        where = Path(run_dir) / "checkpoints"
        raise CheckpointError(
            f"{where}: no finished checkpoint {resume!r}; found {', '.join(found) or 'none'}"
        )
    return found[resume]


def earlier_hint(run_dir: str | Path, ckpt: Path) -> str:
    """What to do when `ckpt` is damaged: the checkpoint before it, if there is one."""
    older = [p.name for p in list_checkpoints(run_dir) if p.name < ckpt.name]
    if not older:
        return f"{ckpt.name} is the run's only checkpoint: start again with a new --out"
    return f"resume from the checkpoint before it with --resume {older[-1]}"


def convert_legacy(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    """Rewrite a pickled checkpoint (optimizer.pt, or dcp/ with .metadata) as safetensors, atomically, in place.

    This unpickles: call it only for a checkpoint whose author the user trusts (`myna checkpoint convert
    --trust-checkpoint`). `model` and `optimizer` are fresh ones of the run's configuration.
    """
    path = Path(path)
    state = read_state(path)
    step = state["step"]
    if path.name != f"step_{step:08d}":
        raise CheckpointError(f"{path}: its state.json says step {step}; not a step_N folder of it")
    if (path / "dcp" / ".metadata").exists():
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path / "dcp")
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    elif (path / "optimizer.pt").exists():
        load(path, model)
        optim_sd = torch.load(path / "optimizer.pt", weights_only=True)
        set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))
    else:
        raise CheckpointError(f"{path}: holds no pickle (optimizer.pt, dcp/.metadata); nothing to convert")
    state = {k: v for k, v in state.items() if k not in ("step", "optimizer")}
    return save(path.parent.parent, step, model, optimizer, state, Dist(), keep_last=0)
