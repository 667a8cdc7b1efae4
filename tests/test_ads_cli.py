"""`myna ads` as a user runs it: match with a recorded impression and its click, brand-safety records, ad copy, the
offline evaluation, and the one-line errors of bad input. One run in a fresh interpreter; the rest call the same
entry point in this process (a fresh interpreter per command spends its time importing torch)."""

import gzip
import itertools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import SAMPLE, myna

from myna.cli import main
from myna.data import readers
from myna.eval.settings import TWEETEVAL_DIR

INVENTORY = SAMPLE / "ads" / "inventory.jsonl"


def run(capsys, *argv: str) -> str:
    """`myna ARGV...` in this process; its stdout."""
    capsys.readouterr()
    main(list(argv))
    return capsys.readouterr().out


@pytest.mark.slow
def test_match_record_and_click(base_run: Path, tmp_path: Path, capsys):
    log = tmp_path / "log"
    args = ["--inventory", str(INVENTORY), "--ckpt", str(base_run), "--log", str(log), "--lang", "en"]
    coffee = ["--text", "espresso and coffee beans #coffee"]
    # as a user runs it: a fresh interpreter, JSON out
    r = myna("ads", "match", *args, *coffee, "--user", "u1", "--record", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["winner"]["ad"].startswith("brewhaus-") and result["impression_id"]
    assert run(capsys, "ads", "click", "--log", str(log), "--impression", result["impression_id"]).strip()
    # the table a person reads: the winner and every candidate's fate
    shown = run(capsys, "ads", "match", *args, *coffee)
    assert "winner brewhaus-" in shown and "same_campaign" in shown


def test_safety_records_and_copy(base_run: Path, capsys):
    out = run(
        capsys,
        "ads",
        "safety",
        "--ckpt",
        str(base_run),
        "--text",
        "lovely morning",
        "--text",
        "fuck this",
        "--json",
    )
    calm, rude = json.loads(out)
    assert calm["tier"] == "low" and rude["tier"] != "low" and "obscenity_and_profanity" in rude["rule"]
    assert "hate_speech" in rude["unscored"]  # the base run has no safety classifiers: said, not passed
    brief = ["--brief", "fresh coffee", "--brand", "Brewhaus", "-n", "2", "--json"]
    written = json.loads(run(capsys, "ads", "write", "--ckpt", str(base_run), *brief))
    assert len(written["variants"]) == len(written["accepted"]) + sum(written["rejected"].values())


def small_tweeteval(root: Path, lines: int = 60) -> Path:
    """The bundled TweetEval's hate and offensive tasks cut to their first test lines (the scoring, not the data,
    is under test here)."""
    for task in ("hate", "offensive"):
        (root / task).mkdir(parents=True)
        (root / task / "mapping.txt").write_bytes((TWEETEVAL_DIR / task / "mapping.txt").read_bytes())
        for part in ("text", "labels"):
            with gzip.open(TWEETEVAL_DIR / task / f"test_{part}.txt.gz", "rt", encoding="utf-8") as f:
                head = "".join(itertools.islice(f, lines))
            (root / task / f"test_{part}.txt").write_text(head, encoding="utf-8")
    return root


def test_eval_reports_matching_and_safety(base_run: Path, tmp_path: Path, capsys):
    # held-out posts with hashtags: real CrisisLex tweets, all on the held-out side
    rows = [r for r in itertools.islice(readers.read_posts(SAMPLE / "posts" / "crisislex_t26.csv.gz"), 3000)]
    posts = [{"id": r["id"], "text": r["text"], "split": "val"} for r in rows if isinstance(r, dict)]
    pq.write_table(pa.Table.from_pylist(posts), tmp_path / "corpus.parquet")
    tweeteval = small_tweeteval(tmp_path / "tweeteval")
    argv = ["--ckpt", str(base_run), "--data", str(tmp_path), "--log", str(tmp_path), "--posts", "200"]
    result = json.loads(run(capsys, "ads", "eval", *argv, "--tweeteval", str(tweeteval)))
    matching = result["matching"]
    assert matching["topics"] >= 2 and set(matching["matchers"]) == {"keyword-only", "myna"}
    for scores in matching["matchers"].values():
        assert 0 <= scores["precision@1"] <= 1 and 0 <= scores["ndcg@5"] <= 1
    safety = result["brand_safety"]
    assert safety["posts"] == 200 and abs(sum(safety["tier_share"].values()) - 1) < 1e-3
    assert safety["f1"]["hate_speech"]["labels"] == "TweetEval hate test (60 posts)"


def test_bad_inventory_is_one_line_naming_the_line_and_field(base_run: Path, tmp_path: Path, capsys):
    bad = tmp_path / "inv.jsonl"
    bad.write_text(INVENTORY.read_text().replace('"bid": 0.45', '"bid": -1', 1))
    with pytest.raises(SystemExit) as e:
        run(capsys, "ads", "match", "--inventory", str(bad), "--ckpt", str(base_run), "--text", "coffee")
    assert f"{bad}:1: bid" in str(e.value) and "nothing loaded" in str(e.value)
    feed = ["--text", "x", "--kind", "feed", "--slot", "5"]
    with pytest.raises(SystemExit) as e:
        run(capsys, "ads", "match", "--ckpt", str(base_run), "--inventory", str(INVENTORY), *feed)
    assert "slot: a feed position 0..1" in str(e.value)
