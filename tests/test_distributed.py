"""DDP and FSDP over 2 processes (torchrun, gloo, loopback only) train like one process with the same global
batch, and a sharded FSDP checkpoint loads into a plain model in a process with no process group."""

import json
import os
import shutil
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from helpers import ENV, REPO, free_port, metrics

from myna.config import preset
from myna.data.loader import TokenLoader
from myna.model import GPT
from myna.train import checkpoint
from myna.train.distributed import Dist
from myna.train.loop import evaluate
from myna.train.optim import build_optimizer
from myna.train.pretrain import pretrain

pytestmark = pytest.mark.slow  # every test reads the three runs the module fixture trains

STEPS, GLOBAL_BATCH = 10, 8


SCRIPT = """
import sys
from myna.train.pretrain import pretrain
data, out, parallel = sys.argv[1:4]
pretrain(data, out, preset="tiny", steps={steps}, batch_size={batch}, eval_every=5, warmup_steps=2,
         parallel=parallel)
"""


@pytest.fixture(scope="module")
def runs(sample_data: Path, tmp_path_factory) -> dict[str, Path]:
    """The same 10 steps three ways: one process with batch 8, and DDP and FSDP with 2 ranks of batch 4."""
    root = tmp_path_factory.mktemp("dist")
    script = root / "run.py"
    script.write_text(SCRIPT.format(steps=STEPS, batch=GLOBAL_BATCH // 2))
    env = {**ENV, "GLOO_SOCKET_IFNAME": "lo"}
    procs = {
        parallel: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "2",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                str(script),
                str(sample_data),
                str(root / parallel),
                parallel,
            ],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for parallel, port in (("ddp", free_port()), ("fsdp", free_port()))
    }
    pretrain(
        sample_data,
        root / "single",
        preset="tiny",
        steps=STEPS,
        batch_size=GLOBAL_BATCH,
        eval_every=5,
        warmup_steps=2,
    )
    for parallel, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"{parallel}:\n{out}\n{err}"
    return {name: root / name for name in ("single", "ddp", "fsdp")}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(runs: dict[str, Path], parallel: str):
    single, multi = metrics(runs["single"]), metrics(runs[parallel])
    assert [r["step"] for r in multi] == list(range(1, STEPS + 1))
    for a, b in zip(single, multi, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
    for step in (4, 9):  # eval steps 5 and 10
        assert abs(single[step]["val_loss"] - multi[step]["val_loss"]) < 1e-4
    config = json.loads((runs[parallel] / "config.json").read_text())
    assert config["world_size"] == 2 and config["parallel"] == parallel
    assert single[-1]["loss"] < single[0]["loss"] - 0.5  # it trained


def test_fsdp_checkpoint_loads_in_one_plain_process(runs: dict[str, Path], sample_data: Path):
    ckpt = checkpoint.latest(runs["fsdp"])
    assert (ckpt / "dcp").is_dir() and not (ckpt / "model.safetensors").exists()  # really sharded
    assert sorted(p.suffix for p in (ckpt / "dcp").iterdir()) == [".safetensors"] * 2  # one a rank, no pickle
    state = checkpoint.read_state(ckpt)
    assert state["step"] == STEPS and len(state["loader"]) == 2 and len(state["rng"]) == 2

    mcfg, tcfg = preset("tiny", vocab_size=512)
    model = GPT(mcfg)
    opt = build_optimizer(model, tcfg)
    assert not torch.distributed.is_initialized()
    checkpoint.load(ckpt, model, opt)
    assert all(float(s["step"]) == STEPS for s in opt.state.values())
    # the loaded weights reproduce the FSDP run's final evaluation on the same val batches
    val = TokenLoader(sample_data / "shards" / "val", GLOBAL_BATCH, tcfg.seq_len)
    val_loss, _ = evaluate(model, val, tcfg.eval_batches, None, Dist(), nullcontext)
    assert abs(val_loss - metrics(runs["fsdp"])[-1]["val_loss"]) < 1e-5


def test_fsdp_run_resumes_in_one_process(runs: dict[str, Path], sample_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(runs["fsdp"], run)
    pretrain(
        sample_data,
        run,
        preset="tiny",
        steps=STEPS + 2,
        batch_size=GLOBAL_BATCH,
        eval_every=5,
        warmup_steps=2,
        resume=True,
    )
    assert [r["step"] for r in metrics(run)] == list(range(1, STEPS + 3))
    assert (checkpoint.latest(run) / "model.safetensors").exists()
    assert os.path.isdir(run / "checkpoints" / f"step_{STEPS:08d}" / "dcp")


def test_fsdp_checkpoint_with_a_missing_or_damaged_shard_is_refused(runs: dict[str, Path], tmp_path: Path):
    ckpt = Path(shutil.copytree(checkpoint.latest(runs["fsdp"]), tmp_path / "step"))
    first, second = sorted((ckpt / "dcp").iterdir())
    intact = second.read_bytes()
    model = GPT(preset("tiny", vocab_size=512)[0])
    second.write_bytes(intact[:-100])
    with pytest.raises(checkpoint.CheckpointError, match="unreadable shard headers"):
        checkpoint.load(ckpt, model)
    second.unlink()  # rank 1's half of every tensor is gone
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"dcp: does not match the model: model\.blocks\.0\.attn\.k\.weight is \[16, 64\] torch\.float32, "
        r"the model needs \[32, 64\]",
    ):
        checkpoint.load(ckpt, model)
    second.write_bytes(intact)
    first.unlink()  # rank 0's half: the full shapes are still known, half of every tensor is not
    with pytest.raises(checkpoint.CheckpointError, match="is incomplete; a shard file is missing"):
        checkpoint.load(ckpt, model)
