"""Run folders and checkpoints a user hands over: nothing is unpickled, every tensor is checked against the
model, a config is bounded before anything is built, and every failure is one line that names the file. A
damaged newest checkpoint stops --resume and names the one to fall back on."""

import json
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import myna
from safetensors.torch import load_file, save_file

from myna.runs import build_model, convert_checkpoint, load_model, read_config, read_metrics
from myna.train import checkpoint
from myna.train.checkpoint import CheckpointError
from myna.train.optim import build_optimizer
from myna.train.pretrain import pretrain


class Payload:
    """Unpickling this creates `marker`: if the file exists, code from the checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def trained(sample_data: Path, tmp_path_factory) -> Path:
    """A tiny pre-training run of its own, apart from the shared base: checkpoints at steps 10 and 20 to damage
    and to resume from."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    pretrain(sample_data, run, preset="tiny", steps=20, save_every=10, eval_every=10, warmup_steps=2)
    return run


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """A copy of the trained run that a test may damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def fresh(run: Path):
    """A new model and optimizer of the run's configuration, as resuming builds them."""
    from myna.config import TrainConfig
    from myna.runs import model_config

    config = read_config(run)
    model = build_model(model_config(config["model"], "config.json"))
    return model, build_optimizer(model, TrainConfig(**config["train"]))


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def newest(run: Path) -> Path:
    return checkpoint.latest(run)


# ---------------------------------------------------------------------------------------------------------------
# Nothing unpickles


def test_pickled_sharded_checkpoint_is_refused_without_running_it(run: Path, tmp_path: Path):
    marker = tmp_path / "code-ran"
    (newest(run) / "dcp").mkdir()
    (newest(run) / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match=r"dcp/\.metadata: a pickle .*--trust-checkpoint"):
        load_model(run)
    err = one_line_error(myna("generate", "--ckpt", str(run), "--prompt", "hi", "--max-tokens", "2"))
    assert "myna checkpoint convert" in err
    assert not marker.exists()


def test_pickled_optimizer_is_refused_on_resume_but_inference_needs_none(run: Path, tmp_path: Path):
    marker = tmp_path / "code-ran"
    (newest(run) / "optimizer.safetensors").unlink()
    with open(newest(run) / "optimizer.pt", "wb") as f:
        pickle.dump(Payload(marker), f)
    model, opt = fresh(run)
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: a pickle"):
        checkpoint.load(newest(run), model, opt)
    assert load_model(run).step == 20  # the weights are safetensors: generate, serve and eval still work
    assert not marker.exists()


def test_checkpoint_holds_no_pickle(trained: Path):
    names = sorted(p.name for p in newest(trained).iterdir())
    assert names == ["model.safetensors", "optimizer.safetensors", "state.json"]


def legacy_plain(run: Path) -> dict:
    """Turn the newest checkpoint into the old format (optimizer.pt); returns the optimizer state it holds."""
    model, opt = fresh(run)
    checkpoint.load(newest(run), model, opt)
    _, optim_sd = checkpoint.get_state_dict(model, opt)
    torch.save(optim_sd, newest(run) / "optimizer.pt")
    (newest(run) / "optimizer.safetensors").unlink()
    return opt.state_dict()


@pytest.mark.slow
def test_convert_rewrites_an_old_plain_checkpoint(run: Path):
    expected = legacy_plain(run)
    one_line_error(myna("checkpoint", "convert", str(run)))  # unpickling needs the user's word
    result = myna("checkpoint", "convert", str(run), "--trust-checkpoint")
    assert result.returncode == 0, result.stderr
    assert not (newest(run) / "optimizer.pt").exists()
    model, opt = fresh(run)
    assert checkpoint.load(newest(run), model, opt)["step"] == 20
    for a, b in zip(opt.state_dict()["state"].values(), expected["state"].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_convert_rewrites_an_old_sharded_checkpoint(run: Path):
    model, opt = fresh(run)
    checkpoint.load(newest(run), model, opt)
    model_sd, optim_sd = checkpoint.get_state_dict(model, opt)
    for name in ("model.safetensors", "optimizer.safetensors"):
        (newest(run) / name).unlink()
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=newest(run) / "dcp")  # the old writer
    convert_checkpoint(newest(run))
    assert not (newest(run) / "dcp" / ".metadata").exists()
    again, opt2 = fresh(run)
    checkpoint.load(newest(run), again, opt2)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    )


# ---------------------------------------------------------------------------------------------------------------
# Every tensor checked


def rewrite(file: Path, edit) -> None:
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"aliases": json.dumps({"lm_head.weight": "tok_emb.weight"})})


