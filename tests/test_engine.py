"""The inference engine against a real (tiny) model trained here on bundled tweets: the KV cache and continuous
batching reproduce plain full-forward greedy decoding token for token; sampling, stops, cancellation, errors,
streaming (threads and asyncio) and embeddings behave as documented."""

import asyncio
import codecs
import copy
import threading
import time
from pathlib import Path

import pytest
import torch

from myna.config import ModelConfig
from myna.infer.engine import Engine, SamplingBatch, SamplingParams, TextStream, _top_k_top_p, sample
from myna.model import GPT, KVCache, apply_rope
from myna.tokenizer import train_tokenizer

TWEETS = Path(__file__).parent / "fixtures" / "tok" / "tweets.txt"
PROMPTS = [  # tweet openings of different lengths, in several languages
    "I love",
    "@user the weather today is",
    "Je suis",
    "Home from work. Start again at 8am. Epic. Going to bed now because tomorrow",
    "today",
    "Das ist",
    "my mom says",
]
GREEDY = SamplingParams(temperature=0, max_tokens=40)


@pytest.fixture(scope="module")
def lm():
    """A model of its own, apart from the shared base: 2 layers, 4 query heads on 2 KV heads, trained for 150 steps
    on bare tweets wrapped as <|bos|> text <|end|>, so greedy replies both stop and run to max_tokens."""
    lines = TWEETS.read_text(encoding="utf-8").splitlines()
    tok = train_tokenizer(lines, 512)
    ids = []
    for line in lines:
        ids += [tok.bos_id, *tok.encode(line), tok.eot_id]
    data = torch.tensor(ids)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=64,
        mlp_hidden=192,
        max_seq_len=128,
    )
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(data) - 65, (16,), generator=g)
        batch = torch.stack([data[s : s + 65] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 4.5  # it learned something: ln(512) = 6.2 at init
    return model.eval(), tok


def prompt(tok, text: str) -> list[int]:
    return [tok.bos_id, *tok.encode(text)]


def reference(model, tok, ids: list[int], max_tokens: int, max_len: int = 128) -> list[int]:
    """Greedy decoding by re-running the plain forward over the whole sequence for every token."""
    ids, out = list(ids), []
    with torch.inference_mode():
        for _ in range(min(max_tokens, max_len - len(ids))):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(token)
            out.append(token)
            if token == tok.eot_id:
                break
    return out


def slow_forward(monkeypatch, model, seconds: float = 0.003, fail=None):
    """Make every forward take a little longer (so requests overlap reliably); `fail(idx)` may raise."""
    original = GPT.forward

    def forward(idx, *args, **kwargs):
        if fail is not None:
            fail(idx)
        time.sleep(seconds)
        return original(model, idx, *args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)


# --- the model's per-row KV cache ---------------------------------------------------------------------------


def test_cache_rows_at_different_lengths_decode_together_like_full_forwards(lm):
    model, _ = lm
    torch.manual_seed(1)
    seqs = [torch.randint(0, 512, (n,)) for n in (5, 17, 11)]
    cache = KVCache(model.cfg, batch_size=3, max_len=40)
    with torch.inference_mode():
        for row, s in enumerate(seqs):  # prefill each row alone, through a view
            model(s[None, :-4], kv_cache=cache.rows(row, row + 1))
        assert cache.lengths.tolist() == [1, 13, 7]
        steps = [model(torch.stack([s[-4 + t] for s in seqs])[:, None], kv_cache=cache) for t in range(4)]
        for row, s in enumerate(seqs):
            full = model(s[None])[0, -4:]
            got = torch.cat([step[row] for step in steps])
            torch.testing.assert_close(got, full, atol=1e-5, rtol=0)
        cache.copy_row(1, 0)  # the engine's compaction: row 0 now continues sequence 1
        nxt = torch.randint(0, 512, (1,))
        moved = model(nxt[None], kv_cache=cache.rows(0, 1))[0, -1]
        torch.testing.assert_close(moved, model(torch.cat([seqs[1], nxt])[None])[0, -1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="different lengths"):
        _ = cache.pos


def test_rope_is_the_rotation_of_each_pair_by_its_angle(lm):
    """apply_rope, on every path, is RoPE: pair j of a head (elements j and j + D/2) as a complex number times
    e^(i * pos * theta^(-2j/D)), each row at its own positions; and the inference path's joint QK-norm is the
    training path's to the bit."""
    model, _ = lm
    torch.manual_seed(2)
    D = model.cfg.head_dim
    pos = torch.tensor([[3], [40]])
    x = torch.randn(2, 1, 6, D)
    got = apply_rope(x, model.rope_cos[pos], model.rope_sin[pos])
    freq = model.cfg.rope_theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    turn = torch.polar(torch.ones(2, 1, D // 2, dtype=torch.float64), pos[..., None].double() * freq)
    pairs = torch.complex(x[..., : D // 2].double(), x[..., D // 2 :].double()) * turn[:, :, None]
    torch.testing.assert_close(got, torch.cat([pairs.real, pairs.imag], -1).float(), atol=1e-6, rtol=1e-5)
    attn = model.blocks[0].attn
    w = torch.cat([attn.q_norm.weight.expand(4, -1), attn.k_norm.weight.expand(2, -1)])
    joint = torch.nn.functional.rms_norm(x, (x.size(-1),), None, attn.q_norm.eps) * w
    with torch.no_grad():
        assert torch.equal(joint, torch.cat([attn.q_norm(x[:, :, :4]), attn.k_norm(x[:, :, 4:])], 2))


def test_inference_path_follows_weights_that_change_or_layers_that_are_replaced(lm):
    """The packed weight copy of the inference path is remade after an optimizer step or a swapped layer (a
    biased lm_head runs as itself), and a deepcopy of a model that has decoded decodes alike."""
    model = copy.deepcopy(lm[0])
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(3))

    def cached_equals_full():
        with torch.inference_mode():
            cached = model(ids, kv_cache=KVCache(model.cfg, 2, 16))
            torch.testing.assert_close(cached, model(ids), atol=1e-5, rtol=0)

    cached_equals_full()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(ids, ids)[1].backward()
    opt.step()
    cached_equals_full()
    head = torch.nn.Linear(model.cfg.n_embd, model.cfg.vocab_size)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.fill_(3.0)
    model.lm_head = head
    cached_equals_full()
    model = copy.deepcopy(model)
    cached_equals_full()


# --- greedy equivalence ---------------------------------------------------------------------------------------


def test_greedy_with_cache_equals_full_forward_for_one_request(lm):
    model, tok = lm
    ids = prompt(tok, PROMPTS[1])
    want = reference(model, tok, ids, 40)
    for use_cache in (True, False):
        with Engine(model, tok, max_batch=1, use_cache=use_cache) as engine:
            got = engine.generate(ids, GREEDY)
        assert got.token_ids == want, use_cache
        assert got.text == tok.decode(t for t in want if t != tok.eot_id)


def test_greedy_batch_of_different_prompt_lengths_equals_full_forward(lm):
    model, tok = lm
    prompts = [prompt(tok, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) >= 5
    want = [reference(model, tok, p, 40) for p in prompts]
    assert len({len(w) for w in want}) > 1  # some stop at <|end|>, some run to max_tokens
    for use_cache in (True, False):
        with Engine(model, tok, max_batch=len(prompts), use_cache=use_cache) as engine:
            requests = [engine.submit(p, GREEDY) for p in prompts]
            got = [r.result(timeout=60).token_ids for r in requests]
        assert got == want, use_cache


@pytest.mark.slow  # compiles two graphs (a batch of 1, and any other batch size): ~20 s on 2 CPU cores
def test_compiled_decode_gives_the_greedy_tokens_of_the_eager_engine(lm):
    model, tok = lm
    prompts = [prompt(tok, p) for p in PROMPTS]
    # 3 streams of different lengths over 2 rows, so the batch shrinks, grows and rows move
    batch = [prompts[0], prompts[3], prompts[5]]
    got = {}
    for compiled in (False, True):
        with Engine(model, tok, max_batch=2, compile=compiled) as engine:
            requests = [engine.submit(p, GREEDY) for p in batch]
            got[compiled] = [r.result(timeout=300).token_ids for r in requests]
    assert got[True] == got[False]
    with pytest.raises(ValueError, match="use_cache"):
        Engine(model, tok, use_cache=False, compile=True)


def test_requests_join_and_leave_mid_decode_with_more_requests_than_rows(lm, monkeypatch):
    model, tok = lm
    prompts = [prompt(tok, p) for p in PROMPTS]
    budgets = [40, 7, 25, 3, 33, 12, 40]  # staggered finishes: rows are freed and refilled in the middle
    want = [reference(model, tok, p, n) for p, n in zip(prompts, budgets, strict=True)]
    slow_forward(monkeypatch, model)
    with Engine(model, tok, max_batch=3) as engine:
        first = engine.submit(prompts[0], SamplingParams(temperature=0, max_tokens=budgets[0]))
        stream = iter(first)
        next(stream)  # the first request is decoding...
        later = [
            engine.submit(p, SamplingParams(temperature=0, max_tokens=n))
            for p, n in zip(prompts[1:], budgets[1:], strict=True)
        ]
        got = [r.result(timeout=60) for r in [first, *later]]
    assert [g.token_ids for g in got] == want
    # ...and the second got its first token while the first was still running
    assert first.submitted + got[0].total_s > later[0].submitted + got[1].ttft_s
    assert all(g.finish_reason in ("stop", "length") for g in got)


def test_greedy_fast_path_gives_the_tokens_of_sample_and_penalties_after_it_still_apply(lm):
    """Batches of plain greedy requests take argmax without building a SamplingBatch; the same requests beside a
    penalised one go through sample(): the tokens agree. A penalised request admitted after greedy ones (whose
    rows skip the seen bookkeeping) samples as it does alone."""
    model, tok = lm
    prompts = [prompt(tok, p) for p in PROMPTS[:3]]
    penalised = SamplingParams(temperature=0, repetition_penalty=1.8, max_tokens=30)
    with Engine(model, tok, max_batch=4) as engine:
        fast = [engine.generate(p, GREEDY).token_ids for p in prompts]
        alone = engine.generate(prompts[0], penalised).token_ids
        requests = [engine.submit(p, GREEDY) for p in prompts] + [engine.submit(prompts[0], penalised)]
        beside = [r.result(timeout=60).token_ids for r in requests]
    assert fast == [reference(model, tok, p, 40) for p in prompts]
    assert beside == [*fast, alone]
    assert alone != fast[0][:30]  # the penalty changed the greedy reply, so the comparison means something


# --- sampling -------------------------------------------------------------------------------------------------


def test_seeded_sampling_is_the_same_alone_or_in_a_batch(lm):
    model, tok = lm
    ids = prompt(tok, PROMPTS[0])
    params = SamplingParams(
        temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2, seed=7, max_tokens=40
    )
    with Engine(model, tok, max_batch=1) as engine:
        alone = engine.generate(ids, params)
        other_seed = engine.generate(ids, SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=8))
    neighbours = [
        (prompt(tok, PROMPTS[3]), GREEDY),
        (prompt(tok, PROMPTS[2]), SamplingParams(temperature=1.3, seed=1)),
        (ids, SamplingParams(temperature=0.7, repetition_penalty=1.5, seed=3, max_tokens=5)),
    ]
    with Engine(model, tok, max_batch=4) as engine:
        requests = [engine.submit(p, sp) for p, sp in neighbours[:2]]
        batched = engine.submit(ids, params)
        requests.append(engine.submit(*neighbours[2]))
        together = batched.result(timeout=60)
        for r in requests:
            r.result(timeout=60)
    assert together.token_ids == alone.token_ids and together.text == alone.text
    assert other_seed.token_ids != alone.token_ids


def _batch(n: int, vocab: int, **kw) -> SamplingBatch:
    uniform = kw.pop("uniform", [0.5] * n)
    return SamplingBatch.build([SamplingParams(**kw)] * n, uniform, vocab, "cpu")


def test_inverse_cdf_sampling_follows_the_distribution_and_the_filters():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(1000, 4).contiguous()
    seen = torch.zeros(1000, 4, dtype=torch.bool)
    grid = [(i + 0.5) / 1000 for i in range(1000)]  # evenly spread draws: counts equal probability * 1000

    def counts(**kw) -> list[int]:
        tokens = sample(logits, _batch(1000, 4, uniform=grid, **kw), seen)
        return torch.bincount(tokens, minlength=4).tolist()

    assert counts(temperature=1.0) == [50, 500, 150, 300]
    assert counts(temperature=1.0, top_k=2) == [0, 625, 0, 375]  # 0.5 : 0.3 renormalised
    assert counts(temperature=1.0, top_p=0.75) == [0, 625, 0, 375]  # 0.5 + 0.3 covers 0.75
    assert counts(temperature=1.0, top_p=0.85) == [0, 526, 158, 316]  # 0.5 + 0.3 + 0.15 covers 0.85
    assert counts(temperature=0.0) == [0, 1000, 0, 0]
    cold = counts(temperature=0.5)  # sharper: squares the probabilities before renormalising
    assert abs(cold[1] - 1000 * 0.25 / 0.365) <= 1


def test_top_k_top_p_cut_equals_the_sorted_definition_over_a_large_vocabulary():
    torch.manual_seed(0)
    vocab = 3000
    # peaked rows (a nucleus of a few tokens) and flat rows (a nucleus of most of the vocabulary)
    logits = torch.randn(6, vocab) * torch.tensor([[8.0], [8.0], [0.5], [0.5], [3.0], [1.0]])
    settings = [dict(top_p=0.9), dict(top_k=20, top_p=0.5), dict(top_p=0.95), dict(top_k=2500), dict(), {}]
    params = [SamplingParams(temperature=1.0, **kw) for kw in settings]
    batch = SamplingBatch.build(params, [0.5] * 6, vocab, "cpu")
    kept = _top_k_top_p(logits, batch).isfinite()
    for row, kw in enumerate(settings):  # the textbook version: sort everything, cut, renormalise, cut
        values, order = logits[row].sort(descending=True)
        n = kw.get("top_k", vocab)
        probs = values[:n].softmax(-1)
        n = int(((probs.cumsum(-1) - probs) < kw.get("top_p", 1.0)).sum()) if "top_p" in kw else n
        want = torch.zeros(vocab, dtype=torch.bool)
        want[order[:n]] = True
        assert torch.equal(kept[row], want), (row, int(kept[row].sum()), n)
    assert (
        1 < kept[0].sum() < 64 < kept[2].sum()
    )  # one row resolved among the first candidates, one needed more


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.2]])
    seen = torch.tensor([[True, False, True, False]])
    greedy = dict(temperature=0.0, repetition_penalty=1.5)
    assert sample(logits, _batch(1, 4, temperature=0.0), seen).item() == 0
    assert sample(logits, _batch(1, 4, **greedy), seen).item() == 1  # 2.0 / 1.5 < 1.9
    # among the negatives, the seen -1.0 becomes -1.5 and falls below the unseen -1.2
    assert sample(logits[:, 2:], _batch(1, 2, **greedy), seen[:, 2:]).item() == 1


def test_invalid_sampling_params_are_refused():
    for bad in [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_k=-2),
        dict(max_tokens=0),
        dict(repetition_penalty=0),
        dict(stop=("",)),
        dict(seed=-1),
    ]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(stop=["a"], stop_token_ids=[5]).stop == ("a",)  # JSON lists become tuples
    assert SamplingParams(stop="###").stop == ("###",)  # one bare string is one stop string


# --- stops, lengths, text ---------------------------------------------------------------------------------------


def test_stop_string_ends_the_text_before_it_and_is_never_streamed(lm):
    model, tok = lm
    ids = prompt(tok, PROMPTS[3])
    full = tok.decode(t for t in reference(model, tok, ids, 40) if t != tok.eot_id)
    stop = full[8:11]
    assert len(stop) == 3 and stop not in full[:10]
    with Engine(model, tok) as engine:
        request = engine.submit(ids, SamplingParams(temperature=0, max_tokens=40, stop=("zzzz", stop)))
        deltas = list(request)
        got = request.result()
    assert got.finish_reason == "stop"
    assert got.text == full[: full.index(stop)] == "".join(deltas)
    assert got.completion_tokens < len(reference(model, tok, ids, 40))  # it stopped early


def test_text_stream_holds_back_what_may_start_a_stop_string(lm):
    _, tok = lm
    byte_ids = {b: tok.token_bytes.index(bytes([b])) for b in b"hello world"}
    stream = TextStream(tok.token_bytes, stop=("lo w", "xyz"))
    deltas = [stream.push(byte_ids[b]) for b in b"hello world"[:7]]
    # "l" could start "lo w": held until the next character rules it out; "lo w" itself never comes out
    assert deltas == ["h", "e", "", "l", "", "", ""]
    assert stream.stopped and stream.text == "hel"
    stream = TextStream(tok.token_bytes, stop=("lo w",))
    deltas = [stream.push(byte_ids[b]) for b in b"hello"]
    assert "".join(deltas) == "hel" and stream.flush() == "lo"  # at the end, held text is no stop: released


def test_incremental_decoding_never_splits_a_utf8_character(lm):
    _, tok = lm
    one_byte = {b: tok.token_bytes.index(bytes([b])) for b in range(256)}
    stream = TextStream(tok.token_bytes)
    text = "é😀x"
    deltas = [stream.push(one_byte[b]) for b in text.encode()]
    assert deltas == ["", "é", "", "", "", "😀", "x"]
    stream.push(one_byte[0xE2])  # the first byte of a three-byte character, then generation ends
    assert stream.flush() == "\ufffd"


def test_generated_multibyte_text_streams_whole_characters(lm):
    model, tok = lm
    lines = TWEETS.read_text(encoding="utf-8").splitlines()
    # Arabic tweets: the 512-id vocabulary spells most of their characters with two byte tokens
    openings = [line[:12] for line in lines[2000:] if sum(ord(c) > 0x5FF for c in line[:12]) > 6][:6]
    assert openings
    completed_across_tokens = 0
    with Engine(model, tok, max_batch=len(openings)) as engine:
        requests = [engine.submit(prompt(tok, o), GREEDY) for o in openings]
        for r in requests:
            deltas = list(r)
            got = r.result()
            body = [t for t in got.token_ids if t != tok.eot_id]
            # a character cut between deltas would show up as extra U+FFFD against decoding all bytes at once
            # (the tiny model also emits truly broken byte runs: those are U+FFFD either way)
            assert "".join(deltas) == got.text == tok.decode_bytes(body).decode("utf-8", errors="replace")
            utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            for t in body:
                pending = utf8.getstate()[0]
                out = utf8.decode(tok.token_bytes[t])
                completed_across_tokens += bool(pending and out and out[0] != "\ufffd")
    assert completed_across_tokens > 0  # the test did exercise characters split between tokens


def test_stop_tokens_end_of_turn_and_max_tokens(lm):
    model, tok = lm
    ids = prompt(tok, PROMPTS[1])
    want = reference(model, tok, ids, 40)
    stop_at = next(t for t in want[3:] if t != tok.eot_id)
    cut = want.index(stop_at) + 1
    ends = [p for p in PROMPTS if reference(model, tok, prompt(tok, p), 40)[-1] == tok.eot_id]
    assert ends
    with Engine(model, tok) as engine:
        by_id = engine.generate(ids, SamplingParams(temperature=0, max_tokens=40, stop_token_ids=(stop_at,)))
        short = engine.generate(ids, SamplingParams(temperature=0, max_tokens=4))
        eot = engine.generate(prompt(tok, ends[0]), GREEDY)
    assert by_id.finish_reason == "stop" and by_id.token_ids == want[:cut]
    assert by_id.text == tok.decode(want[: cut - 1])  # the stop token's text is left out
    assert (short.finish_reason, short.token_ids, short.completion_tokens) == ("length", want[:4], 4)
    assert eot.finish_reason == "stop" and eot.token_ids[-1] == tok.eot_id and "<|end|>" not in eot.text
    assert eot.prompt_tokens == len(prompt(tok, ends[0])) and 0 < eot.ttft_s <= eot.total_s


def test_context_limit_clips_max_tokens_and_refuses_prompts_that_do_not_fit(lm):
    model, tok = lm
    long_ids = prompt(tok, " ".join(TWEETS.read_text(encoding="utf-8").splitlines()[:20]))
    with Engine(model, tok, max_len=64) as engine:
        with pytest.raises(ValueError, match="no room to generate"):
            engine.submit(long_ids[:64], GREEDY)
        with pytest.raises(ValueError, match="empty"):
            engine.submit([], GREEDY)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.submit([tok.bos_id, 10_000], GREEDY)
        tight = engine.generate(long_ids[:61], SamplingParams(temperature=0, max_tokens=50))
        last = engine.generate(long_ids[:63], SamplingParams(temperature=0, max_tokens=50))
    want = reference(model, tok, long_ids[:61], 50, max_len=64)
    assert tight.token_ids == want and len(want) <= 3
    assert tight.finish_reason == ("stop" if want[-1] == tok.eot_id else "length")
    assert last.completion_tokens == 1
    with pytest.raises(ValueError, match="max_len"):
        Engine(model, tok, max_len=500)


# --- cancellation and failures ----------------------------------------------------------------------------------


def test_cancel_frees_the_row_for_waiting_requests(lm, monkeypatch):
    model, tok = lm
    ids = prompt(tok, PROMPTS[0])
    long = SamplingParams(temperature=0.8, seed=0, max_tokens=120)
    slow_forward(monkeypatch, model, seconds=0.01)
    with Engine(model, tok, max_batch=1) as engine:
        running = engine.submit(ids, long)
        waiting = engine.submit(ids, long)
        dropped = engine.submit(ids, long)
        next(iter(running))
        dropped.cancel()  # still waiting: never prefilled
        running.cancel()
        got = running.result(timeout=30)
        second = waiting.result(timeout=30)  # got the row once the first was cancelled
    assert got.finish_reason == "cancelled" and 1 <= got.completion_tokens < 120
    assert got.text == "".join(running)
    assert dropped.result().finish_reason == "cancelled" and dropped.result().completion_tokens == 0
    assert second.finish_reason in ("stop", "length") and second.completion_tokens > 0


def test_a_failing_forward_fails_its_requests_and_the_engine_keeps_serving(lm, monkeypatch):
    model, tok = lm
    ids = prompt(tok, PROMPTS[3])

    def fail_prefill(idx):
        if idx.size(1) > 1 and idx.size(0) == 1 and idx[0, 1] == tok.encode("today")[0]:
            raise RuntimeError("out of memory (simulated)")

    slow_forward(monkeypatch, model, fail=fail_prefill)
    with Engine(model, tok, max_batch=2) as engine:
        healthy = engine.submit(ids, GREEDY)
        next(iter(healthy))
        doomed = engine.submit(prompt(tok, "today"), GREEDY)  # its prefill raises
        with pytest.raises(RuntimeError, match="simulated"):
            doomed.result(timeout=30)
        with pytest.raises(RuntimeError, match="simulated"):
            list(doomed)
        assert healthy.result(timeout=30).token_ids == reference(model, tok, ids, 40)

        def fail_decode(idx):
            if idx.size(1) == 1:
                raise RuntimeError("decode broke (simulated)")

        slow_forward(monkeypatch, model, fail=fail_decode)
        with pytest.raises(RuntimeError, match="decode broke"):
            engine.generate(ids, GREEDY)
        monkeypatch.undo()
        assert engine.generate(ids, GREEDY).token_ids == reference(model, tok, ids, 40)


def test_closing_the_engine_cancels_what_is_left_and_refuses_new_work(lm, monkeypatch):
    model, tok = lm
    slow_forward(monkeypatch, model, seconds=0.01)
    engine = Engine(model, tok, max_batch=1).start()
    requests = [
        engine.submit(prompt(tok, "I love"), SamplingParams(seed=1, max_tokens=100)) for _ in range(2)
    ]
    next(iter(requests[0]))
    engine.close()
    assert [r.result(timeout=5).finish_reason for r in requests] == ["cancelled", "cancelled"]
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit([tok.bos_id], GREEDY)


# --- streaming ----------------------------------------------------------------------------------------------------


def test_astream_serves_concurrent_requests_without_blocking_the_event_loop(lm, monkeypatch):
    model, tok = lm
    prompts = [prompt(tok, p) for p in PROMPTS[:4]]
    want = [reference(model, tok, p, 40) for p in prompts]
    slow_forward(monkeypatch, model)

    async def main(engine: Engine):
        ticks = 0
        streaming = True

        async def ticker():
            nonlocal ticks
            while streaming:
                ticks += 1
                await asyncio.sleep(0.002)

        async def consume(ids):
            request = engine.submit(ids, GREEDY)
            deltas = [d async for d in request.astream()]
            return deltas, await request.aresult()

        tick = asyncio.create_task(ticker())
        results = await asyncio.gather(*(consume(p) for p in prompts))
        streaming = False
        await tick
        return results, ticks

    with Engine(model, tok, max_batch=4) as engine:
        results, ticks = asyncio.run(main(engine))
    for (deltas, completion), w in zip(results, want, strict=True):
        assert completion.token_ids == w and "".join(deltas) == completion.text
    assert ticks >= 10  # the loop kept running while the requests streamed


def test_submit_is_thread_safe(lm):
    model, tok = lm
    prompts = [prompt(tok, p) for p in PROMPTS]
    out: dict[int, list[int]] = {}
    with Engine(model, tok, max_batch=4) as engine:

        def client(i):
            out[i] = engine.generate(prompts[i % len(prompts)], SamplingParams(temperature=0, max_tokens=10))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    want = [reference(model, tok, p, 10) for p in prompts]
    assert [out[i].token_ids for i in range(12)] == [want[i % len(prompts)] for i in range(12)]


# --- embeddings ---------------------------------------------------------------------------------------------------


def test_embed_mean_pools_normalises_and_ignores_padding(lm):
    model, tok = lm
    short, long, other = (prompt(tok, p) for p in (PROMPTS[0], PROMPTS[3], PROMPTS[2]))
    engine = Engine(model, tok)
    both = engine.embed([short, long, other])
    alone = engine.embed([short])
    assert both.shape == (3, model.cfg.n_embd) and both.dtype == torch.float32
    torch.testing.assert_close(both.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=0)  # padding beside a longer one is ignored
    with torch.inference_mode():
        hidden = model.hidden(torch.tensor([long]))
    torch.testing.assert_close(
        both[1], torch.nn.functional.normalize(hidden[0].mean(0), dim=0), atol=1e-5, rtol=0
    )
    assert (both[0] @ both[2]).item() < 0.999  # different texts, different vectors
    with pytest.raises(ValueError, match=r"ids_batch\[1\]"):
        engine.embed([short, []])
