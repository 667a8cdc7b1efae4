"""Fixtures shared by the test modules that need a trained model: a tiny run directory made once per session."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from myna.config import preset
from myna.model import GPT
from myna.template import render
from myna.tokenizer import train_tokenizer
from myna.train import checkpoint
from myna.train.distributed import Dist

TWEETS = Path(__file__).parent / "fixtures" / "tok" / "tweets.txt"


def tiny_run(root: Path) -> Path:
    """A run dir (config.json, tokenizer.json, one checkpoint): the tiny preset trained for 100 steps on pairs of
    real tweets in the chat template, so it writes tweet-like words and ends a reply with <|end|>."""
    run = root / "tiny-run"
    if (run / "checkpoints").is_dir():
        return run
    lines = TWEETS.read_text(encoding="utf-8").splitlines()[:2000]
    tok = train_tokenizer(lines, vocab_size=512)
    pairs = [
        [{"role": "user", "content": a}, {"role": "assistant", "content": b}]
        for a, b in zip(lines[::2], lines[1::2], strict=True)
    ]
    stream = torch.tensor([i for pair in pairs for i in render(pair, tok).ids])
    mcfg, _ = preset("tiny", vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = GPT(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    seq = 64  # shorter windows than the context: cheaper steps that still teach words and turns
    for step in range(100):
        for group in opt.param_groups:
            group["lr"] = 1e-2 * min(1, (step + 1) / 10)
        starts = torch.randint(0, len(stream) - seq - 1, (8,), generator=gen)
        x = torch.stack([stream[s : s + seq] for s in starts])
        y = torch.stack([stream[s + 1 : s + seq + 1] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"preset": "tiny", "model": asdict(mcfg)}))
    tok.save(run / "tokenizer.json")
    checkpoint.save(run, 100, model, opt, {"final_loss": loss.item()}, Dist())
    return run


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    # one thread: on 2 shared cores, two OpenMP threads that spin against other work are 20x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_run(tmp_path_factory.getbasetemp())
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One torch thread for the test: the two cores are shared, and a tiny model gains nothing from a second."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
