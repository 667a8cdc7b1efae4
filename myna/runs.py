"""A run directory as the rest of Myna sees it: config.json, tokenizer.json, checkpoints/step_N.

Every training command (pretrain, sft, dpo) writes one; everything that uses a model (generate, chat, serve,
eval, a later SFT or DPO) loads it through `load_model`, from the run folder (its newest checkpoint) or from one
checkpoint folder inside it.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from myna.config import ModelConfig
from myna.io import atomic_path
from myna.model import GPT
from myna.tokenizer import Tokenizer
from myna.train import checkpoint


@dataclass
class Loaded:
    model: GPT  # in eval mode, on the requested device
    tokenizer: Tokenizer
    config: ModelConfig
    run_dir: Path
    checkpoint: Path
    step: int


def copy_tokenizer(src: str | Path, run_dir: str | Path) -> None:
    """Put the tokenizer beside the checkpoints, so the run is usable without the data folder."""
    dest = Path(run_dir) / "tokenizer.json"
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def read_config(run_dir: str | Path) -> dict:
    """RUN/config.json: what was trained and how (written by train.pretrain.start_run)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; not a run directory")
    return json.loads(path.read_text(encoding="utf-8"))


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
    model_cfg = read_config(run_dir).get("model")
    if not isinstance(model_cfg, dict):
        raise ValueError(f"{run_dir}/config.json: no 'model' section")
    cfg = ModelConfig(**model_cfg)
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path}: the run has no tokenizer")
    tokenizer = Tokenizer.from_file(tok_path)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"{tok_path}: vocab {tokenizer.vocab_size} but the model has {cfg.vocab_size}")
    with torch.device(device):
        model = GPT(cfg)
    state = checkpoint.load(ckpt, model)
    return Loaded(model.eval(), tokenizer, cfg, run_dir, ckpt, state["step"])
