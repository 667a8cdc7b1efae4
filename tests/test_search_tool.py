"""The search tool in the chat: dialogues made from the corpus's hashtags, the call parsed from what a model writes,
and a tiny model tuned on the made dialogues calling search from `ChatSession`, the call running on a real index
and the answer's citations checked against what it returned."""

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import myna
from live_server import KEY, LiveServer, error_of

from myna.data.threads import write_jsonl
from myna.infer.chat import ChatSession, Turn, parse_call
from myna.infer.engine import Engine, SamplingParams
from myna.moderation import Policy
from myna.runs import load_model
from myna.search.ask import search_tool
from myna.search.index import SearchIndex, load_embedder
from myna.search.tool import TOOL, check_citations, tool_dialogues
from myna.serve.api import create_app
from myna.serve.config import ServeConfig
from myna.template import render
from myna.train.sft import sft


def corpus(rows: list[tuple]) -> dict[str, list]:
    """Columns of corpus.parquet from (id, text, hashtags, split, day of January 2024)."""
    cols = {k: [] for k in ("id", "author_id", "created_at", "text", "hashtags", "split")}
    for i, text, tags, split, day in rows:
        cols["id"].append(i)
        cols["author_id"].append(f"user{i}")
        cols["created_at"].append(datetime(2024, 1, day, tzinfo=UTC))
        cols["text"].append(text)
        cols["hashtags"].append(tags)
        cols["split"].append(split)
    return cols


