"""`myna import hf|gguf`: an open model as a run. A random tiny LlamaForCausalLM (and Qwen3) made with transformers
imports to the same logits, its ChatML template renders the ids transformers renders, and every verb takes the run
(generate, sft, pretrain --init on posts prepared with its tokenizer, export). Export -> import is exact. Bad
input gets one line naming what is wrong, and --out stays empty."""

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import myna

from myna.chat_format import MYNA, MYNA_JINJA, derive_format
from myna.cli import main
from myna.data.pipeline import PrepareConfig, prepare
from myna.export import export_gguf, export_hf
from myna.importing import import_gguf, import_hf
from myna.infer.engine import Engine, SamplingParams
from myna.runs import load_model
from myna.template import render, render_prompt, turn_stop_ids
from myna.train.pretrain import pretrain
from myna.train.sft import sft

transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"  # everything is on disk: nothing may be fetched

TWEETS = Path(__file__).parent / "fixtures" / "tok" / "tweets.txt"
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful bird.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "my flight got cancelled 😡 what now?"},
    {"role": "assistant", "content": "Sorry to hear that! DM us your booking."},
    {"role": "user", "content": "done"},
]


def chatml_tokenizer(vocab: int = 600):
    """A GPT-2 style byte-level BPE with ChatML's tokens, as transformers saves one (not one of Myna's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(TWEETS.read_text(encoding="utf-8").splitlines()[:3000], trainer)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=hf, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    tok.chat_template = CHATML
    return tok


def hf_model(root: Path, arch: str = "llama", vocab: int = 640) -> Path:
    """A random tiny transformers model with a ChatML tokenizer, saved as transformers saves it."""
    torch.manual_seed(0)
    shape = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=arch == "llama",
    )
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape))
    with torch.no_grad():  # norm weights off 1, so a wrong mapping of them shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    folder = root / arch
    model.save_pretrained(folder)
    chatml_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return hf_model(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def imported(llama: Path, tmp_path_factory) -> Path:
    return import_hf(llama, tmp_path_factory.mktemp("imported") / "run")


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_import_hf_gives_the_same_logits_and_chat_ids(arch, tmp_path):
    folder = hf_model(tmp_path, arch)
    run = import_hf(folder, tmp_path / "run")
    loaded = load_model(run)
    ref_tok = transformers.AutoTokenizer.from_pretrained(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    for messages, generation in ((CHAT, True), (CHAT[1:], True), (CHAT[1:3], False)):
        expected = list(ref_tok.apply_chat_template(messages, add_generation_prompt=generation)["input_ids"])
        ids = (
            render_prompt(messages, loaded.tokenizer) if generation else render(messages, loaded.tokenizer)
        ).ids
        assert ids == expected, (messages, generation)
    ids = render_prompt(CHAT, loaded.tokenizer).ids
    assert (logits(loaded.model, ids) - logits(ref, ids)).abs().max() <= 1e-5
    # the same greedy continuation, token for token
    # the engine never picks the padded embedding rows past the tokenizer's ids (they have no text): nor may generate
    padded = list(range(loaded.tokenizer.vocab_size, loaded.config.vocab_size))
    out = ref.generate(
        torch.tensor([ids]),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=loaded.tokenizer.eot_id,
        suppress_tokens=padded,
    )
    with Engine(loaded.model, loaded.tokenizer, max_batch=1) as engine:
        mine = engine.generate(ids, SamplingParams(12, temperature=0)).token_ids
    assert mine == out[0, len(ids) :].tolist()


def test_chatml_training_targets_learn_the_reply_and_its_end_only(imported: Path):
    tok = load_model(imported).tokenizer
    r = render(CHAT[:3], tok)
    learned = tok.decode([i for i, t in zip(r.ids, r.targets, strict=True) if t])
    assert learned == "Sorry to hear that! DM us your booking.<|im_end|>"  # not the "\n" after it
    assert [role for _, _, role in r.turns] == ["system", "user", "assistant"]
    assert tok.decode(r.ids[: r.turns[1][0]]) == "<|im_start|>system\nBe brief.<|im_end|>\n"
    im = {tok.special_ids[s] for s in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")}
    assert set(turn_stop_ids(tok)) | {tok.eot_id} == im
    # no system message: the template's own, as transformers renders it
    assert tok.decode(render_prompt(CHAT[1:2], tok).ids).startswith(
        "<|im_start|>system\nYou are a helpful bird."
    )


def test_export_then_import_is_exact(base_run: Path, imported: Path, tmp_path):
    for i, run in enumerate((base_run, imported)):  # Myna's own (Qwen3, QK-norm) and an imported Llama
        back = import_hf(export_hf(run, tmp_path / f"hf{i}"), tmp_path / f"back{i}")
        a, b = load_model(run), load_model(back)
        assert a.config == b.config
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert a.tokenizer.hf.to_str() == b.tokenizer.hf.to_str()
        ids = render_prompt(CHAT, a.tokenizer).ids
        assert ids == render_prompt(CHAT, b.tokenizer).ids
    assert load_model(tmp_path / "back0").tokenizer.chat == MYNA  # Myna's format comes back as Myna's


def test_every_verb_takes_an_imported_run(imported: Path, chat_data: Path, tmp_path):
    out = myna(
        "generate",
        "--ckpt",
        str(imported),
        "--chat",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--prompt",
        "hi",
    )
    assert out.returncode == 0, out.stderr
    tuned = sft(imported, chat_data, tmp_path / "sft", steps=3, batch_size=2, seq_len=128)
    assert tuned["step"] == 3
    sft_tok = load_model(tmp_path / "sft").tokenizer
    assert sft_tok.chat == load_model(imported).tokenizer.chat  # the SFT run keeps the model's ChatML
    gguf_file = export_gguf(tmp_path / "sft", tmp_path / "m.gguf", dtype="f32")
    back = load_model(import_gguf(gguf_file, tmp_path / "from_gguf"))
    ref = load_model(tmp_path / "sft")
    ids = render_prompt(CHAT, ref.tokenizer).ids
    assert (logits(back.model, ids) - logits(ref.model, ids)).abs().max() <= 1e-5


def test_pretrain_init_continues_on_posts_with_the_imported_tokenizer(imported: Path, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tweets.txt").write_text("\n".join(TWEETS.read_text(encoding="utf-8").splitlines()[:1500]) + "\n")
    data = tmp_path / "data"
    prepare([src], data, PrepareConfig(workers=1, tokenizer_from=str(imported)))
    assert json.loads((data / "tokenizer_format.json").read_text())["document_token"] == "<|endoftext|>"
    record = pretrain(
        data, tmp_path / "cpt", init=str(imported), steps=4, batch_size=2, seq_len=64, eval_every=4
    )
    assert record["step"] == 4 and record["val_loss"] < 9
    cpt = load_model(tmp_path / "cpt")
    assert cpt.tokenizer.chat == load_model(imported).tokenizer.chat
    # data tokenized with another tokenizer (a Myna one trained here, which leaves no format file behind) is
    # refused, naming the fix
    prepare([src], data, PrepareConfig(workers=1, vocab_size=300))
    assert not (data / "tokenizer_format.json").exists()
    with pytest.raises(ValueError, match="--tokenizer-from"):
        pretrain(data, tmp_path / "bad", init=str(imported), steps=1)
    assert not (tmp_path / "bad").exists()


def test_derive_format_reads_myna_and_refuses_what_it_cannot_mimic():
    myna_tokens = {"<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool_result|>"}
    derived = derive_format(MYNA_JINJA, "<|bos|>", "<|end|>", myna_tokens, "t")
    assert (derived.start, derived.openers, derived.closer, derived.stop) == (
        MYNA.start,
        MYNA.openers,
        MYNA.closer,
        MYNA.stop,
    )
    trims = CHATML.replace("message['content']", "message['content'] | trim")
    with pytest.raises(ValueError, match="renders differently"):
        derive_format(trims, "<|im_start|>", "<|im_end|>", {"<|im_start|>", "<|im_end|>"}, "t")
    with pytest.raises(ValueError, match="does not render"):
        derive_format("{% for m in messages %}", "a", "b", set(), "t")


def edited(folder: Path, dest: Path, **config) -> Path:
    """A copy of a model folder with config.json changed."""
    dest.mkdir()
    for f in folder.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((folder / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, **config}))
    return dest


def test_bad_input_is_one_line_and_leaves_out_empty(llama: Path, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    cases = [
        (["hf", str(tmp_path / "notes")], "not a model folder"),
        (
            ["hf", str(edited(llama, tmp_path / "gpt2", architectures=["GPT2LMHeadModel"]))],
            "'GPT2LMHeadModel'",
        ),
        (["hf", str(edited(llama, tmp_path / "bias", attention_bias=True))], "attention_bias"),
        (["hf", str(edited(llama, tmp_path / "small", vocab_size=300))], "does not belong"),
        (
            [
                "hf",
                str(
                    edited(
                        llama, tmp_path / "huge", hidden_size=65536, intermediate_size=200000, head_dim=16384
                    )
                ),
            ],
            "GiB",
        ),
        (["gguf", str(junk)], "not a GGUF file"),
    ]
    out = tmp_path / "out"
    # the first as a user runs it (one line on stderr, a non-zero exit); the rest through the same entry point
    result = myna("import", *cases[0][0], "--out", str(out))
    assert result.returncode != 0 and cases[0][1] in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for args, expected in cases[1:]:
        with pytest.raises(SystemExit) as exit:
            main(["import", *args, "--out", str(out)])
        message = str(exit.value.code)
        assert expected in message and len(message.splitlines()) == 1, (args, message)
        assert not out.exists(), args
