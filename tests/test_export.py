"""`myna export hf`: transformers loads the folder offline and computes what Myna computes: the same logits
(fp32), the same greedy replies, the same chat-template ids; Llama for runs without QK-norm, Qwen3 with it."""

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from helpers import myna

from myna.config import ModelConfig
from myna.export import export_hf
from myna.infer.engine import Engine, SamplingParams
from myna.model import GPT
from myna.runs import load_model
from myna.template import render, render_prompt, turn_stop_ids
from myna.tokenizer import Tokenizer
from myna.train import checkpoint
from myna.train.distributed import Dist

transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"  # everything is on disk: nothing may be fetched

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there, how are you? 😀"},
    {
        "role": "assistant",
        "content": "fine thanks",
        "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}],
    },
    {"role": "tool", "content": "42"},
    {"role": "user", "content": "what's up at the airport"},
]


def with_shape(run_dir: Path, root: Path, **shape) -> Path:
    """The serving tests' tokenizer with a fresh model of another shape (norm weights moved off 1, so they count)."""
    cfg = ModelConfig(**{**json.loads((run_dir / "config.json").read_text())["model"], **shape})
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": asdict(cfg)}))
    Tokenizer.from_file(run_dir / "tokenizer.json").save(run / "tokenizer.json")
    checkpoint.save(run, 1, model, torch.optim.AdamW(model.parameters()), {}, Dist())
    return run


@pytest.mark.parametrize(
    ("shape", "architecture"),
    [
        ({"qk_norm": False}, "LlamaForCausalLM"),
        ({"qk_norm": True, "tie_embeddings": False}, "Qwen3ForCausalLM"),
    ],
)
def test_transformers_computes_what_myna_computes(
    run_dir: Path, tmp_path: Path, shape: dict, architecture: str
):
    run = with_shape(run_dir, tmp_path, **shape)
    out = export_hf(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == architecture
    loaded = load_model(run)
    idx = torch.randint(0, loaded.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded.model(idx) - hf(idx).logits).abs().max() <= 1e-4


def test_greedy_replies_and_chat_template_ids_match(run_dir: Path, tmp_path: Path):
    out = export_hf(run_dir, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    loaded = load_model(run_dir)
    tok = loaded.tokenizer
    prompt = render_prompt(CHAT, tok).ids
    assert hf_tok.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"] == prompt
    assert hf_tok.apply_chat_template(CHAT)["input_ids"] == render(CHAT, tok).ids

    params = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=turn_stop_ids(tok))
    for messages in (CHAT, CHAT[1:2], [{"role": "user", "content": "my flight got cancelled again"}]):
        ids = render_prompt(messages, tok).ids
        with Engine(loaded.model, tok, max_batch=1) as engine:
            mine = engine.generate(ids, params).token_ids
        theirs = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24)[0, len(ids) :].tolist()
        assert theirs[: len(mine)] == mine  # transformers stops at the same token (generation_config's stops)
        assert len(theirs) == len(mine)


@pytest.mark.slow
def test_cli_exports_and_refuses_a_folder_that_is_no_run(run_dir: Path, tmp_path: Path):
    result = myna("export", "hf", "--ckpt", str(run_dir), "--out", str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    bad = myna("export", "hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "nothing"))
    assert bad.returncode == 1 and "not a run directory" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "nothing").exists()
