"""DPO from the shared SFT run (conftest's sft_run) on pairs of real text: the loss is the hand-computed formula,
the policy comes to prefer the chosen replies on training and held-out pairs, and the reference stays the SFT model.

No bundled preference file has likes enough to train on (the v2 reply trees give a couple of dozen pairs), so the
training pairs are built honestly from real conversations: the prompt is a real airline customer-care dialogue up
to its last customer turn, chosen is the agent's real reply to it, rejected is the real last reply of a casual
Twitter conversation (phylliida) - a real reply, but to something else.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import SAMPLE, airline_dialogues, load_v2_posts, metrics

from myna.data.schema import Reject, posts_to_table
from myna.data.threads import ThreadConfig, build_threads, read_conversations, write_jsonl
from myna.runs import load_model
from myna.train.dpo import dpo, dpo_loss, encode_pair, parse_pair, reply_logprobs
from myna.train.tuning import held_out, opening, read_records

CASUAL = SAMPLE / "conversations" / "phylliida_twconv.conversations.jsonl"
STEPS, BETA, SEQ_LEN = 30, 0.1, 192
DPO_ARGS = {"steps": STEPS, "beta": BETA, "lr": 3e-4, "batch_size": 4, "eval_every": 10, "seq_len": SEQ_LEN}


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    """240 pairs from airline dialogues 400..639 (SFT trained on 0..399) and casual replies; one broken line."""
    airline = airline_dialogues(400, 640)
    casual = [d for d in read_conversations(CASUAL) if not isinstance(d, Reject)]
    pairs = [
        {
            "id": f"pair:{d['id']}",
            "prompt": d["messages"][:-1],
            "chosen": d["messages"][-1]["content"],
            "rejected": c["messages"][-1]["content"],
        }
        for d, c in zip(airline, casual, strict=False)
    ]
    pairs.insert(5, {**pairs[5], "rejected": pairs[5]["chosen"]})  # no preference: rejected
    root = tmp_path_factory.mktemp("prefs")
    write_jsonl(root / "prefs.jsonl", pairs)
    return root


@pytest.fixture(scope="module")
def dpo_run(sft_run: Path, prefs: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("dpo") / "run"
    dpo(sft_run, prefs, run, **DPO_ARGS)
    return run


def test_loss_matches_hand_computation():
    pc, pr = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0])
    rc, rr = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    loss, margin = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # pair 1: 0.5 * ((-10 + 11) - (-12 + 11)) = 1; pair 2: 0.5 * (0 - 1) = -0.5
    assert margin.tolist() == [1.0, -0.5]
    assert loss.tolist() == pytest.approx([1.3132616875 - 1.0, 0.9740769842])  # log(1 + e^-m)
    loss2, margin2 = dpo_loss(pc, pr, rc, rr, beta=1.0)
    assert margin2.tolist() == [2.0, -1.0]
    assert loss2.tolist() == pytest.approx(F.softplus(-torch.tensor([2.0, -1.0])).tolist())


def test_reply_logprobs_sum_the_reply_tokens_only(sft_run: Path):
    loaded = load_model(sft_run)
    tok, model = loaded.tokenizer, loaded.model
    pair = {"prompt": [{"role": "user", "content": "lost my bag"}], "chosen": "So sorry!", "rejected": "lol"}
    (xc, yc), (xr, yr) = encode_pair(pair, tok, 64)[0]
    assert tok.decode(yc[yc >= 0].tolist()) == "So sorry!<|end|>"
    assert tok.decode(yr[yr >= 0].tolist()) == "lol<|end|>"
    assert tok.decode(xc[: (yc < 0).sum()].tolist()) == "<|bos|><|user|>lost my bag<|end|>"
    x, y = torch.from_numpy(xc)[None], torch.from_numpy(yc)[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(x)[0], dim=-1)
        by_hand = sum(float(logp[i, y[0, i]]) for i in range(len(yc)) if y[0, i] >= 0)
        assert float(reply_logprobs(model, x, y)[0]) == pytest.approx(by_hand, abs=1e-4)


def test_policy_learns_the_preference_and_the_reference_stays(dpo_run: Path, sft_run: Path, prefs: Path):
    rows = metrics(dpo_run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the first step
    first = sum(r["reward_margin"] for r in rows[:5]) / 5
    last = sum(r["reward_margin"] for r in rows[-5:]) / 5
    assert last > first + 0.2, (first, last)
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["val_pair_accuracy"] > 0.75 and evals[-1]["val_reward_margin"] > 0
    assert evals[-1]["val_loss"] < 0.6931 - 0.1

    # The reference's held-out log-probs never move and are the SFT model's own, computed here apart.
    assert len({r["val_ref_chosen_logp"] for r in evals}) == 1
    assert evals[-1]["val_chosen_logp"] != evals[-1]["val_ref_chosen_logp"]
    loaded = load_model(sft_run)
    pairs, rejects = read_records(prefs / "prefs.jsonl", parse_pair)
    assert [(r.line, r.reason) for r in rejects] == [(6, "chosen and rejected are the same text")]
    val = [p for p, v in zip(pairs, held_out([opening(p["prompt"]) for p in pairs]), strict=True) if v]
    with torch.no_grad():
        chosen = [encode_pair(p, loaded.tokenizer, SEQ_LEN)[0][0] for p in val]
        sft_logp = [
            float(reply_logprobs(loaded.model, torch.from_numpy(x)[None], torch.from_numpy(y)[None]))
            for x, y in chosen
        ]
    assert sum(sft_logp) / len(sft_logp) == pytest.approx(evals[0]["val_ref_chosen_logp"], abs=1e-3)

    config = json.loads((dpo_run / "config.json").read_text())
    assert config["stage"] == "dpo" and config["beta"] == BETA and config["base"].startswith(str(sft_run))
    assert config["data_stats"]["held_out"] == len(val) and config["data_stats"]["rejected_lines"] == 1
    assert (dpo_run / "tokenizer.json").is_file() and (dpo_run / "rejects.jsonl").is_file()


def test_like_ranked_pairs_from_real_reply_trees_are_valid_records(sft_run: Path, tmp_path: Path):
    tok = load_model(sft_run).tokenizer
    found = build_threads(posts_to_table(load_v2_posts()), ThreadConfig()).prefs
    write_jsonl(tmp_path / "prefs.jsonl", found)
    pairs, rejects = read_records(tmp_path / "prefs.jsonl", parse_pair)
    assert len(pairs) == len(found) > 10 and not rejects
    cut = 0
    for p in pairs:  # a reply longer than half the room keeps its first 128 tokens
        ((xc, yc), (xr, yr)), flags = encode_pair(p, tok, 256)
        assert len(xc) <= 256 and len(xr) <= 256
        assert yc[yc >= 0].tolist() == (tok.encode(p["chosen"]) + [tok.eot_id])[:128]
        assert yr[yr >= 0].tolist() == (tok.encode(p["rejected"]) + [tok.eot_id])[:128]
        cut += flags["reply_cut"]
    assert 0 < cut < len(pairs)  # Italian replies under a 512-token English tokenizer run long
