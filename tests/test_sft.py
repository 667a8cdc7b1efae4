"""SFT on real airline customer-care dialogues (data/sample/conversations) from a tiny base pre-trained on real
tweets: only assistant tokens are targets, packed conversations never see each other, held-out assistant loss
falls, resume after SIGKILL is exact, 2 DDP ranks train like one process, bad lines are quarantined."""

import json
import signal
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BAD_LINES, ENV, REPO, SFT_ARGS, airline_dialogues, free_port, metrics

from myna.runs import load_model
from myna.template import render
from myna.train import checkpoint
from myna.train.distributed import Dist
from myna.train.sft import (
    PackedLoader,
    assistant_eval_fn,
    encode_dialogue,
    encode_dialogues,
    fit_turns,
    parse_dialogue,
    sft,
)
from myna.train.tuning import held_out, opening, read_records

STEPS, SAVE_EVERY, STALL_AT = SFT_ARGS["steps"], SFT_ARGS["save_every"], 14


def held_out_loss(run: Path, chat_data: Path, seq_len: int = 128) -> float:
    """Assistant-token loss of `run`'s model on the held-out dialogues, computed apart from the training run."""
    loaded = load_model(run)
    dialogues, _ = read_records(chat_data / "dialogues.jsonl", parse_dialogue)
    val = [
        d for d, v in zip(dialogues, held_out([opening(d["messages"]) for d in dialogues]), strict=True) if v
    ]
    examples, _ = encode_dialogues(val, loaded.tokenizer, seq_len)
    loader = PackedLoader(examples, 8, seq_len, loaded.tokenizer.pad_id, repeat=False)
    return assistant_eval_fn(Dist(), 10**6)(loaded.model, loader, nullcontext)["val_loss"]


