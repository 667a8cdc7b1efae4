"""`myna serve` against the official `openai` client on a live server on 127.0.0.1: models, chat (plain and
streamed), completions, embeddings, every error status, context limits, moderation, concurrency limits and
cancellation when a client goes away. The model is a tiny GPT trained here on real tweets for a few seconds."""

import base64
import json
import threading
import time
from pathlib import Path

import numpy as np
import openai
import pytest
from live_server import KEY, LiveServer, chat, error_of, hooks, wait_for

from myna.moderation import Policy
from myna.serve.api import create_app
from myna.serve.config import ServeConfig
from myna.tokenizer import Tokenizer

TWEETS = Path(__file__).parent / "fixtures" / "tok" / "tweets.txt"


TEST_POLICY = {
    "extends": "none",
    "categories": {
        "forbidden": {"action": "block", "terms": ["zebracorn"]},
        "flagged": {"action": "label", "terms": ["giraffeish"]},
    },
}


@pytest.fixture(scope="module")
def live(run_dir):
    """The main server: API key required, a test moderation policy, default limits."""
    server = LiveServer(
        create_app(
            run_dir,
            ServeConfig(api_key=KEY, policy=Policy.from_dict(TEST_POLICY)),
            on_load=hooks(endless=True),
        )
    )
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def slow(run_dir):
    """One request at a time, 20 ms per forward: room to watch a stream, overflow it, and walk away."""
    server = LiveServer(
        create_app(
            run_dir,
            ServeConfig(max_concurrency=1, policy=Policy.off()),
            on_load=hooks(slow=0.02, endless=True),
        )
    )
    server.wait_ready()
    yield server
    server.stop()


# ---------------------------------------------------------------------------------------------------------------
# The happy paths


def test_models_and_health(live, run_dir):
    client = live.client()
    models = client.models.list()
    assert [m.id for m in models.data] == [run_dir.name]
    assert models.data[0].owned_by == "myna"
    # the checkpoint's name (alone or under the run's) names the same model
    assert client.models.retrieve(f"{run_dir.name}/step_00000100").id == run_dir.name
    health = live.health()
    assert health["status"] == "ready" and health["model"] == run_dir.name
    assert health["auth"] is True and health["context_length"] == 128
    assert health["active_requests"] == 0


def test_chat_plain_is_deterministic_when_greedy_or_seeded(live, run_dir):
    client = live.client()
    raw = client.chat.completions.with_raw_response.create(
        model=run_dir.name, messages=chat("good morning everyone"), max_tokens=24, temperature=0
    )
    reply = raw.parse()
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == run_dir.name
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert isinstance(choice.message.content, str) and reply.usage.completion_tokens == 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    context = reply.model_extra["myna"]["context"]
    assert context == {
        "prompt_tokens": reply.usage.prompt_tokens,
        "dropped_turns": 0,
        "truncated": False,
        "max_tokens": 24,
        "max_tokens_requested": 24,
    }
    assert raw.headers["x-myna-dropped-turns"] == "0" and raw.headers["x-myna-max-tokens"] == "24"
    again = client.chat.completions.create(
        model=run_dir.name, messages=chat("good morning everyone"), max_tokens=24, temperature=0
    )
    assert again.choices[0].message.content == choice.message.content

    def sampled(seed: int) -> str:
        r = client.chat.completions.create(
            model=run_dir.name, messages=chat("hello"), max_tokens=16, temperature=1.0, seed=seed
        )
        return r.choices[0].message.content

    assert sampled(7) == sampled(7)
    assert len({sampled(s) for s in range(4)}) > 1


