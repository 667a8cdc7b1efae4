"""Training on real tweets: the tiny preset learns, resume after SIGKILL is exact, a kill during a checkpoint
write never spoils the previous checkpoint, schedules and optimizers behave."""

import json
import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ENV, REPO, metrics
from safetensors import safe_open

from myna.config import TrainConfig
from myna.data.shards import read_shard
from myna.train import checkpoint, host_memory
from myna.train.optim import has_bf16_matmul, lr_at, newton_schulz_dtype, orthogonalize, param_groups
from myna.train.pretrain import pretrain


def unigram_entropy(shard_dir: Path) -> float:
    """Entropy in nats of the token distribution: the loss of the best model that ignores context."""
    counts = sum(np.bincount(read_shard(p), minlength=65536) for p in sorted(shard_dir.glob("*.bin")))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.slow
def test_tiny_learns_well_below_unigram_entropy(sample_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    record = pretrain(sample_data, run, preset="tiny", steps=200)
    entropy = unigram_entropy(sample_data / "shards" / "train")
    assert record["step"] == 200
    assert record["val_loss"] < entropy - 0.6, (record["val_loss"], entropy)
    # bits per byte agree with the loss and the val shards' bytes per token (~1.95 for this tokenizer)
    assert 0.5 < record["val_bpb"] < record["val_loss"] / math.log(2) / 1.5
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 201))
    assert all({"loss", "lr", "tokens_per_s"} <= r.keys() for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [50, 100, 150, 200]
    assert rows[-1]["val_loss"] < rows[49]["val_loss"]
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["vocab_size"] == 512 and config["train"]["steps"] == 200
    # the final checkpoint holds the weights that produced the last evaluation
    assert checkpoint.latest(run).name == "step_00000200"
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain(sample_data, run, preset="tiny", steps=10)
    # resuming the finished run (as a second speedrun does) trains nothing and returns its final record
    assert pretrain(sample_data, run, preset="tiny", steps=200, resume=True) == rows[-1]
    assert len(metrics(run)) == 200


RUN_SCRIPT = """
import sys, time
from myna.train.pretrain import pretrain
data, out, steps, save_every, resume, stall_at = sys.argv[1:7]

def on_step(step, record):
    if step == int(stall_at):  # stand still until the test SIGKILLs us
        print("stalled", flush=True)
        time.sleep(600)

pretrain(data, out, preset="tiny", steps=int(steps), save_every=int(save_every), resume=resume == "1",
         eval_every=5, on_step=on_step)
"""


def run_pretrain(data: Path, out: Path, steps: int, save_every: int, resume: bool = False, stall_at: int = 0):
    args = [data, out, steps, save_every, int(resume), stall_at]
    return subprocess.Popen(
        [sys.executable, "-c", RUN_SCRIPT, *map(str, args)],
        env=ENV,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(sample_data: Path, tmp_path: Path):
    n = 8
    a = run_pretrain(sample_data, tmp_path / "a", steps=2 * n, save_every=n)
    # B checkpoints at step n, runs on to n + 2 (so metrics.jsonl holds steps the resume must redo) and is killed
    b = run_pretrain(sample_data, tmp_path / "b", steps=2 * n, save_every=n, stall_at=n + 2)
    assert b.stdout.readline().strip() == "stalled", b.stderr.read()
    b.send_signal(signal.SIGKILL)
    assert b.wait() == -signal.SIGKILL
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "b")] == [f"step_{n:08d}"]
    assert [r["step"] for r in metrics(tmp_path / "b")] == list(range(1, n + 3))

    resumed = run_pretrain(sample_data, tmp_path / "b", steps=2 * n, save_every=n, resume=True)
    for p in (a, resumed):
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    rows_a, rows_b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["step"] for r in rows_b] == list(range(1, 2 * n + 1))  # no step twice
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert abs(ra["loss"] - rb["loss"]) < 1e-6, (ra, rb)
        assert abs(ra.get("val_loss", 0) - rb.get("val_loss", 0)) < 1e-6, (ra, rb)
    state = checkpoint.read_state(checkpoint.latest(tmp_path / "b"))
    assert state["step"] == 2 * n and state["loader"][0]["seq_len"] == 128


SAVE_LOOP = """
import sys, torch
from torch import nn
from myna.train import checkpoint
from myna.train.distributed import Dist

model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512), nn.Linear(512, 512))
opt = torch.optim.AdamW(model.parameters())
model(torch.ones(1, 512)).sum().backward()
opt.step()
step = int(sys.argv[2])
while True:
    step += 1
    with torch.no_grad():  # everything saved says which step it belongs to
        for p in model.parameters():
            p.fill_(step)
            opt.state[p]["exp_avg"].fill_(-step)
    checkpoint.save(sys.argv[1], step, model, opt, {"marker": step}, Dist(), keep_last=2)
    print(step, flush=True)
"""


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous(tmp_path: Path):
    from torch import nn

    run = tmp_path / "run"
    rng = random.Random(0)
    caught_mid_write = 0
    last_step = 0
    for _ in range(5):
        p = subprocess.Popen(
            [sys.executable, "-c", SAVE_LOOP, str(run), str(last_step)],
            env=ENV,
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        last_step = int(p.stdout.readline())  # at least one checkpoint of this process is complete
        time.sleep(rng.uniform(0.0, 0.3))
        p.send_signal(signal.SIGKILL)
        p.wait()
        caught_mid_write += any(x.name.startswith(".tmp_") for x in (run / "checkpoints").iterdir())
        newest = checkpoint.latest(run)
        step = int(newest.name.removeprefix("step_"))
        assert step >= last_step
        model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512), nn.Linear(512, 512))
        opt = torch.optim.AdamW(model.parameters())
        model(torch.ones(1, 512)).sum().backward()
        opt.step()
        state = checkpoint.load(newest, model, opt)
        assert state["step"] == state["marker"] == step
        for param in model.parameters():
            assert torch.all(param == step)
            assert torch.all(opt.state[param]["exp_avg"] == -step)
        assert len(checkpoint.list_checkpoints(run)) <= 3  # keep_last=2, plus one a kill kept from retiring
        last_step = step
    # the kills must have landed inside a write at least once, or the test proved nothing
    assert caught_mid_write > 0