def test_dialogues_from_hashtags():
    rows = [
        ("1", "Loved the #KiteFest today https://t.co/x", [], "train", 1),
        ("2", "#kitefest was windy", [], "train", 3),
        ("3", "so many kites", ["KiteFest"], "train", 2),
        ("4", "only two posts carry #rare", [], "train", 1),
        ("5", "#rare again", [], "train", 1),
        *((f"v{i}", "held out #KiteFest #held", [], "val", 1) for i in range(4)),
    ]
    (d,) = tool_dialogues(corpus(rows), limit=10)  # #rare has 2 posts, #held only held-out ones
    user, call, tool, answer = d["messages"]
    assert [m["role"] for m in d["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert "kite fest" in user["content"]  # the tag's words, from how people wrote it
    assert call["content"] is None and call["tool_calls"] == [
        {"name": TOOL, "arguments": {"query": "#kitefest"}}
    ]
    lines = tool["content"].splitlines()
    assert [line[:3] for line in lines] == ["[1]", "[2]"]  # the newest two, newest first
    assert "@user2 (2024-01-03): #kitefest was windy" in lines[0] and "@user3 (2024-01-02)" in lines[1]
    text, cited, removed = check_citations(answer["content"], len(lines))
    assert cited == [1, 2] and removed == 0 and text == answer["content"]


@pytest.mark.parametrize(
    "written, expected",
    [
        (
            '{"name": "search", "arguments": {"query": "#floods"}}',
            {"name": "search", "arguments": {"query": "#floods"}},
        ),
        (
            '{"name": "search", "arguments": "{\\"query\\": \\"x\\"}"}',
            {"name": "search", "arguments": {"query": "x"}},
        ),
        ('{"name": "search", "arguments": {"query": ', {"error": "not JSON"}),
        ('["search"]', {"error": "expected"}),
        ('{"name": "search", "arguments": [1]}', {"error": "arguments: expected an object"}),
    ],
)
def test_parse_call(written, expected):
    found = parse_call(written)
    if "error" in expected:
        assert set(found) == {"error"} and expected["error"] in found["error"]
    else:
        assert found == expected


@pytest.mark.slow
def test_tuned_model_calls_search_and_cites(tool_run: Path, sample_data: Path, serve_index: Path):
    loaded = load_model(tool_run)
    tok = loaded.tokenizer
    made = [
        json.loads(x)
        for x in (sample_data / "dialogues.jsonl").read_text().splitlines()
        if '"tool_calls"' in x
    ]
    rendered = render(made[0]["messages"], tok)
    call_id = tok.special_ids[tok.chat.tool_call]
    assert rendered.targets[rendered.ids.index(call_id)]  # the call is what the model learns to write

    idx = SearchIndex.open(serve_index)
    tools = {TOOL: search_tool(idx, load_embedder(idx.path, idx.meta), tok)}
    params = SamplingParams(max_tokens=40, temperature=0)
    calls = 0
    with Engine(loaded.model, tok, max_batch=1) as engine:
        for d in made[:5]:
            session = ChatSession(engine, params, tools=tools)
            turn = Turn()
            "".join(session.respond(d["messages"][0]["content"], turn))
            if not turn.tool_calls:
                continue
            calls += 1
            roles = [m["role"] for m in session.messages]
            assert roles[:3] == ["user", "assistant", "tool"] and roles[-1] == "assistant"
            assert session.messages[1]["tool_calls"][0]["name"] == TOOL
            assert any(note.startswith("searched ") for note in turn.notes)
            tool = session.messages[2]["content"]
            items = len(re.findall(r"^\[\d+\]", tool, flags=re.M))
            assert all(1 <= n <= items for n in turn.cited)  # citations of posts not returned were removed
            assert all(
                1 <= int(n) <= items for n in re.findall(r"\[(\d+)\]", session.messages[-1]["content"])
            )
    assert calls >= 3, f"the tuned model called search for {calls} of 5 questions"


def test_chat_without_tools_never_stops_at_the_call_token(sft_run: Path):
    """A session without tools leaves the tool-call token to the model's ordinary stop rules."""
    loaded = load_model(sft_run)
    with Engine(loaded.model, loaded.tokenizer, max_batch=1) as engine:
        session = ChatSession(engine, SamplingParams(max_tokens=8, temperature=0))
        assert session.call_id is None
        turn = Turn()
        "".join(session.respond("hello", turn))
        assert turn.tool_calls == [] and session.messages[-1]["role"] == "assistant"


@pytest.mark.slow
def test_cli_chat_with_index(tool_run: Path, serve_index: Path, sample_data: Path):
    made = [
        json.loads(x)
        for x in (sample_data / "dialogues.jsonl").read_text().splitlines()
        if '"tool_calls"' in x
    ]
    question = made[0]["messages"][0]["content"]
    result = myna(
        "chat",
        "--ckpt",
        str(tool_run),
        "--index",
        str(serve_index),
        "--temperature",
        "0",
        "--max-tokens",
        "40",
        stdin=question + "\n/quit\n",
    )
    assert result.returncode == 0, result.stderr
    assert "myna>" in result.stdout
    bad = myna("chat", "--ckpt", str(tool_run), "--index", str(serve_index.parent / "nope"), stdin="/quit\n")
    assert bad.returncode == 1 and "not a search index" in bad.stderr


def test_sample_dialogues_call_search(sample_data: Path):
    """data prepare writes the made dialogues after the others, and its stage summary counts them."""
    made = [x for x in (sample_data / "dialogues.jsonl").read_text().splitlines() if '"tool_calls"' in x]
    columns = ["id", "author_id", "created_at", "text", "hashtags", "split"]
    expected = tool_dialogues(
        pq.read_table(sample_data / "corpus.parquet", columns=columns).to_pydict(), 2000
    )
    assert [json.loads(x)["messages"][0] for x in made] == [d["messages"][0] for d in expected] and made
    summary = json.loads((sample_data / ".stages" / "threads.json").read_text())["summary"]
    assert summary["dialogues_calling_search"] == len(made)


SEARCH_FUNCTION = {
    "type": "function",
    "function": {
        "name": TOOL,
        "description": "search the posts",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
}


def serving(run: Path):
    server = LiveServer(create_app(run, ServeConfig(api_key=KEY, policy=Policy.off())))
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tool_server(tool_run: Path):
    yield from serving(tool_run)


@pytest.mark.slow
def test_api_tool_calls_round_trip(tool_server, sample_data: Path, serve_index: Path):
    """OpenAI's tool loop over /v1/chat/completions with the openai client: the tuned model calls search, the
    client runs it and sends the posts back as a tool message, the model answers citing them."""
    made = [
        json.loads(x)
        for x in (sample_data / "dialogues.jsonl").read_text().splitlines()
        if '"tool_calls"' in x
    ]
    client = tool_server.client()
    idx = SearchIndex.open(serve_index)
    tool = search_tool(
        idx, load_embedder(idx.path, idx.meta), load_model(tool_server.app.state.server.run_dir).tokenizer
    )
    calls = 0
    for d in made[:5]:
        messages = [d["messages"][0]]
        r = client.chat.completions.create(
            model="run", messages=messages, tools=[SEARCH_FUNCTION], max_tokens=40, temperature=0
        )
        (c,) = r.choices
        if c.finish_reason != "tool_calls":
            continue
        calls += 1
        (call,) = c.message.tool_calls
        assert call.type == "function" and call.function.name == TOOL and call.id.startswith("call_")
        query = json.loads(call.function.arguments)["query"]
        assert isinstance(query, str) and query
        result = tool.run({"query": query}, room=120)
        messages += [
            c.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": result.content},
        ]
        answer = client.chat.completions.create(model="run", messages=messages, max_tokens=40, temperature=0)
        assert answer.choices[0].message.content is not None and answer.choices[0].finish_reason in (
            "stop",
            "length",
        )
    assert calls >= 3, f"the tuned model called search for {calls} of 5 questions over the API"


@pytest.mark.slow
def test_api_tool_choice_and_stream(tool_server):
    client = tool_server.client()
    # tool_choice "none": the reply may not call, so the call token never stops it
    r = client.chat.completions.create(
        model="run",
        messages=[{"role": "user", "content": "what are people saying about the floods?"}],
        tools=[SEARCH_FUNCTION],
        tool_choice="none",
        max_tokens=8,
        temperature=0,
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason != "tool_calls"
    # a named function: the reply is that call, whatever the model would have said
    other = {
        "type": "function",
        "function": {
            "name": "lookup_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    r = client.chat.completions.create(
        model="run",
        messages=[{"role": "user", "content": "hello"}],
        tools=[SEARCH_FUNCTION, other],
        tool_choice={"type": "function", "function": {"name": "lookup_weather"}},
        max_tokens=8,
        temperature=0,
    )
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "lookup_weather"
    assert set(json.loads(call.function.arguments)) == {"city"} and r.usage.completion_tokens > 0
    # streamed: no text deltas for a forced call, then one delta with the call and finish_reason tool_calls
    chunks = list(
        client.chat.completions.create(
            model="run",
            messages=[{"role": "user", "content": "hello"}],
            tools=[SEARCH_FUNCTION],
            tool_choice="required",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.content for d in deltas)
    (called,) = [d.tool_calls for d in deltas if d.tool_calls]
    assert called[0].function.name == TOOL and "query" in json.loads(called[0].function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize(
    "body, message",
    [
        ({"tools": [{"type": "retrieval"}]}, "tools[0]: expected"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"tools": [SEARCH_FUNCTION, SEARCH_FUNCTION]}, "named twice"),
        ({"tools": "search"}, "tools: expected a list"),
        ({"tool_choice": "required"}, "tool_choice: only allowed when tools are given"),
        (
            {"tools": [SEARCH_FUNCTION], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "no tool named 'x'",
        ),
        ({"tools": [SEARCH_FUNCTION], "tool_choice": "sometimes"}, "tool_choice: expected"),
        (
            {"tools": [SEARCH_FUNCTION], "parallel_tool_calls": "yes"},
            "parallel_tool_calls: expected true or false",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": TOOL, "arguments": "{oops"}}
                        ],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.arguments: not JSON",
        ),
    ],
)
def test_api_tools_refused_with_the_field_named(live_sft, body, message):
    response = live_sft.request(
        "POST",
        "/v1/chat/completions",
        {"model": "run", "messages": [{"role": "user", "content": "hi"}], **body},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert response.status == 400, response.body
    assert message in error_of(response)["message"]


@pytest.fixture(scope="module")
def live_sft(sft_run: Path):
    yield from serving(sft_run)


def test_api_tool_call_that_misses_an_argument_is_reported(live_sft):
    """A call whose arguments lack what the schema requires is not passed off as a call."""
    strict = {
        "type": "function",
        "function": {
            "name": "book",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
                "required": ["a", "b", "zz_never_written"],
            },
        },
    }
    response = live_sft.request(
        "POST",
        "/v1/chat/completions",
        {
            "model": "run",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [strict],
            "tool_choice": "required",
            "max_tokens": 4,
        },
        headers={"Authorization": f"Bearer {KEY}"},
    )
    body = response.json()
    assert response.status == 200 and body["choices"][0]["finish_reason"] != "tool_calls"
    assert "tool_calls" not in body["choices"][0]["message"] and body["myna"]["tool_call_error"]


def test_sft_repeats_the_dialogues_that_call_a_tool(
    base_run: Path, made: list[dict], chat_data: Path, tmp_path
):
    """tool_repeat puts each training dialogue with a call in an epoch that many times; the others once."""
    data = tmp_path / "data"
    data.mkdir()
    plain = [json.loads(x) for x in (chat_data / "dialogues.jsonl").read_text().splitlines()[:10]]
    write_jsonl(data / "dialogues.jsonl", plain + made[:20])
    stats = {}
    for repeat in (1, 3):
        sft(base_run, data, tmp_path / f"run{repeat}", steps=1, tool_repeat=repeat, seq_len=256)
        stats[repeat] = json.loads((tmp_path / f"run{repeat}" / "config.json").read_text())["data_stats"]
    calling = stats[1]["tool_dialogues"]
    assert calling > 0 and stats[3]["tool_dialogues"] == 3 * calling and stats[3]["tool_repeat"] == 3
    assert stats[3]["train"] == stats[1]["train"] + 2 * calling
    with pytest.raises(ValueError, match="tool_repeat: expected 1..100"):
        sft(base_run, data, tmp_path / "bad", steps=1, tool_repeat=0)
