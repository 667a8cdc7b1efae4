"""A run directory as the rest of Myna sees it: config.json, tokenizer.json, checkpoints/step_N.

Every training command (pretrain, sft, dpo) starts one with `start_run`; everything that uses a model (generate,
chat, serve, eval, a later SFT or DPO) loads it through `load_model`, from the run folder (its newest checkpoint) or
from one checkpoint folder inside it.
"""

import json
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from myna.config import ModelConfig, TrainConfig
from myna.io import atomic_path, atomic_write, read_json
from myna.model import GPT
from myna.progress import log
from myna.tokenizer import FORMAT_FILE, Tokenizer
from myna.train import checkpoint
from myna.train.distributed import Dist
from myna.train.optim import build_optimizer


@dataclass
class Loaded:
    model: GPT  # in eval mode, on the requested device
    tokenizer: Tokenizer
    config: ModelConfig
    run_dir: Path
    checkpoint: Path
    step: int


def copy_tokenizer(src: str | Path, run_dir: str | Path) -> None:
    """Put the tokenizer (and an imported model's tokenizer_format.json) beside the checkpoints, so the run is
    usable without the data folder."""
    src, run_dir = Path(src), Path(run_dir)
    for name in ("tokenizer.json", FORMAT_FILE):
        source, dest = src.with_name(name), run_dir / name
        if source.is_file():
            with atomic_path(dest) as tmp:
                shutil.copyfile(source, tmp)
        else:
            dest.unlink(missing_ok=True)


def read_config(run_dir: str | Path) -> dict:
    """RUN/config.json: what was trained and how (written by start_run)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; not a run directory")
    return read_json(path)


def free_memory(device: torch.device) -> int | None:
    """Bytes the device can still allocate (RAM for the CPU); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def check_fits(cfg: ModelConfig, device: str | torch.device) -> None:
    """Refuse, before building anything, a model whose fp32 weights cannot fit in what the device has free."""
    device = torch.device(device)
    need = cfg.weight_bytes()
    free = free_memory(device)
    if free is not None and need > free:
        raise ValueError(
            f"a model of {cfg.num_params():,} parameters ({cfg.n_layer} layers x {cfg.n_embd} wide, context "
            f"{cfg.max_seq_len:,}) needs {need / 2**30:,.1f} GiB; {device} has {free / 2**30:,.1f} GiB free"
        )


def model_config(values: object, where: str) -> ModelConfig:
    """A ModelConfig from a JSON object read from disk; `where` (file and section) prefixes every error."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected an object of model settings")
    known = {f.name for f in fields(ModelConfig)}
    if unknown := sorted(set(values) - known):
        raise ValueError(f"{where}: unknown settings {unknown}; expected some of {sorted(known)}")
    try:
        return ModelConfig(**values)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", where: str = "model") -> GPT:
    """GPT(cfg) on `device`, once its weights are known to fit there (`where` names the config in the error)."""
    try:
        check_fits(cfg, device)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    with torch.device(device):
        return GPT(cfg)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """RUN/metrics.jsonl, one record per logged step. A line that a kill cut short (or any other that does not
    parse as a step's record) is left out with a warning: the run resumes past it and its report still draws."""
    path = Path(run_dir) / "metrics.jsonl"
    records, torn = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif line.strip():
            torn += 1
    if torn:
        log(f"[yellow]{path}: left out {torn} unreadable line(s), cut short by a kill or damaged")
    return records


def resolve(path: str | Path) -> tuple[Path, Path]:
    """(run dir, checkpoint dir) for a run folder (its newest checkpoint) or a step_N folder inside one."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path.parent.parent, path
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: not a run directory (no config.json) nor a checkpoint (no state.json)"
        )
    ckpt = checkpoint.latest(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path}/checkpoints: no finished checkpoint to load")
    return path, ckpt


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """The model and tokenizer of a run (or of one of its checkpoints), ready for inference."""
    run_dir, ckpt = resolve(path)
    cfg = model_config(read_config(run_dir).get("model"), f"{run_dir}/config.json: 'model'")
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path}: the run has no tokenizer")
    tokenizer = Tokenizer.from_file(tok_path)
    if tokenizer.vocab_size > cfg.vocab_size:  # fewer is fine: imported models often pad the embedding
        raise ValueError(f"{tok_path}: vocab {tokenizer.vocab_size} but the model has only {cfg.vocab_size}")
    model = build_model(cfg, device, f"{run_dir}/config.json")
    state = checkpoint.load(ckpt, model)
    return Loaded(model.eval(), tokenizer, cfg, run_dir, ckpt, state["step"])


def convert_checkpoint(path: str | Path) -> Path:
    """`myna checkpoint convert`: a pickled checkpoint of a run rewritten as safetensors (it unpickles: trusted
    checkpoints only). The model and optimizer come from the run's config.json."""
    run_dir, ckpt = resolve(path)
    config = read_config(run_dir)
    cfg = model_config(config.get("model"), f"{run_dir}/config.json: 'model'")
    train = config.get("train", {})
    if not isinstance(train, dict) or set(train) - {f.name for f in fields(TrainConfig)}:
        raise ValueError(f"{run_dir}/config.json: 'train' is not a set of TrainConfig settings")
    model = build_model(cfg, where=f"{run_dir}/config.json")
    return checkpoint.convert_legacy(ckpt, model, build_optimizer(model, TrainConfig(**train)))


def check_run_dir(out: Path, resume: bool, mcfg: ModelConfig) -> None:
    existing = [p for p in ("config.json", "metrics.jsonl", "checkpoints") if (out / p).exists()]
    if existing and not resume:
        raise FileExistsError(
            f"{out}: holds a run already ({', '.join(existing)}); pass --resume or a new --out"
        )
    if resume and (out / "config.json").exists():
        saved = read_config(out).get("model")
        if not isinstance(saved, dict):
            raise ValueError(f"{out}/config.json: no 'model' section")
        if saved != asdict(mcfg):
            diff = {k: (saved.get(k), v) for k, v in asdict(mcfg).items() if saved.get(k) != v}
            raise ValueError(f"{out}/config.json: the run's model differs from this one (saved, now): {diff}")


def start_run(
    out: Path, resume: bool, mcfg: ModelConfig, tcfg: TrainConfig, tok_path: Path, dist: Dist, **info
) -> None:
    """Check OUT, then write OUT/config.json (`info`, parallelism, model, train) and the tokenizer (rank 0).

    Shared by pretrain, sft and dpo: a run directory looks the same whichever command made it.
    """
    check_run_dir(out, resume, mcfg)
    dist.barrier()  # every rank has looked at OUT before rank 0 writes into it
    if dist.device.type == "cpu":
        # bit-exact resume and rank-count invariance on CPU; CUDA keeps its fast nondeterministic kernels
        torch.use_deterministic_algorithms(True)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        config = {
            **info,
            "parallel": dist.parallel,
            "world_size": dist.world_size,
            "model": asdict(mcfg),
            "train": asdict(tcfg),
        }
        with atomic_write(out / "config.json", "w") as f:
            json.dump(config, f, indent=1)
        copy_tokenizer(tok_path, out)
    if resume and checkpoint.latest(out) is None:
        dist.log(f"{out}: no checkpoint to resume from; starting from step 0")