def test_lr_schedules():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1, decay_ratio=0.2)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    cosine = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(x >= y for x, y in zip(cosine, cosine[1:], strict=False))
    assert cosine[-1] == pytest.approx(0.1)
    wsd = TrainConfig(**{**cfg.__dict__, "schedule": "wsd"})
    assert [lr_at(s, wsd) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_at(80, wsd) < 1.0 and lr_at(99, wsd) == pytest.approx(0.1)


def test_param_groups_skip_decay_on_norms_and_embeddings():
    from myna.config import ModelConfig
    from myna.model import GPT

    model = GPT(ModelConfig(vocab_size=300, n_layer=2, n_embd=64, n_head=2, n_kv_head=1, mlp_hidden=128))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 for p in decay["params"])
    assert "tok_emb.weight" in {names[id(p)] for p in no_decay["params"]}
    assert all("norm" not in names[id(p)] for p in decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()


def test_newton_schulz_orthogonalises():
    g = torch.randn(64, 192, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.min() > 0.5 and s.max() < 1.3  # the quintic iteration's band around 1
    assert torch.linalg.svdvals(orthogonalize(g.T)).max() < 1.3
    # in bf16 (GPUs, and CPUs with bf16 matmuls): the same band, and close to the fp32 result
    half = orthogonalize(g, dtype=torch.bfloat16)
    assert half.dtype == g.dtype
    s = torch.linalg.svdvals(half)
    assert s.min() > 0.5 and s.max() < 1.3
    assert (half - orthogonalize(g)).abs().max() < 0.05


def test_muon_dtype_follows_the_hardware_unless_named():
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if has_bf16_matmul(cpu) else torch.float32
    assert newton_schulz_dtype("auto", cpu) == expected
    assert newton_schulz_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert newton_schulz_dtype("float32", torch.device("cuda")) == torch.float32
    with pytest.raises(ValueError, match="muon_dtype='fp8'"):
        newton_schulz_dtype("fp8", cpu)


# Page faults are measured in a fresh interpreter: what earlier tests left in this process's heap (and the
# threads they started) decides where a block lands, which made in-process counts depend on the test order.
# Blocks come straight from glibc's malloc, so nothing but the allocator decides.
FAULTS = """
import ctypes, json, resource, sys
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

def faults_per_block(mb=48, times=3):
    # a first block, then minor page faults per block of mb MiB written and freed
    # (12,288 pages of 4 KiB when each comes fresh from the kernel)
    counts = []
    for _ in range(times + 1):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(mb << 20)
        libc.memset(block, 1, mb << 20)
        libc.free(block)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sum(counts[1:]) / times
"""


def _fresh(code: str, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", FAULTS + code, *args], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc's malloc only")
def test_training_keeps_the_host_memory_it_frees():
    """Outside host_memory.kept a freed 48 MiB block is unmapped and the next one faulted in again; inside, the
    next one reuses it; afterwards glibc's defaults are back."""
    code = """
from myna.train import host_memory
before = faults_per_block()
with host_memory.kept() as applied:
    inside = faults_per_block()
after = faults_per_block()
with host_memory.kept(enabled=False) as disabled:
    pass
print(json.dumps(dict(before=before, applied=applied, inside=inside, after=after, disabled=disabled)))
"""
    seen = _fresh(code)
    assert seen["before"] > 5000 and seen["after"] > 5000, seen
    assert seen["applied"] and seen["inside"] < 100, seen
    assert not seen["disabled"]


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc's malloc only")
def test_the_training_loop_runs_with_its_host_memory_kept(sample_data: Path, tmp_path: Path):
    code = """
from myna.train.pretrain import pretrain
faults = []
pretrain(sys.argv[1], sys.argv[2], preset="tiny", steps=2, on_step=lambda *_: faults.append(faults_per_block()))
print(json.dumps(dict(faults=faults, after=faults_per_block())))
"""
    seen = _fresh(code, str(sample_data), str(tmp_path / "run"))
    assert len(seen["faults"]) == 2 and max(seen["faults"]) < 100, seen
    assert seen["after"] > 5000, seen


def test_muon_trains_tiny(sample_data: Path, tmp_path: Path):
    record = pretrain(sample_data, tmp_path / "run", preset="tiny", steps=60, optimizer="muon")
    assert record["val_loss"] < unigram_entropy(sample_data / "shards" / "train") - 0.3
    with safe_open(str(checkpoint.latest(tmp_path / "run") / "optimizer.safetensors"), "pt") as f:
        assert any(name.endswith("/momentum_buffer") for name in f.keys())  # noqa: SIM118