def test_chat_stream_equals_plain(live, run_dir):
    client = live.client()
    request = dict(model=run_dir.name, messages=chat("what a day"), max_tokens=30, temperature=0.8, seed=3)
    plain = client.chat.completions.create(**request)
    chunks = list(
        client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["myna"]["context"]["max_tokens"] == 30
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    deltas = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1  # streamed token by token, not in one piece
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [f.choices[0].finish_reason for f in finals] == [plain.choices[0].finish_reason]
    assert finals[0].model_extra["myna"]["moderation"]["action"] == "allow"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()


def test_stream_wire_format_ends_with_done(live, run_dir):
    body = {"model": run_dir.name, "messages": chat("hi"), "max_tokens": 5, "stream": True, "temperature": 0}
    r = live.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}"})
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.body.decode().split("\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    parsed = [json.loads(e[6:]) for e in events[:-1]]
    assert "usage" not in parsed[-1]  # usage only when stream_options asks for it, as OpenAI does
    assert parsed[-1]["choices"][0]["finish_reason"] == "length"


def test_completions_plain_stream_echo_and_stop(live, run_dir):
    client = live.client()
    request = dict(model=run_dir.name, prompt="I love", max_tokens=12, temperature=0.8, seed=5)
    plain = client.completions.create(**request)
    assert plain.object == "text_completion" and plain.usage.completion_tokens == 12
    text = plain.choices[0].text
    streamed = client.completions.create(**request, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
    assert client.completions.create(**request, echo=True).choices[0].text == "I love" + text
    # a stop string from inside the text cuts it there
    stop = text[len(text) // 2 :][:2]
    cut = client.completions.create(**request, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


def test_replies_end_at_the_end_token(run_dir):
    """The model as trained (no test hooks) ends its turns with <|end|>: finish "stop", no special in the text."""
    server = LiveServer(create_app(run_dir, ServeConfig(policy=Policy.off())))
    try:
        server.wait_ready()
        client = server.client()
        replies = [
            client.chat.completions.create(
                model=run_dir.name, messages=chat("hi there"), max_tokens=60, temperature=1, seed=seed
            )
            for seed in range(6)
        ]
        stopped = [r for r in replies if r.choices[0].finish_reason == "stop"]
        assert stopped, [r.choices[0].message.content for r in replies]
        for r in stopped:
            assert r.usage.completion_tokens < 60 and "<|end|>" not in r.choices[0].message.content
    finally:
        server.stop()


def test_max_tokens_clipped_to_the_context(live, run_dir):
    client = live.client()
    tok = Tokenizer.from_file(run_dir / "tokenizer.json")
    prompt = "so tired today"
    while len(tok.encode(prompt)) < 100:  # ~100 of the 128 tokens
        prompt += " so tired today"
    r = client.completions.create(model=run_dir.name, prompt=prompt, max_tokens=1000, temperature=0)
    context = r.model_extra["myna"]["context"]
    room = 128 - context["prompt_tokens"]
    assert context["max_tokens"] == room and context["max_tokens_requested"] == 1000
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= 128
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=run_dir.name, prompt=prompt * 3, max_tokens=5)
    assert e.value.code == "context_length_exceeded" and "128" in e.value.message


def test_chat_overflow_drops_oldest_turns_and_says_so(live, run_dir):
    client = live.client()
    messages = [{"role": "system", "content": "be brief"}]
    for i in range(12):
        messages += [
            {"role": "user", "content": f"message number {i} about the weather today"},
            {"role": "assistant", "content": f"reply number {i} about the weather"},
        ]
    messages += chat("and tomorrow?")
    raw = client.chat.completions.with_raw_response.create(
        model=run_dir.name, messages=messages, max_tokens=20, temperature=0
    )
    r = raw.parse()
    context = r.model_extra["myna"]["context"]
    assert context["dropped_turns"] > 0 and not context["truncated"]
    assert raw.headers["x-myna-dropped-turns"] == str(context["dropped_turns"])
    assert context["prompt_tokens"] <= 128 - 20 and r.usage.prompt_tokens == context["prompt_tokens"]
    # a single message longer than the context loses its beginning instead
    r = client.chat.completions.create(model=run_dir.name, messages=chat("rain " * 300), max_tokens=10)
    assert r.model_extra["myna"]["context"]["truncated"] is True


def test_embeddings_unit_norm_float_and_base64_agree(live, run_dir):
    client = live.client()
    texts = ["I love this", "worst day ever", "I love this"]
    floats = client.embeddings.create(model=run_dir.name, input=texts, encoding_format="float")
    vectors = np.array([d.embedding for d in floats.data])
    assert vectors.shape == (3, 64) and [d.index for d in floats.data] == [0, 1, 2]
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.allclose(vectors[0], vectors[2]) and not np.allclose(vectors[0], vectors[1])
    # the client asks for base64 by default and decodes it itself
    default = client.embeddings.create(model=run_dir.name, input=texts)
    assert np.allclose(np.array([d.embedding for d in default.data]), vectors, atol=1e-6)
    alone = client.embeddings.create(model=run_dir.name, input="worst day ever", encoding_format="float")
    assert np.allclose(alone.data[0].embedding, vectors[1], atol=1e-5)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 3
    body = {"model": run_dir.name, "input": [5, 6, 7], "encoding_format": "base64"}
    raw = live.request("POST", "/v1/embeddings", body, {"Authorization": f"Bearer {KEY}"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert decoded.shape == (64,) and abs(np.linalg.norm(decoded) - 1) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Errors, each in OpenAI's shape


def test_400_invalid_requests(live, run_dir):
    client = live.client()
    cases = [
        (dict(messages=chat("hi"), temperature=3), "temperature"),
        (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages"),
        (dict(messages=chat("hi"), n=2), "n"),
        (dict(messages=chat("hi"), stop=["a", "b", "c", "d", "e"]), "stop"),
        (dict(messages=chat("hi"), extra_body={"frobnicate": 1}), "frobnicate"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=run_dir.name, **kwargs)
        assert e.value.status_code == 400 and e.value.param == param, (param, e.value.body)
        assert e.value.body["type"] == "invalid_request_error"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = live.request("POST", "/v1/chat/completions", b"{not json", headers)
    assert r.status == 400 and "not valid JSON" in error_of(r)["message"]
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=run_dir.name, input="")


def test_401_missing_or_wrong_key(live, run_dir):
    for key in ("wrong-key", None):
        r = live.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
        assert r.status == 401, r.body
        assert error_of(r)["code"] == ("invalid_api_key" if key else "missing_api_key")
    with pytest.raises(openai.AuthenticationError):
        live.client("wrong-key").chat.completions.create(model=run_dir.name, messages=chat("hi"))
    # the page and the health check need no key
    assert live.request("GET", "/").status == 200 and live.request("GET", "/health").status == 200


def test_404_unknown_model_and_path(live):
    with pytest.raises(openai.NotFoundError) as e:
        live.client().chat.completions.create(model="gpt-4o", messages=chat("hi"))
    assert e.value.code == "model_not_found" and e.value.param == "model"
    r = live.request("GET", "/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status == 404 and error_of(r)["type"] == "invalid_request_error"


def test_413_by_content_length_and_by_streamed_body(run_dir):
    server = LiveServer(create_app(run_dir, ServeConfig(max_body_bytes=2000, policy=Policy.off())))
    try:
        server.wait_ready()
        with pytest.raises(openai.APIStatusError) as e:
            server.client().chat.completions.create(model=run_dir.name, messages=chat("x" * 3000))
        assert e.value.status_code == 413 and e.value.code == "request_too_large"
        # chunked upload: no Content-Length, the limit is enforced while reading
        body = json.dumps({"model": run_dir.name, "messages": chat("y" * 3000)}).encode()
        conn = server.connect()
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=iter([body[:1000], body[1000:]]),
            headers={"Content-Type": "application/json"},
            encode_chunked=True,
        )
        response = conn.getresponse()
        assert response.status == 413
        assert "2000 bytes" in json.loads(response.read())["error"]["message"]
        conn.close()
        ok = server.client().chat.completions.create(model=run_dir.name, messages=chat("hi"), max_tokens=2)
        assert ok.choices[0].message.role == "assistant"
    finally:
        server.stop()


def test_503_while_loading(run_dir):
    gate = threading.Event()
    server = LiveServer(
        create_app(run_dir, ServeConfig(policy=Policy.off()), on_load=lambda loaded: gate.wait(10))
    )
    try:
        health = server.request("GET", "/health")
        assert health.status == 503 and health.json()["status"] == "loading"
        with pytest.raises(openai.InternalServerError) as e:
            server.client().chat.completions.create(model=run_dir.name, messages=chat("hi"))
        assert e.value.status_code == 503 and e.value.code == "model_loading"
        assert e.value.response.headers["retry-after"] == "1"
        gate.set()
        server.wait_ready()
        assert server.client().models.list().data[0].id == run_dir.name
    finally:
        gate.set()
        server.stop()


def test_429_over_the_limit_and_a_disconnect_cancels(slow, run_dir):
    body = {
        "model": run_dir.name,
        "messages": chat("hello"),
        "max_tokens": 100,
        "stream": True,
        "temperature": 1,
    }
    conn = slow.connect()
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")
        assert slow.health()["active_requests"] == 1
        # the one slot is taken: the next request is refused at once
        t0 = time.monotonic()
        with pytest.raises(openai.RateLimitError) as e:
            slow.client().chat.completions.create(model=run_dir.name, messages=chat("hi"))
        assert time.monotonic() - t0 < 1
        assert e.value.code == "rate_limit_exceeded" and e.value.response.headers["retry-after"] == "1"
        before = slow.health()
    finally:
        conn.close()
    # the client left after one event; 100 tokens at 20 ms each would take 2 s more
    took = wait_for(lambda: slow.health()["active_requests"] == 0, timeout=1.5)
    after = slow.health()
    assert after["cancelled_requests"] == before["cancelled_requests"] + 1, (took, after)
    assert after["served_requests"] == before["served_requests"]
    engine = slow.app.state.server.engine
    wait_for(lambda: not engine.active and not engine.waiting, timeout=1)


def test_non_streamed_request_cancelled_when_client_times_out(slow, run_dir):
    before = slow.health()["cancelled_requests"]
    conn = slow.connect(timeout=0.3)
    body = json.dumps({"model": run_dir.name, "prompt": "hey", "max_tokens": 100})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        conn.getresponse()
    conn.close()
    wait_for(lambda: slow.health()["cancelled_requests"] == before + 1, timeout=1.5)
    engine = slow.app.state.server.engine
    wait_for(lambda: not engine.active, timeout=1)
    ok = slow.client().completions.create(model=run_dir.name, prompt="hey", max_tokens=3)
    assert ok.usage.completion_tokens <= 3


def test_concurrent_streams_share_the_batch(live, run_dir):
    """8 streams at once all complete, and the engine decoded them together (more than one row at a time)."""
    engine = live.app.state.server.engine
    widest = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            widest.append(len(engine.active))
            time.sleep(0.001)

    def one(i: int) -> str:
        stream = live.client().chat.completions.create(
            model=run_dir.name,
            messages=chat(f"tweet {i}"),
            max_tokens=40,
            temperature=0.8,
            seed=i,
            stream=True,
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads, results = [], {}
    for i in range(8):
        t = threading.Thread(target=lambda i=i: results.__setitem__(i, one(i)))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert len(results) == 8
    assert max(widest) > 1


# ---------------------------------------------------------------------------------------------------------------
# Moderation


def test_moderation_labels_and_refuses_input(live, run_dir):
    client = live.client()
    r = client.chat.completions.create(model=run_dir.name, messages=chat("so giraffeish today"), max_tokens=5)
    report = r.model_extra["myna"]["moderation"]
    assert report["action"] == "label" and report["blocked"] is None
    assert report["input"]["categories"][0]["category"] == "flagged"
    refused = client.chat.completions.create(model=run_dir.name, messages=chat("a zebracorn appears"))
    assert refused.choices[0].finish_reason == "content_filter"
    assert "forbidden" in refused.choices[0].message.content
    assert refused.model_extra["myna"]["moderation"]["blocked"] == "input"
    assert refused.usage.completion_tokens == 0
    chunks = list(
        client.chat.completions.create(model=run_dir.name, messages=chat("zebracorn!"), stream=True)
    )
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert "forbidden" in "".join(c.choices[0].delta.content or "" for c in chunks)


def test_moderation_withholds_a_reply(live, run_dir):
    """Block a word the model is known to say (its seeded reply), and the reply is withheld, streamed or not."""
    request = dict(model=run_dir.name, messages=chat("good night"), max_tokens=30, temperature=1, seed=11)
    text = live.client().chat.completions.create(**request).choices[0].message.content
    words = [w for w in text.split() if w.isalpha() and w.isascii() and len(w) >= 2]
    assert words, text
    word = words[-1]
    policy = Policy.from_dict(
        {"extends": "none", "categories": {"banned": {"action": "block", "terms": [word]}}}
    )
    server = LiveServer(create_app(run_dir, ServeConfig(policy=policy), on_load=hooks(endless=True)))
    try:
        server.wait_ready()
        client = server.client()
        r = client.chat.completions.create(**request)
        content = r.choices[0].message.content
        assert r.choices[0].finish_reason == "content_filter"
        assert content.startswith("This reply was withheld") and "banned" in content
        assert r.model_extra["myna"]["moderation"]["blocked"] == "output"
        chunks = list(client.chat.completions.create(**request, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        assert word not in streamed.split() and "withheld" in streamed
        assert chunks[-1].model_extra["myna"]["moderation"]["output"]["categories"][0]["category"] == "banned"
    finally:
        server.stop()
