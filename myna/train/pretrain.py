"""`myna pretrain`: a data directory from `myna data prepare` -> a trained GPT in a run directory.

RUN/config.json (what was trained, how), RUN/metrics.jsonl (one record per logged step), RUN/checkpoints/.
Run under torchrun for several processes; every rank calls pretrain() with the same arguments.
"""

from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Literal

import torch

from myna.config import ModelConfig, TrainConfig
from myna.config import preset as get_preset
from myna.data.loader import TokenLoader
from myna.runs import build_model, model_config, read_config, resolve, start_run
from myna.tokenizer import Tokenizer
from myna.train import checkpoint, distributed
from myna.train.loop import train


def apply_overrides(mcfg: ModelConfig, tcfg: TrainConfig, overrides: dict) -> tuple[ModelConfig, TrainConfig]:
    """The configs with `overrides` (ModelConfig or TrainConfig field names, vocab_size excepted) applied."""
    model_keys = {f.name for f in fields(ModelConfig)} - {"vocab_size"}
    train_keys = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - model_keys - train_keys
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}: expected TrainConfig or ModelConfig fields")
    mcfg = replace(mcfg, **{k: v for k, v in overrides.items() if k in model_keys})
    tcfg = replace(tcfg, **{k: v for k, v in overrides.items() if k in train_keys})
    if tcfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"seq_len={tcfg.seq_len} exceeds the model's max_seq_len={mcfg.max_seq_len}")
    return mcfg, tcfg


def _init_settings(
    init: str | Path, tok: Tokenizer, data_dir: Path
) -> tuple[Path, Path, ModelConfig, TrainConfig]:
    """The run `init`'s directory, checkpoint, model and training settings; its tokenizer must be the data's."""
    run_dir, ckpt = resolve(init)
    config = read_config(run_dir)
    mcfg = model_config(config.get("model"), f"{run_dir}/config.json: 'model'")
    train = config.get("train")
    if not isinstance(train, dict) or set(train) - {f.name for f in fields(TrainConfig)}:
        raise ValueError(f"{run_dir}/config.json: 'train' is not a set of TrainConfig settings")
    tcfg = TrainConfig(**{**train, "betas": tuple(train.get("betas", (0.9, 0.95)))})
    own = Tokenizer.from_file(run_dir / "tokenizer.json")
    if own.hf.to_str() != tok.hf.to_str() or own.format != tok.format:
        raise ValueError(
            f"{data_dir}/tokenizer.json is not {run_dir}'s tokenizer; prepare the data with it: "
            f"myna data prepare INPUT --out {data_dir} --tokenizer-from {run_dir}"
        )
    return run_dir, ckpt, mcfg, tcfg


def pretrain(
    data_dir: str | Path,  # data directory from `myna data prepare`
    out: str | Path,  # run directory: config, metrics.jsonl, checkpoints
    preset: str = "cpu",  # model size: tiny, cpu, 124m, 350m, 1b, 8b, 70b
    init: str | None = None,  # continue a run's model (e.g. from `myna import`) instead of a fresh preset
    steps: int | None = None,  # optimizer steps (default: the preset's)
    save_every: int | None = None,  # checkpoint every N steps (default: the preset's)
    resume: bool | str = False,  # continue from the newest checkpoint in out, or from the one named (step_N)
    parallel: Literal["none", "ddp", "fsdp", "hsdp"] = "none",  # data parallelism (run under torchrun)
    shard_size: int = 0,  # hsdp: ranks per shard group, replicated across groups (default: one node's ranks)
    compile: bool = False,  # torch.compile the model
    activation_checkpointing: bool = False,  # recompute each block's activations in backward: less memory
    on_step=None,
    final_checkpoint: bool = True,
    **overrides,
) -> dict:
    """Train the preset's model on DIR/shards/{train,val} with DIR/tokenizer.json; returns the last metrics.

    `overrides` set TrainConfig or ModelConfig fields by name (e.g. batch_size=4, n_layer=2). With resume=True
    the newest checkpoint in OUT/checkpoints is continued (a fresh start when there is none), with
    resume="step_N" that one; without it an existing run in OUT is an error. `on_step(step, record)` is called
    after every optimizer step; final_checkpoint=False skips the checkpoint after the last step (benchmarks).
    """
    data_dir, out = Path(data_dir), Path(out)
    tok_path = data_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path}: no tokenizer; run `myna data prepare --out {data_dir}` first")
    for split in ("train", "val"):
        if not (data_dir / "shards" / split).is_dir():
            raise FileNotFoundError(f"{data_dir}/shards/{split}: no token shards; run `myna data prepare`")
    tok = Tokenizer.from_file(tok_path)
    if init is None:
        mcfg, tcfg = get_preset(preset, vocab_size=tok.vocab_size)
    else:
        init_run, init_ckpt, mcfg, tcfg = _init_settings(init, tok, data_dir)
        if shape := sorted(set(overrides) & ({f.name for f in fields(ModelConfig)} - {"max_seq_len"})):
            raise ValueError(f"{shape}: the model is {init_run}'s; its shape cannot change")
        preset = f"init:{init_run}"
    if steps is not None:
        overrides["steps"] = steps
    if save_every is not None:
        overrides["save_every"] = save_every
    flags = {
        "compile": compile or tcfg.compile,
        "activation_checkpointing": activation_checkpointing or tcfg.activation_checkpointing,
    }
    mcfg, tcfg = apply_overrides(mcfg, tcfg, {**overrides, **flags})

    dist = distributed.setup(parallel, shard_size)
    try:
        torch.manual_seed(tcfg.seed)
        model = build_model(mcfg, dist.device, f"preset {preset!r}")  # refused before OUT is touched
        if init is not None:  # a resumed run then loads its own newest checkpoint over these weights
            checkpoint.load(init_ckpt, model)
        start_run(out, resume, mcfg, tcfg, tok_path, dist, preset=preset, data=str(data_dir))
        dist.log(
            f"model: {preset}, {model.num_params() / 1e6:.2f}M parameters; {tcfg.steps} steps of "
            f"{tcfg.tokens_per_step * dist.world_size:,} tokens; parallel={parallel} x {dist.world_size}"
        )
        shards = data_dir / "shards"
        # shuffled windows: the corpus is ordered by source file, and training must not see one source at a time
        train_loader = TokenLoader(
            shards / "train",
            tcfg.batch_size,
            tcfg.seq_len,
            dist.rank,
            dist.world_size,
            dist.device,
            tcfg.seed,
        )
        val_loader = TokenLoader(
            shards / "val", tcfg.batch_size, tcfg.seq_len, dist.rank, dist.world_size, dist.device
        )
        if train_loader.vocab_size != tok.vocab_size:
            raise ValueError(
                f"{shards}: token shards of a {train_loader.vocab_size}-token vocabulary, but {tok_path} has "
                f"{tok.vocab_size}; run `myna data tokenize --out {data_dir}` again"
            )
        bytes_per_token = torch.tensor([len(b) for b in tok.token_bytes], dtype=torch.int64)
        record = train(
            model,
            tcfg,
            train_loader,
            val_loader,
            out,
            dist=dist,
            bytes_per_token=bytes_per_token,
            on_step=on_step,
            resume=resume,
            extra_state={"model_config": asdict(mcfg), "preset": preset},
            final_checkpoint=final_checkpoint,
        )
        dist.log(f"[green]pretrain finished: step {record.get('step')}, val loss {record.get('val_loss')}")
        return record
    finally:
        distributed.teardown(dist)
