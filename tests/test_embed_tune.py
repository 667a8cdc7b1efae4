"""`myna embed-tune`: the pair miner finds each kind on a hand-made corpus, a real tuning of the tiny SFT run on
real airline dialogues and tweets ranks held-out partners higher than before and still chats, what it trains is
what Engine.embed returns, and bad input is one line that leaves --out untouched."""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import airline_dialogues, metrics, myna

from myna.data.pairs import corpus_pairs, dialogue_pairs, remove_hashtag, unique
from myna.data.pipeline import CORPUS_SCHEMA
from myna.data.schema import new_post
from myna.data.threads import write_jsonl
from myna.infer.engine import Engine
from myna.model import pad_right
from myna.runs import load_model, read_config
from myna.train.embed_tune import PairLoader, embed_tune, pooled

TUNE = {
    "steps": 40,
    "eval_every": 40,
    "lr": 3e-3,
    # the held-out side of this data has dialogue pairs only: train on the kinds it measures (the sample's few
    # tags as queries pull the tiny model elsewhere in 40 steps)
    "kinds": "reply,quote,hashtag,dialogue",
}  # the tiny model learns little at the default lr in 40 steps


def write_corpus(path: Path, posts: list[dict], splits: list[str]) -> None:
    rows = [{**p, "split": s} for p, s in zip(posts, splits, strict=True)]
    pq.write_table(pa.Table.from_pylist(rows, schema=CORPUS_SCHEMA), path)


def hand_made_posts() -> tuple[list[dict], list[str]]:
    post = new_post
    posts = [
        post("1", "the new bridge opens on monday, finally", "t:1"),
        post("2", "about time, the ferry queue was two hours", "t:2", in_reply_to_id="1"),
        post("3", "this is the best thing I have read all week", "t:3", quoted_id="4"),
        post("4", "a long essay on why trains beat planes in europe", "t:4"),
        post("5", "Loved the #KiteFest today, so many colours", "t:5"),
        post("6", "#kitefest was windy but worth it", "t:6", hashtags=["kitefest"]),
        *(post(f"c{i}", f"common tag post number {i} #news", f"t:c{i}") for i in range(12)),
        post("7", "a reply across the split", "t:7", in_reply_to_id="8"),
        post("8", "a held-out post", "t:8"),
    ]
    return posts, ["train"] * (len(posts) - 1) + ["val"]


def test_pair_miner_finds_each_kind(tmp_path):
    posts, splits = hand_made_posts()
    write_corpus(tmp_path / "corpus.parquet", posts, splits)
    corpus = pq.read_table(tmp_path / "corpus.parquet").to_pydict()
    pairs, dropped = corpus_pairs(corpus, max_tag_posts=10)
    found = {(p.kind, p.a, p.b) for p in pairs["train"]}
    assert ("reply", posts[0]["text"], posts[1]["text"]) in found
    assert ("quote", posts[3]["text"], posts[2]["text"]) in found
    # the rare tag pairs its two posts with the tag gone, whatever its case; #news (12 posts) is too common
    assert ("hashtag", "Loved the today, so many colours", "was windy but worth it") in found
    # each tag's words as a search query, against each post that carries it (at most 8 of #news's 12)
    queries = {(p.a, p.b) for p in pairs["train"] if p.kind == "query"}
    assert ("kite fest", "Loved the today, so many colours") in queries and (
        "kitefest",
        "was windy but worth it",
    ) not in queries
    assert ("news", "common tag post number 0") in queries and sum(a == "news" for a, _ in queries) == 8
    assert {p.kind for p in pairs["train"]} == {"reply", "quote", "hashtag", "query"} and len(
        found
    ) == 3 + len(queries)
    assert dropped == {"cross_split_reply": 1} and not pairs.get("val")
    assert remove_hashtag("#Tag and #tagged, #TAG.", "tag") == "and #tagged, ."

    dialogue = {"messages": [{"role": "system", "content": "be kind"}]}
    dialogue["messages"] += [
        {"role": r, "content": f"turn {i}"} for i, r in enumerate(["user", "assistant"] * 2)
    ]
    turns = dialogue_pairs([dialogue, dialogue], ["x", "x"], [False, True])
    assert [(p.a, p.b) for p in turns["train"]] == [
        ("turn 0", "turn 1"),
        ("turn 1", "turn 2"),
        ("turn 2", "turn 3"),
    ]
    assert len(turns["val"]) == 3 and len(unique(turns["train"] + turns["train"])) == 3


