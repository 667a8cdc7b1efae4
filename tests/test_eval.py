"""`myna eval RUN` on the shared tiny base and an SFT run of it (conftest's eval_runs, trained on a cut of the
bundled sample): eval.json holds every number in a sane range, bits per byte agree with the loss and the val
shard's own bytes, the chat checks run on the SFT's held-out split, TweetEval runs in both modes on capped sets,
and missing data fails clearly."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import metrics

from myna.data.shards import read_shard
from myna.eval.run import SAMPLE_CONVERSATIONS, evaluate_run, format_eval, lineage
from myna.eval.tweeteval import TASKS
from myna.tokenizer import Tokenizer

QUICK = {"chat_max_tokens": 16, "tweeteval_mode": "none"}


@pytest.mark.slow
def test_val_bpb_matches_the_loss_and_the_shards_own_bytes(eval_runs, sft_eval):
    base = evaluate_run(eval_runs["base"], eval_runs["base"] / "eval.json", **QUICK)
    assert json.loads((eval_runs["base"] / "eval.json").read_text()) == json.loads(json.dumps(base))
    v = base["val"]
    # bytes per token counted here, independently, over the targets of the windows the eval read
    tok = Tokenizer.from_file(eval_runs["data"] / "tokenizer.json")
    shard = np.concatenate(
        [read_shard(p) for p in sorted((eval_runs["data"] / "shards" / "val").glob("*.bin"))]
    )
    targets = shard[1 : v["tokens"] + 1]
    nbytes = sum(len(tok.token_bytes[t]) for t in targets.tolist())
    assert v["bpb"] == pytest.approx(v["loss"] / math.log(2) / (nbytes / v["tokens"]), rel=1e-6)
    assert 1.5 < v["bytes_per_token"] < 3.5 and 0.5 < v["bpb"] < 5
    # the training run's last evaluation read a subset of the same windows: close, not equal
    last = [r for r in metrics(eval_runs["base"]) if "val_bpb" in r][-1]
    assert v["bpb"] == pytest.approx(last["val_bpb"], rel=0.1)
    # SFT moved the model, but its val posts are the base's (followed through the "base" link)
    assert sft_eval["val"]["data"] == str(eval_runs["data"]) and sft_eval["val"]["tokens"] == v["tokens"]
    assert base["stage"] == "base" and base["chat"]["note"].startswith("base model")
    assert base["tweeteval"] == {} and base["settings"]["tweeteval_mode"] == "none"


@pytest.mark.slow
def test_chat_checks_on_the_held_out_split(eval_runs, sft_eval):
    chat = sft_eval["chat"]
    assert sft_eval["stage"] == chat["stage"] == "sft" and chat["note"] == ""
    config = json.loads((eval_runs["sft"] / "config.json").read_text())
    assert chat["held_out"] == config["data_stats"]["held_out"]
    # the same split, sequence length and loss as SFT's own evaluation of its final checkpoint
    assert chat["held_out_loss"] == pytest.approx(metrics(eval_runs["sft"])[-1]["val_loss"], rel=1e-4)
    c = chat["compliance"]
    assert c["prompts"] == chat["held_out"] and 0 <= c["closed_with_end"] <= c["prompts"]
    assert 0.0 <= c["rate"] <= 1.0 and 1 <= c["mean_reply_tokens"] <= 16
    assert [s["messages"] for s in chat["samples"]] == SAMPLE_CONVERSATIONS
    assert all(
        s["finish_reason"] in ("stop", "length") and isinstance(s["reply"], str) for s in chat["samples"]
    )
    assert sft_eval["step"] == 30 and sft_eval["checkpoint"].endswith("step_00000030")


@pytest.mark.slow
def test_tweeteval_both_modes_on_capped_sets(sft_eval, eval_runs):
    te = sft_eval["tweeteval"]
    assert set(te) == {"classifier", "lm"}
    for mode, r in te.items():
        assert set(r["scores"]) == {*TASKS, "ALL"}
        assert all(0.0 <= s <= 100.0 for s in r["scores"].values())
        assert r["scores"]["ALL"] == pytest.approx(sum(r["scores"][t] for t in TASKS) / 7)
        # sentiment's train split is a rebuild: the classifier learned from it, zero-shot scoring did not
        assert r["notes"] == ({"sentiment": "approx. train"} if mode == "classifier" else {})
        assert r["test_cap"] == 30
        assert (eval_runs["sft"] / "tweeteval" / mode / "result.json").is_file()
        assert "not comparable" in r["name"]
    assert (
        te["classifier"]["tasks"]["irony"]["train_rows"] == 800
        and te["classifier"]["mode"] == "classifier (probe)"
    )
    assert te["lm"]["mode"] == "lm, 0-shot"
    text = format_eval(sft_eval)
    assert "| SVM |" in text and "(approx. train)" in text and te["lm"]["name"] in text
    lm_row = next(line for line in text.splitlines() if line.startswith(f"| **{te['lm']['name']}"))
    assert "approx. train" not in lm_row
    assert "Sample conversations" in text and "closed with" in text


def test_missing_data_fails_clearly(eval_runs, tmp_path: Path):
    with pytest.raises(ValueError, match="tweeteval_mode='all'"):
        evaluate_run(eval_runs["base"], tmp_path / "e.json", tweeteval_mode="all")
    with pytest.raises(FileNotFoundError, match="no TweetEval data folder"):
        evaluate_run(eval_runs["base"], tmp_path / "e.json", tweeteval=tmp_path / "nope")

    gone = tmp_path / "base"
    shutil.copytree(eval_runs["base"], gone)
    config = json.loads((gone / "config.json").read_text())
    (gone / "config.json").write_text(json.dumps({**config, "data": str(tmp_path / "deleted")}))
    with pytest.raises(FileNotFoundError, match=r"data directory .*deleted is gone \(no .*shards/val\)"):
        evaluate_run(gone, **QUICK)

    orphan = tmp_path / "sft"
    shutil.copytree(eval_runs["sft"], orphan, ignore=shutil.ignore_patterns("eval.json", "tweeteval"))
    config = json.loads((orphan / "config.json").read_text())
    (orphan / "config.json").write_text(
        json.dumps({**config, "base": str(tmp_path / "x" / "checkpoints" / "step_1")})
    )
    with pytest.raises(FileNotFoundError, match=r"sft/config.json: its base run .* is gone"):
        evaluate_run(orphan, **QUICK)
    assert not (orphan / "eval.json").exists() and [d for d, _ in lineage(eval_runs["sft"])] == [
        eval_runs["sft"],
        eval_runs["base"],
    ]