def test_missing_block_is_named_by_generate_and_resume(run: Path, sample_data: Path):
    for ckpt in checkpoint.list_checkpoints(run):
        rewrite(
            ckpt / "model.safetensors", lambda t: [t.pop(k) for k in list(t) if k.startswith("blocks.1.")]
        )
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: does not match the model: missing blocks\.1\."
    ):
        load_model(run)
    with pytest.raises(CheckpointError, match="missing blocks.1.") as e:
        pretrain(sample_data, run, preset="tiny", steps=30, save_every=10, eval_every=10, resume=True)
    assert "--resume step_00000010" in str(e.value)  # the checkpoint before the damaged one


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.update(extra=torch.zeros(3)), "unexpected extra"),
        (
            lambda t: t.update({"norm.weight": torch.ones(7)}),
            r"norm\.weight is \[7\] torch\.float32, the model needs \[64\]",
        ),
        (lambda t: t.update({"norm.weight": t["norm.weight"].bfloat16()}), "torch.bfloat16, the model needs"),
        (
            lambda t: t["blocks.0.attn.q.weight"].__setitem__((0, 0), float("nan")),
            r"NaN or infinite values in blocks\.0\.attn\.q\.weight",
        ),
    ],
)
def test_wrong_tensors_are_named(run: Path, edit, message: str):
    rewrite(newest(run) / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(run)


@pytest.mark.slow
def test_damaged_newest_checkpoint_stops_resume_and_the_named_one_resumes(run: Path, sample_data: Path):
    data = (newest(run) / "model.safetensors").read_bytes()
    (newest(run) / "model.safetensors").write_bytes(data[: len(data) // 2])
    err = one_line_error(myna("generate", "--ckpt", str(run), "--prompt", "hi", "--max-tokens", "2"))
    assert "model.safetensors: not a complete safetensors file" in err
    args = ["pretrain", "--data", str(sample_data), "--out", str(run), "--preset", "tiny", "--steps", "30"]
    result = myna(*args, "--resume")
    assert result.returncode == 1 and "not a complete safetensors file" in result.stderr
    assert "--resume step_00000010" in result.stderr and "Traceback" not in result.stderr
    record = pretrain(
        sample_data, run, preset="tiny", steps=30, save_every=10, eval_every=10, resume="step_00000010"
    )
    assert record["step"] == 30
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))  # steps 11-20 redone once, not twice


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"state\.json: not valid JSON"),
        (b'{"step": 20, "rng', r"state\.json: not valid JSON"),
        (b"{}", r"state\.json: 'step' must be a non-negative integer, got None"),
        (b"[1, 2]", r"state\.json: expected a JSON object, got list"),
    ],
)
def test_damaged_state_json_is_named(run: Path, content: bytes, message: str):
    (newest(run) / "state.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_model(newest(run))


def test_empty_weights_file_is_named(run: Path):
    (newest(run) / "model.safetensors").write_bytes(b"")
    err = one_line_error(myna("generate", "--ckpt", str(run), "--prompt", "hi"))
    assert "model.safetensors: not a complete safetensors file" in err


def test_what_a_kill_left_does_not_stop_resume_and_is_cleaned(run: Path, sample_data: Path):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "lo')  # the kill came mid-write
    leftovers = [run / "checkpoints" / name for name in (".tmp_step_00000030", ".trash_step_00000010_4242")]
    for p in [*leftovers, run / "checkpoints" / "notes"]:
        p.mkdir()
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 21))  # the report card draws the rest
    record = pretrain(sample_data, run, preset="tiny", steps=22, save_every=10, eval_every=10, resume=True)
    assert record["step"] == 22
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 23))
    assert not any(p.exists() for p in leftovers) and (run / "checkpoints" / "notes").is_dir()


# ---------------------------------------------------------------------------------------------------------------
# Bounded configs


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_layer": 1_000_000}, r"'model': n_layer=1000000: expected an integer from 1 to 1,024"),
        ({"max_seq_len": 10**9}, r"max_seq_len=1000000000: expected an integer from 1 to 1,048,576"),
        ({"n_layer": -5}, "n_layer=-5: expected an integer"),
        ({"n_embd": "64"}, "n_embd='64': expected an integer"),
        ({"qk_norm": "yes"}, "qk_norm='yes': expected true or false"),
        ({"norm_eps": float("nan")}, "norm_eps=nan: expected a positive finite number"),
        ({"dropout": 0.1}, r"unknown settings \['dropout'\]"),
        (
            {"n_layer": 512, "n_embd": 16384, "n_head": 128, "n_kv_head": 128, "mlp_hidden": 65536},
            r"a model of 2,199,\d{3},\d{3},\d{3} parameters .* needs 8,\d{3}\.\d GiB; cpu has [\d,.]+ GiB free",
        ),
    ],
)
def test_config_is_checked_before_anything_is_built(run: Path, change: dict, message: str):
    config = json.loads((run / "config.json").read_text())
    config["model"].update(change)
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as e:
        load_model(run)
    assert str(e.value).startswith(f"{run}/config.json")


def test_oversized_tokenizer_and_policy_files_are_refused_before_reading(tmp_path: Path):
    from myna.moderation import Policy
    from myna.tokenizer import Tokenizer

    for name in ("tokenizer.json", "policy.json"):
        with open(tmp_path / name, "wb") as f:
            f.truncate(1 << 30)  # sparse: a gigabyte on paper, nothing on disk
    with pytest.raises(ValueError, match=r"tokenizer\.json: 1,073,741,824 bytes, over the"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match=r"policy\.json: 1,073,741,824 bytes, over the"):
        Policy.load(tmp_path / "policy.json")


def test_shards_of_another_vocabulary_are_refused(sample_data: Path, tmp_path: Path):
    from myna.tokenizer import train_tokenizer

    data = Path(shutil.copytree(sample_data, tmp_path / "data"))
    lines = (data / "dialogues.jsonl").read_text(encoding="utf-8").splitlines()[:500]
    train_tokenizer(lines, vocab_size=600).save(data / "tokenizer.json")
    with pytest.raises(
        ValueError, match=r"shards: token shards of a 512-token vocabulary, but .*tokenizer\.json has"
    ):
        pretrain(data, tmp_path / "run", preset="tiny", steps=1)


def test_pretrain_refuses_a_model_the_machine_cannot_hold_before_writing_anything(
    sample_data: Path, tmp_path: Path
):
    with pytest.raises(
        ValueError, match=r"preset '70b': a model of 70,553,706,496 parameters .* needs [\d,.]+ GiB"
    ):
        pretrain(sample_data, tmp_path / "run", preset="70b", steps=1)
    assert not (tmp_path / "run").exists()