def test_batches_never_repeat_a_text_or_group():
    posts, _ = hand_made_posts()
    pairs, _ = corpus_pairs({**pq_columns(posts), "split": ["train"] * len(posts)}, max_tag_posts=20)
    pairs = pairs["train"]  # a reply, a quote, #kitefest's pair and six pairs of #news's twelve posts
    loader = PairLoader(pairs, [([1, i], [1, i, i]) for i in range(len(pairs))], 3, 0, seed=0)
    for epoch in range(3):
        batches = loader.stream.items(epoch)
        for batch in batches:
            keys = [k for i in batch for k in loader.keys[i]]
            assert 2 <= len(batch) <= 3 and len(keys) == len(set(keys))
        seen = [pairs[i] for batch in batches for i in batch]
        assert {p for p in pairs if p.group != "hashtag:news"} <= set(seen)
        assert sum(p.group == "hashtag:news" for p in seen) == len(batches)  # one a batch, the rest wait
    idx, lengths = next(loader)
    assert idx.shape[0] == 2 * len(loader.stream.items(0)[0]) and lengths.tolist()[:1] == [2]


def pq_columns(posts: list[dict]) -> dict:
    return {k: [p[k] for p in posts] for k in ("id", "text", "in_reply_to_id", "quoted_id", "hashtags")}


@pytest.fixture(scope="module")
def tune_data(sample_data: Path, tmp_path_factory) -> Path:
    """The sample's corpus (tweets: hashtag pairs) and 800 real airline dialogues (post/reply turns)."""
    data = tmp_path_factory.mktemp("embed") / "data"
    data.mkdir()
    shutil.copy(sample_data / "corpus.parquet", data / "corpus.parquet")
    write_jsonl(data / "dialogues.jsonl", airline_dialogues(0, 800))
    return data


@pytest.mark.slow
def test_embed_tune_improves_retrieval_and_still_chats(sft_run: Path, tune_data: Path, tmp_path):
    out = tmp_path / "tuned"
    summary = embed_tune(sft_run, tune_data, out, **TUNE)
    before, after = summary["before"], summary["after"]
    assert after["val_mrr"] > before["val_mrr"] and after["val_recall_at_1"] >= before["val_recall_at_1"]
    assert summary["chat_loss_rise"] <= 0.05  # the held-out assistant loss may not rise more than this
    assert summary["pairs"]["train"]["dialogue"] > 1000 and summary["pairs"]["train"]["hashtag"] > 0

    records = metrics(out)
    assert records[0]["step"] == 0 and records[0]["val_mrr"] == before["val_mrr"]
    assert records[0]["pairs_dialogue"] == summary["pairs"]["train"]["dialogue"]
    assert records[-1]["step"] == TUNE["steps"] and "contrastive" in records[-1]
    config = read_config(out)
    assert config["stage"] == "embed-tune" and Path(config["base"]).parent.parent == sft_run

    # what training pools is what the engine embeds
    loaded = load_model(out)
    ids = [loaded.tokenizer.document(t) for t in ("my bag is lost", "thanks, that helped a lot #happy")]
    idx, lengths = pad_right(ids, loaded.tokenizer.pad_id)
    with torch.no_grad():
        trained = pooled(loaded.model.hidden(idx), lengths)
    with Engine(loaded.model, loaded.tokenizer, max_batch=2) as engine:
        torch.testing.assert_close(trained, engine.embed(ids))

    # every verb takes the tuned run: it still generates a reply
    result = myna("generate", "--ckpt", str(out), "--prompt", "my flight is late", "--chat", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["completion_tokens"] > 0


@pytest.mark.slow
def test_bad_input_is_one_line_and_leaves_out_alone(sft_run: Path, tmp_path):
    (tmp_path / "empty").mkdir()
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    write_corpus(lonely / "corpus.parquet", [new_post("1", "no partner here", "t:1")], ["train"])
    cases = {
        tmp_path / "missing": "no such data directory",
        tmp_path / "empty": "corpus.parquet: missing",
        lonely: "no training pairs found",
    }
    for data, message in cases.items():
        with pytest.raises((FileNotFoundError, ValueError), match=message):
            embed_tune(sft_run, data, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    result = myna("embed-tune", "--ckpt", str(sft_run), "--data", str(lonely), "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and not (tmp_path / "out").exists()
    assert result.stderr.strip().count("\n") == 0 and "no training pairs found" in result.stderr
