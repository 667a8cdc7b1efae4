"""`myna generate` and `myna chat` as a user runs them (real subprocesses on the tiny run), and ChatSession's
moderation and context-overflow reporting."""

import json

import pytest
import torch
from helpers import myna

from myna.infer.chat import ChatSession, Turn
from myna.infer.engine import Engine, SamplingParams
from myna.moderation import Policy
from myna.runs import load_model


@pytest.mark.slow
def test_generate_json_cached_equals_uncached_and_seeds_reproduce(run_dir):
    common = ["generate", "--ckpt", str(run_dir), "--prompt", "i love", "--max-tokens", "12", "--json"]
    greedy = myna(*common, "--temperature", "0")
    assert greedy.returncode == 0, greedy.stderr
    cached = json.loads(greedy.stdout)
    uncached = json.loads(myna(*common, "--temperature", "0", "--no-kv-cache").stdout)
    assert cached["text"] == uncached["text"] and cached["kv_cache"] and not uncached["kv_cache"]
    assert cached["prompt_tokens"] >= 2 and 1 <= cached["completion_tokens"] <= 12
    assert cached["finish_reason"] in ("stop", "length") and cached["ttft_s"] > 0
    a, b = (json.loads(myna(*common, "--seed", "7", "--temperature", "1").stdout) for _ in range(2))
    assert a["text"] == b["text"]


@pytest.mark.slow
def test_generate_streams_plain_text_and_reports_a_missing_run(run_dir, tmp_path):
    done = myna("generate", "--ckpt", str(run_dir), "--prompt", "good morning", "--max-tokens", "8", "--chat")
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    missing = myna("generate", "--ckpt", str(tmp_path / "nope"), "--prompt", "x")
    assert missing.returncode != 0 and "not a run directory" in missing.stderr


def test_chat_in_the_terminal_runs_its_commands(run_dir):
    script = (
        "/system you answer in one word\n/temperature 0\nhello there\n/temperature warm\n/reset\nbye\n/quit\n"
    )
    done = myna("chat", "--ckpt", str(run_dir), "--max-tokens", "10", "--policy", "off", stdin=script)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "(system prompt set)" in out and "(temperature 0.0)" in out
    assert "(/temperature expects a number, got 'warm')" in out and "(new conversation)" in out
    assert out.count("myna> ") == 2


@pytest.fixture(scope="module")
def engine(run_dir):
    loaded = load_model(run_dir)
    with Engine(loaded.model, loaded.tokenizer, max_batch=2) as engine:
        yield engine


def test_a_blocked_message_is_never_sent_and_the_user_is_told(engine):
    policy = Policy.from_dict(
        {"extends": "none", "categories": {"spoilers": {"action": "block", "terms": ["ending"]}}}
    )
    session = ChatSession(engine, SamplingParams(max_tokens=5, temperature=0), policy)
    turn = Turn()
    assert list(session.respond("tell me the ending", turn)) == []
    assert turn.finish_reason == "blocked" and "spoilers" in turn.notes[0]
    assert session.messages == []  # nothing was generated or remembered


def test_a_long_conversation_drops_its_oldest_turns_and_says_so(engine):
    session = ChatSession(engine, SamplingParams(max_tokens=8, temperature=0), Policy.off(), system="be kind")
    for i in range(12):
        session.messages += [
            {"role": "user", "content": f"question {i} " * 4},
            {"role": "assistant", "content": f"answer {i} " * 4},
        ]
    turn = Turn()
    text = "".join(session.respond("and now?", turn))
    assert any("oldest" in note and "left out" in note for note in turn.notes), turn.notes
    assert session.messages[-1] == {"role": "assistant", "content": text}


def test_a_reply_that_opens_the_users_turn_ends_there(run_dir):
    # a weak model sometimes skips <|end|> and writes the next "<|user|>" turn itself: a real model whose
    # lm_head is pushed (by a bias) to do exactly that must stop at once, not fill max_tokens with turns
    loaded = load_model(run_dir)
    model, tok = loaded.model, loaded.tokenizer
    head = torch.nn.Linear(model.cfg.n_embd, model.cfg.vocab_size)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tok.special_ids["<|user|>"]] = 1e4
    model.lm_head = head
    with Engine(model, tok, max_batch=1) as engine:
        session = ChatSession(engine, SamplingParams(max_tokens=6, temperature=0), Policy.off())
        turn = Turn()
        assert "".join(session.respond("hello", turn)) == ""
        assert turn.finish_reason == "stop"
