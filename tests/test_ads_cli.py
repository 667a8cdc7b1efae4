"""`myna ads` as a user runs it, in fresh interpreters: match with a recorded impression and its click, brand-safety
records, ad copy, the offline evaluation, and the one-line errors of bad input."""

import itertools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import SAMPLE, myna

from myna.data import readers

INVENTORY = SAMPLE / "ads" / "inventory.jsonl"


@pytest.mark.slow
def test_match_record_and_click(base_run: Path, tmp_path: Path):
    log = tmp_path / "log"
    args = ["--inventory", str(INVENTORY), "--ckpt", str(base_run), "--log", str(log), "--lang", "en"]
    r = myna(
        "ads",
        "match",
        *args,
        "--text",
        "espresso and coffee beans #coffee",
        "--user",
        "u1",
        "--record",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["winner"]["ad"].startswith("brewhaus-") and result["impression_id"]
    clicked = myna("ads", "click", "--log", str(log), "--impression", result["impression_id"])
    assert clicked.returncode == 0 and clicked.stdout.strip(), clicked.stderr
    # the table a person reads: the winner and every candidate's fate
    shown = myna("ads", "match", *args, "--text", "espresso and coffee beans #coffee")
    assert shown.returncode == 0 and "winner brewhaus-" in shown.stdout and "same_campaign" in shown.stdout


@pytest.mark.slow
def test_safety_records_and_copy(base_run: Path):
    r = myna(
        "ads", "safety", "--ckpt", str(base_run), "--text", "lovely morning", "--text", "fuck this", "--json"
    )
    assert r.returncode == 0, r.stderr
    calm, rude = json.loads(r.stdout)
    assert calm["tier"] == "low" and rude["tier"] != "low" and "obscenity_and_profanity" in rude["rule"]
    assert "hate_speech" in rude["unscored"]  # the base run has no safety classifiers: said, not passed
    w = myna(
        "ads",
        "write",
        "--ckpt",
        str(base_run),
        "--brief",
        "fresh coffee",
        "--brand",
        "Brewhaus",
        "-n",
        "2",
        "--json",
    )
    assert w.returncode == 0, w.stderr
    written = json.loads(w.stdout)
    assert len(written["variants"]) == len(written["accepted"]) + sum(written["rejected"].values())


@pytest.mark.slow
def test_eval_reports_matching_and_safety(base_run: Path, tmp_path: Path):
    # held-out posts with hashtags: real CrisisLex tweets, all on the held-out side
    rows = [r for r in itertools.islice(readers.read_posts(SAMPLE / "posts" / "crisislex_t26.csv.gz"), 3000)]
    posts = [{"id": r["id"], "text": r["text"], "split": "val"} for r in rows if isinstance(r, dict)]
    pq.write_table(pa.Table.from_pylist(posts), tmp_path / "corpus.parquet")
    r = myna(
        "ads",
        "eval",
        "--ckpt",
        str(base_run),
        "--data",
        str(tmp_path),
        "--log",
        str(tmp_path),
        "--posts",
        "200",
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    matching = result["matching"]
    assert matching["topics"] >= 2 and set(matching["matchers"]) == {"keyword-only", "myna"}
    for scores in matching["matchers"].values():
        assert 0 <= scores["precision@1"] <= 1 and 0 <= scores["ndcg@5"] <= 1
    assert (
        result["brand_safety"]["posts"] == 200
        and abs(sum(result["brand_safety"]["tier_share"].values()) - 1) < 1e-3
    )


def test_bad_inventory_is_one_line_naming_the_line_and_field(base_run: Path, tmp_path: Path):
    bad = tmp_path / "inv.jsonl"
    bad.write_text(INVENTORY.read_text().replace('"bid": 0.45', '"bid": -1', 1))
    r = myna("ads", "match", "--inventory", str(bad), "--ckpt", str(base_run), "--text", "coffee")
    assert r.returncode == 1 and f"{bad}:1: bid" in r.stderr and "nothing loaded" in r.stderr
    r = myna(
        "ads",
        "match",
        "--ckpt",
        str(base_run),
        "--inventory",
        str(INVENTORY),
        "--text",
        "x",
        "--kind",
        "feed",
        "--slot",
        "5",
    )
    assert r.returncode == 1 and "slot: a feed position 0..1" in r.stderr