def test_held_out_assistant_loss_falls(sft_run: Path, base_run: Path, chat_data: Path):
    before = held_out_loss(base_run, chat_data)
    rows = metrics(sft_run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    evals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(evals) == STEPS // SAVE_EVERY
    after = held_out_loss(sft_run, chat_data)
    assert after == pytest.approx(evals[-1], abs=1e-5)  # the checkpoint is the model that was evaluated
    assert after < before - 0.8, (before, evals)
    config = json.loads((sft_run / "config.json").read_text())
    assert config["stage"] == "sft" and config["base"].startswith(str(base_run))
    assert config["train"]["lr"] == 2e-3 and config["train"]["weight_decay"] == 0.0
    stats = config["data_stats"]
    assert stats["dialogues"] == 400 and stats["rejected_lines"] == len(BAD_LINES)
    assert stats["train"] + stats["held_out"] == 400 and 8 <= stats["held_out"] <= 40
    assert stats["truncated_turns_dropped"] > 0  # long airline threads at seq_len 128
    assert (sft_run / "tokenizer.json").read_bytes() == (base_run / "tokenizer.json").read_bytes()


def test_bad_lines_are_quarantined_with_file_and_line(sft_run: Path, chat_data: Path, tmp_path: Path):
    rejects = [json.loads(line) for line in (sft_run / "rejects.jsonl").read_text().splitlines()]
    path = str(chat_data / "dialogues.jsonl")
    assert [(r["file"], r["line"]) for r in rejects] == [(path, n) for n in range(11, 15)]
    reasons = [r["reason"] for r in rejects]
    assert "unexpected character" in reasons[0]
    assert reasons[1].startswith("messages[0].role: expected one of")
    assert reasons[2] == "messages: no assistant message, so nothing to learn"
    assert reasons[3].startswith("messages: expected a non-empty list")
    assert rejects[1]["snippet"] == BAD_LINES[1]

    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text("\n".join(BAD_LINES) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: no usable dialogue \(4 lines rejected; first: .*:1:"):
        sft(sft_run, only_bad, tmp_path / "out")


def test_targets_are_assistant_output_only(base_run: Path):
    tok = load_model(base_run).tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "my bag is lost"},
        {"role": "assistant", "content": "Sorry! DM us the file number."},
        {"role": "user", "content": "done"},
        {"role": "assistant", "content": "Thanks, found it."},
    ]
    x, y, status = encode_dialogue(messages, tok, 128)
    assert status == "kept" and len(x) == len(y)
    reply1, reply2 = tok.encode("Sorry! DM us the file number."), tok.encode("Thanks, found it.")
    assert y[y >= 0].tolist() == [*reply1, tok.eot_id, *reply2, tok.eot_id]
    # each target is the token that follows its input position, and it follows an assistant opener or text
    ids = np.append(x, y[-1])
    assert np.array_equal(y[y >= 0], ids[1:][y >= 0])
    first = int(np.argmax(y >= 0))
    assert x[first] == tok.special_ids["<|assistant|>"]
    assert tok.decode(x[: first + 1].tolist()).count("my bag is lost") == 1  # context, not target


def test_truncation_keeps_newest_turns_and_the_system_prompt(base_run: Path):
    tok = load_model(base_run).tokenizer
    turns = [{"role": "system", "content": "Be kind."}] + [
        {"role": "user" if k % 2 == 0 else "assistant", "content": f"turn number {k}, ok?"} for k in range(10)
    ]
    full_x, _, _ = encode_dialogue(turns, tok, 1000)
    x, y, status = encode_dialogue(turns, tok, 60)
    assert status == "dropped" and 40 < len(x) <= 60 < len(full_x)
    text = tok.decode(x.tolist())
    assert text.startswith("<|bos|><|system|>Be kind.<|end|>")
    assert "turn number 9" in text and "turn number 0" not in text
    assert text.endswith("turn number 9, ok?")  # the target <|end|> is y's last token
    assert y[-1] == tok.eot_id
    last = render(turns[-1:], tok)
    ids, learn, status = fit_turns(last, 8)
    assert status == "cut" and ids == last.ids[:8] and learn == last.targets[:8]


def test_packed_conversations_do_not_see_each_other(sft_run: Path, chat_data: Path):
    loaded = load_model(sft_run)
    tok, model = loaded.tokenizer, loaded.model
    a, b = airline_dialogues(0, 2)
    ex = [encode_dialogue(d["messages"], tok, 60)[:2] for d in (a, b)]
    assert len(ex[0][0]) + len(ex[1][0]) <= 128
    x, y, doc = next(PackedLoader(ex, 1, 128, tok.pad_id))
    la, lb = len(ex[0][0]), len(ex[1][0])
    assert doc[0, :la].eq(0).all() and doc[0, la : la + lb].eq(1).all() and doc[0, la + lb :].eq(2).all()
    assert y[0, la + lb :].eq(-1).all() and x[0, la + lb :].eq(tok.pad_id).all()
    with torch.no_grad():
        packed = model(x, doc_ids=doc)
        alone = model(torch.from_numpy(ex[1][0])[None])
        unmasked = model(x)
    assert torch.allclose(packed[0, la : la + lb], alone[0], atol=1e-5)
    assert not torch.allclose(unmasked[0, la : la + lb], alone[0], atol=1e-3)  # the mask is what isolates


RUN_SCRIPT = """
import sys, time
from myna.train.sft import sft
base, data, out, stall_at = sys.argv[1:5]

def on_step(step, record):
    if step == int(stall_at):
        print("stalled", flush=True)
        time.sleep(600)

sft(base, data, out, on_step=on_step, **{args})
"""


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(sft_run: Path, base_run: Path, chat_data: Path, tmp_path: Path):
    run = tmp_path / "run"
    script = RUN_SCRIPT.format(args=repr(SFT_ARGS))
    p = subprocess.Popen(
        [sys.executable, "-c", script, str(base_run), str(chat_data), str(run), str(STALL_AT)],
        env=ENV,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "stalled", p.stderr.read()
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    assert [c.name for c in checkpoint.list_checkpoints(run)] == [f"step_{SAVE_EVERY:08d}"]
    sft(base_run, chat_data, run, resume=True, **SFT_ARGS)
    a, b = metrics(sft_run), metrics(run)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["loss"] - rb["loss"]) < 1e-6, (ra, rb)
        assert abs(ra.get("val_loss", 0) - rb.get("val_loss", 0)) < 1e-6, (ra, rb)
    state = checkpoint.read_state(checkpoint.latest(run))
    assert state["stage"] == "sft" and state["loader"][0]["epoch"] >= 1  # the stream wrapped into epoch 2


DDP_SCRIPT = """
import torch
import sys
from myna.train.sft import sft
torch.set_num_threads(1)
sft(sys.argv[1], sys.argv[2], sys.argv[3], parallel="ddp", **{args})
"""
DDP_ARGS = {"steps": 6, "batch_size": 4, "lr": 2e-3, "eval_every": 3, "eval_batches": 1}


@pytest.mark.slow
def test_two_ddp_ranks_match_one_process(base_run: Path, chat_data: Path, tmp_path: Path):
    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT.format(args=repr(DDP_ARGS)))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
    ]
    cmd += [
        "--master-port",
        str(free_port()),
        str(script),
        str(base_run),
        str(chat_data),
        str(tmp_path / "ddp"),
    ]
    p = subprocess.Popen(
        cmd,
        env={**ENV, "GLOO_SOCKET_IFNAME": "lo"},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sft(base_run, chat_data, tmp_path / "single", **{**DDP_ARGS, "batch_size": 8})
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, f"{out}\n{err}"
    single, ddp = metrics(tmp_path / "single"), metrics(tmp_path / "ddp")
    assert len(single) == len(ddp) == 6
    for a, b in zip(single, ddp, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
        assert abs(a.get("val_loss", 0) - b.get("val_loss", 0)) < 1e-4, (a, b)
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2


def test_a_json_array_of_dialogues_is_read_as_records(tmp_path: Path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "dialogues.json"
    path.write_text(
        json.dumps([good, json.loads(BAD_LINES[1]), good], indent=2)
    )  # pretty: one record, many lines
    kept, rejects = read_records(path, parse_dialogue)
    assert [d["where"] for d in kept] == [f"{path}:1", f"{path}:3"]
    assert [(r.line, r.reason.split(":")[0]) for r in rejects] == [(2, "messages[0].role")]
