"""Training on many nodes, rehearsed on one CPU: HSDP over 4 processes (torchrun, gloo, loopback only) on a 2 x 2
(replicate, shard) mesh with activation checkpointing trains like one process, and its checkpoint loads in one
plain process; activation checkpointing alone gives the same loss and gradients with a lower peak memory."""

import json
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
from myna.train.distributed import Dist, setup
from myna.train.loop import evaluate
from myna.train.pretrain import pretrain

STEPS, GLOBAL_BATCH = 6, 8
SETTINGS = {"preset": "tiny", "steps": STEPS, "eval_every": 3, "warmup_steps": 2}

HSDP = """
import sys
from myna.train.pretrain import pretrain
pretrain(sys.argv[1], sys.argv[2], parallel="hsdp", shard_size=2, activation_checkpointing=True, batch_size={batch},
         **{settings})
"""

# One training step of an 8-layer model on 4 x 256 tokens, with or without activation checkpointing. The peak is
# the growth of the resident set (VmHWM over VmRSS, the peak reset first); with glibc's mmap threshold pinned low,
# every tensor is its own mapping and returns to the system when freed, so the resident set follows the live
# tensors (the default threshold rises after the first frees and lets malloc keep freed memory).
MEMORY = """
import json, sys, torch
from myna.config import ModelConfig
from myna.model import GPT
from myna.train.distributed import Dist, wrap

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) * 1024

torch.manual_seed(0)
cfg = ModelConfig(vocab_size=256, n_layer=8, n_head=4, n_kv_head=4, n_embd=256, mlp_hidden=768, max_seq_len=256)
model = wrap(GPT(cfg), Dist(), checkpoint_blocks=sys.argv[1] == "on")
tokens = torch.randint(0, cfg.vocab_size, (4, 257))
# a warm-up step on a few tokens first, so that the code it runs is paged in before the measured one
_, loss = model(tokens[:1, :8], tokens[:1, 1:9])
loss.backward()
model.zero_grad()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
_, loss = model(tokens[:, :-1], tokens[:, 1:])
loss.backward()
grads = torch.cat([p.grad.flatten() for p in model.parameters()])
print(json.dumps({"loss": loss.item(), "grad_norm": grads.norm().item(), "peak": status("VmHWM") - before}))
"""


@pytest.fixture(scope="module")
def runs(sample_data: Path, tmp_path_factory) -> dict[str, Path]:
    """The same steps twice: one process with batch 8, and HSDP with 4 ranks of batch 2 (2 shard groups of 2)."""
    root = tmp_path_factory.mktemp("hsdp")
    script = root / "run.py"
    script.write_text(HSDP.format(batch=GLOBAL_BATCH // 4, settings=SETTINGS))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4"]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    proc = subprocess.Popen(
        [*command, str(script), str(sample_data), str(root / "hsdp")],
        env={**ENV, "GLOO_SOCKET_IFNAME": "lo"},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pretrain(sample_data, root / "single", batch_size=GLOBAL_BATCH, **SETTINGS)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{out}\n{err}"
    return {"single": root / "single", "hsdp": root / "hsdp"}


@pytest.mark.slow
def test_hsdp_on_a_2x2_mesh_matches_one_process(runs: dict[str, Path]):
    single, hsdp = metrics(runs["single"]), metrics(runs["hsdp"])
    assert [r["step"] for r in hsdp] == list(range(1, STEPS + 1))
    for a, b in zip(single, hsdp, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
    for step in (2, 5):  # eval steps 3 and 6
        assert abs(single[step]["val_loss"] - hsdp[step]["val_loss"]) < 1e-4
    config = json.loads((runs["hsdp"] / "config.json").read_text())
    assert config["world_size"] == 4 and config["parallel"] == "hsdp"
    assert config["train"]["activation_checkpointing"]


@pytest.mark.slow
def test_hsdp_checkpoint_loads_in_one_plain_process(runs: dict[str, Path], sample_data: Path):
    ckpt = checkpoint.latest(runs["hsdp"])
    assert not (ckpt / "model.safetensors").exists()
    assert sorted(p.suffix for p in (ckpt / "dcp").iterdir()) == [".safetensors"] * 4  # one a rank, no pickle
    mcfg, tcfg = preset("tiny", vocab_size=512)
    model = GPT(mcfg)
    assert not torch.distributed.is_initialized()
    assert checkpoint.load(ckpt, model)["step"] == STEPS
    # the loaded weights reproduce the HSDP run's final evaluation on the same val batches
    val = TokenLoader(sample_data / "shards" / "val", GLOBAL_BATCH, tcfg.seq_len)
    val_loss, _ = evaluate(model, val, tcfg.eval_batches, None, Dist(), nullcontext)
    assert abs(val_loss - metrics(runs["hsdp"])[-1]["val_loss"]) < 1e-5


@pytest.mark.parametrize(
    ("parallel", "shard_size", "world_size", "error"),
    [
        ("hsdp", 3, "4", "hsdp needs a positive divisor of WORLD_SIZE=4"),
        ("hsdp", -1, "4", "hsdp needs a positive divisor"),
        ("fsdp", 2, "4", "applies to --parallel hsdp only"),
        ("none", 0, "4", "needs --parallel ddp, fsdp or hsdp"),
    ],
)
def test_bad_layouts_are_refused(parallel, shard_size, world_size, error, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", world_size)
    with pytest.raises(ValueError, match=error):
        setup(parallel, shard_size)


@pytest.mark.slow
def test_activation_checkpointing_same_loss_less_memory():
    env = {**ENV, "MALLOC_MMAP_THRESHOLD_": "65536"}
    procs = {
        mode: subprocess.Popen(
            [sys.executable, "-c", MEMORY, mode], env=env, stdout=subprocess.PIPE, text=True
        )
        for mode in ("off", "on")
    }
    off, on = (json.loads(procs[mode].communicate(timeout=120)[0]) for mode in ("off", "on"))
    assert abs(on["loss"] - off["loss"]) < 1e-6
    assert abs(on["grad_norm"] - off["grad_norm"]) < 1e-5 * off["grad_norm"]
    print(
        f"peak memory of one step: {off['peak'] / 2**20:.1f} MiB, checkpointed {on['peak'] / 2**20:.1f} MiB"
    )
    assert on["peak"] < 0.6 * off["peak"], (off, on)
