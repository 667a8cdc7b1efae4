"""End-to-end: real sample files (plus deliberately bad ones) through every stage of `myna data prepare`."""

import csv
import gzip
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest

from myna.data import pipeline
from myna.data.dedup import DedupConfig, dedup
from myna.data.shards import read_shard
from myna.tokenizer import Tokenizer

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"


def _head_lines(src: Path, dst: Path, n: int) -> int:
    """Copy the first n lines of a (gzipped) sample file; returns how many were copied."""
    opener = gzip.open if src.suffix == ".gz" else open
    with (
        opener(src, "rt", encoding="utf-8", newline="") as f,
        open(dst, "w", encoding="utf-8", newline="") as out,
    ):
        lines = [line for _, line in zip(range(n), f, strict=False)]
        out.writelines(lines)
    return len(lines)


def run_myna(*args: str) -> subprocess.CompletedProcess:
    """The `myna` command as a user runs it, in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "myna", *args], capture_output=True, text=True, timeout=300)


def run_myna_as_user(*args: str) -> subprocess.CompletedProcess:
    """`myna` for whom file modes count: root reads any file, so as root it runs without the capabilities that let
    it (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    if os.geteuid() != 0:
        return run_myna(*args)
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv is missing: cannot make a file unreadable")
    drop = "--bounding-set=-dac_override,-dac_read_search"
    run = subprocess.run(
        ["setpriv", drop, sys.executable, "-m", "myna", *args], capture_output=True, text=True, timeout=300
    )
    if run.stderr.startswith("setpriv:"):
        pytest.skip(f"setpriv cannot drop capabilities here: {run.stderr.strip()}")
    return run


def png(width: int = 16, height: int = 16) -> bytes:
    """A real (grey gradient) PNG image: the kind of file a dump folder holds beside its posts."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = b"".join(b"\x00" + bytes(range(0, 256, 256 // width)) for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, dict]:
    """A small mixed input folder: text, CSV, v1.1, v2, archive, conversations, JSON arrays of posts and of
    conversations, three files with broken records, and three files that are no post format."""
    d = tmp_path_factory.mktemp("raw")
    expected = {}
    expected["text"] = _head_lines(SAMPLE / "posts" / "sentiment140_positive.txt.gz", d / "s140.txt", 3000)
    expected["csv"] = _head_lines(SAMPLE / "posts" / "crisislex_t26.csv.gz", d / "crisis.csv", 1501) - 1
    for name in ("v1/get_search.json", "v2/geo_tweets.jsonl", "archive/tweet.js"):
        src = SAMPLE / "api" / name
        (d / src.name).write_bytes(src.read_bytes())
    conv = sorted((SAMPLE / "conversations").glob("*.conversations.jsonl*"))[0]
    expected["conversations"] = _head_lines(conv, d / "conv.conversations.jsonl", 200)
    # near-duplicate pairs: a real post from 2019 and a lightly edited copy from 2026 (which would land in val if
    # it survived); dedup must keep the 2019 post and drop the copy
    lines = [line.strip() for line in (d / "s140.txt").read_text().splitlines()]
    # one post per opening (after a leading handle): spam templates like "@x Get 100 followers a day" would be
    # near-duplicates of each other, and only the first of them would rightly survive
    openings = {" ".join(line.split()[1:6]): line for line in reversed(lines) if len(line.split()) >= 12}
    long_posts = list(openings.values())[:30]
    with open(d / "planted.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["tweet_id", "created_at", "text"])
        for i, text in enumerate(long_posts):
            w.writerow([f"9{i:03d}1", "2019-05-01T10:00:00Z", text])
            w.writerow([f"9{i:03d}2", "2026-05-01T10:00:00Z", text + " !!"])
    expected["planted"] = len(long_posts)
    (d / "broken.jsonl").write_bytes(b'{"id": "1", "text": "fine"}\n{not json\n{"id": "3"}\n')
    (d / "empty.txt").write_bytes(b"")
    (d / "badutf8.txt").write_bytes(b"good line\n\xff\xfe bad bytes\n")
    # JSON arrays as json.dump(records, f, indent=2) writes them: Myna posts, and conversations
    array_posts = [
        {"id": f"a{i}", "text": text, "source": f"export:{i}", "lang": "en"}
        for i, text in enumerate(lines[:40])
    ]
    (d / "posts.json").write_text(json.dumps(array_posts, indent=2))
    expected["array_posts"] = array_posts
    conversations = [orjson.loads(line) for line in gzip.decompress(conv.read_bytes()).splitlines()[200:230]]
    (d / "more_conversations.json").write_text(json.dumps(conversations, indent=2))
    expected["conversations"] += len(conversations)
    # what a real dump folder also holds: an image, a file whose first line is not JSON, and a table of numbers
    (d / "photo.png").write_bytes(png())
    (d / "notes.json").write_text("exported by hand, see below\n" + json.dumps(array_posts[:2]))
    (d / "scores.csv").write_text("".join(f"{i},{i * 7},{i % 3}\n" for i in range(100)))
    expected["files"] = len(list(d.iterdir()))
    return d, expected


@pytest.fixture(scope="module")
def prepared(inputs, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    cfg = pipeline.PrepareConfig(vocab_size=512, workers=2)
    summary = pipeline.prepare([inputs[0]], out, cfg)
    return out, summary


def test_funnel_adds_up_and_counts_every_input_record(prepared, inputs):
    out, summary = prepared
    funnel = json.loads((out / "funnel.json").read_text())
    assert funnel == summary["funnel"]
    assert funnel["input"] == funnel["kept"] + sum(funnel["dropped"].values()) + funnel["rejected"]
    # every line of the text and CSV files is one input record; the API files add more
    assert funnel["input"] > inputs[1]["text"] + inputs[1]["csv"]
    assert funnel["kept"] == pq.ParquetFile(out / "corpus.parquet").metadata.num_rows
    # the text sample repeats lines, CrisisLex has retweets: both must show up as reasons
    assert funnel["dropped"].get("exact_duplicate", 0) > 0
    assert funnel["dropped"].get("repost", 0) > 0
    assert funnel["conversations"]["kept"] == inputs[1]["conversations"]
    n_files = inputs[1]["files"]
    assert funnel["files"] == {"input": n_files, "read": n_files - 3, "rejected": 3}


def test_bad_records_are_rejected_with_file_line_and_reason(prepared):
    out, _ = prepared
    rejects = [orjson.loads(line) for line in (out / "rejects.jsonl").read_bytes().splitlines()]
    by_file = {}
    for r in rejects:
        by_file.setdefault(Path(r["file"]).name, []).append(r)
    assert sorted(r["line"] for r in by_file["broken.jsonl"]) == [2, 3]
    assert all(r["reason"] for r in rejects)
    assert [r["line"] for r in by_file["badutf8.txt"]] == [2]
    assert "empty.txt" not in by_file  # an empty file is no error and yields nothing
    [photo] = by_file["photo.png"]
    assert photo["scope"] == "file" and photo["reason"].startswith("binary content, not a post format")
    [notes] = by_file["notes.json"]
    assert notes["scope"] == "file" and notes["reason"].startswith(".json file does not start with JSON")
    [scores] = by_file["scores.csv"]  # none of its 100 rows can be read: one file rejected, not one record
    assert scores["scope"] == "file" and scores["reason"].startswith("headerless CSV with 3 columns")
    assert "posts.json" not in by_file and "more_conversations.json" not in by_file


def test_json_arrays_are_read_as_records(prepared, inputs):
    out, summary = prepared
    posts = {p["id"]: p for p in pipeline.read_parts(out / "posts").to_pylist()}
    for post in inputs[1]["array_posts"]:
        assert {k: posts[post["id"]][k] for k in post} == post
    arrays = {Path(f).name: info for f, info in summary["ingest"]["files"].items()}
    assert arrays["posts.json"] == {"format": "jsonl", "ok": 40, "rejected": 0}
    assert arrays["more_conversations.json"] == {"format": "conversations", "ok": 30, "rejected": 0}


def test_corpus_split_is_temporal_and_shards_decode_back_to_the_corpus(prepared):
    out, summary = prepared
    corpus = pq.read_table(out / "corpus.parquet")
    split = np.array(corpus.column("split").to_pylist())
    assert set(split) == {"train", "val"}
    times = corpus.column("created_at").to_pylist()
    val_times = [t for t, s in zip(times, split, strict=True) if s == "val" and t is not None]
    train_times = [t for t, s in zip(times, split, strict=True) if s == "train" and t is not None]
    assert val_times and min(val_times) >= max(train_times)  # timestamped posts: the latest are val
    untimed_val = [s for t, s in zip(times, split, strict=True) if t is None and s == "val"]
    assert 0 < len(untimed_val) < 0.1 * len(split)  # the rest: a seeded random share

    tok = Tokenizer.from_file(out / "tokenizer.json")
    for name in ("train", "val"):
        tokens = np.concatenate(
            [np.asarray(read_shard(p)) for p in sorted((out / "shards" / name).glob("*.bin"))]
        )
        docs = [tok.decode(d.tolist()) for d in np.split(tokens, np.flatnonzero(tokens == tok.bos_id))[1:]]
        texts = [t for t, s in zip(corpus.column("text").to_pylist(), split, strict=True) if s == name]
        assert [d.removeprefix("<|bos|>") for d in docs] == texts
        assert summary["shards"][name]["docs"] == len(texts)


def test_near_duplicates_are_gone_and_none_crosses_the_split(prepared, inputs):
    out, _ = prepared
    corpus = pq.read_table(out / "corpus.parquet")
    ids = set(corpus.column("id").to_pylist())
    n = inputs[1]["planted"]
    assert n >= 20
    assert not any(f"9{i:03d}2" in ids for i in range(n))  # no later copy survives
    assert sum(f"9{i:03d}1" in ids for i in range(n)) >= n - 2  # the originals do (bar a clean filter)
    # the corpus holds no near-duplicate pair any more, so none can cross the train/val split
    again = dedup(corpus, DedupConfig())
    assert again.keep.all(), again.dropped


def test_dialogues_and_prefs_are_written(prepared, inputs):
    out, summary = prepared
    dialogues = [orjson.loads(line) for line in (out / "dialogues.jsonl").read_bytes().splitlines()]
    made = summary["threads"]["dialogues_calling_search"]  # one per hashtag of 3+ training posts
    assert made > 0 and sum("tool_calls" in d["messages"][1] for d in dialogues) == made
    assert len(dialogues) == summary["threads"]["dialogues_from_threads"] + inputs[1]["conversations"] + made
    for d in dialogues:
        roles = [m["role"] for m in d["messages"] if m["role"] != "system"]
        assert len(roles) >= 2 and roles[-1] == "assistant"
    assert (out / "prefs.jsonl").exists()


# A run killed mid-write: every kind of atomic write open at once, then SIGKILL (no cleanup handler runs).
KILLED_MID_WRITE = """
import os, signal, sys
from pathlib import Path
from myna.io import atomic_dir, atomic_path, atomic_write
out = Path(sys.argv[1])
with (
    atomic_dir(out / "posts") as posts,
    atomic_write(out / "rejects.jsonl") as rejects,
    atomic_path(out / "corpus.parquet"),
    atomic_dir(out / "shards" / "train"),
    atomic_write(out / ".stages" / "tokenize.json"),
):
    (posts / "part-00000.parquet").write_bytes(b"half a part")
    rejects.write(b"half a line")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_next_run_removes_what_a_killed_run_left(prepared, inputs):
    out, _ = prepared
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_MID_WRITE, str(out)], capture_output=True, timeout=60
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(list(out.rglob("*.tmp"))) == 5  # one per write
    (out / ".clean.old-4242").mkdir()  # atomic_dir killed between its two renames
    users = [
        out / "notes.tmp",
        out / ".posts.tmp",
        out / "posts.abcdefgh.tmp",
        out / "shards" / ".train.my-copy.tmp",
    ]
    for p in users:
        p.write_text("the user's, not Myna's")
    summary = pipeline.prepare([inputs[0]], out, pipeline.PrepareConfig(vocab_size=512, workers=2))
    assert sorted(p for p in out.rglob("*") if p.name.endswith(".tmp") or ".old-" in p.name) == sorted(users)
    assert summary["funnel"] == json.loads((out / "funnel.json").read_text())
    assert pq.ParquetFile(out / "corpus.parquet").metadata.num_rows == summary["funnel"]["kept"]


def test_rerun_skips_fresh_stages_and_redoes_changed_ones(prepared, inputs):
    out, _ = prepared
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / ".stages").iterdir()}
    corpus_mtime = (out / "corpus.parquet").stat().st_mtime_ns
    cfg = pipeline.PrepareConfig(vocab_size=512, workers=1)
    pipeline.prepare([inputs[0]], out, cfg)
    assert {p.name: p.stat().st_mtime_ns for p in (out / ".stages").iterdir()} == stamps
    assert (out / "corpus.parquet").stat().st_mtime_ns == corpus_mtime
    cfg.val_fraction = 0.05  # changes the dedup+split stage and everything after it, not ingest or clean
    pipeline.prepare([inputs[0]], out, cfg)
    after = {p.name: p.stat().st_mtime_ns for p in (out / ".stages").iterdir()}
    assert after["ingest.json"] == stamps["ingest.json"] and after["clean.json"] == stamps["clean.json"]
    assert after["dedup.json"] != stamps["dedup.json"] and after["tokenize.json"] != stamps["tokenize.json"]


def test_a_crash_mid_stage_keeps_finished_work(inputs, tmp_path, monkeypatch):
    cfg = pipeline.PrepareConfig(vocab_size=300, workers=1)
    pipeline.ingest([inputs[0]], tmp_path, cfg)
    pipeline.clean(tmp_path, cfg)
    posts_before = [p.read_bytes() for p in sorted((tmp_path / "posts").iterdir())]

    def boom(*a, **k):
        raise RuntimeError("killed mid-stage")

    monkeypatch.setattr(pipeline, "dedup", boom)
    with pytest.raises(RuntimeError):
        pipeline.prepare([inputs[0]], tmp_path, cfg)
    assert [p.read_bytes() for p in sorted((tmp_path / "posts").iterdir())] == posts_before
    assert not (tmp_path / "corpus.parquet").exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.undo()
    summary = pipeline.prepare([inputs[0]], tmp_path, cfg)
    assert summary["funnel"]["kept"] > 0


def test_cli_reports_a_missing_input(tmp_path):
    bad = run_myna("data", "prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "x"))
    assert bad.returncode != 0 and "input not found" in bad.stderr


def test_cli_ingest_with_a_csv_column_mapping(tmp_path):
    rows = [line for line in (SAMPLE / "posts" / "PROVENANCE.md").read_text().splitlines() if line.strip()][
        :5
    ]
    with open(tmp_path / "dump.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["uid", "when", "msg"])
        for i, text in enumerate(rows):
            w.writerow([f"u{i}", f"2024-01-0{i + 1}T00:00:00Z", text])
    run = run_myna(
        "data",
        "ingest",
        str(tmp_path / "dump.csv"),
        "--out",
        str(tmp_path / "d"),
        "--csv-columns",
        "id=uid,created_at=when,text=msg",
        "--workers",
        "1",
    )
    assert run.returncode == 0, run.stderr
    posts = pipeline.read_parts(tmp_path / "d" / "posts").to_pylist()
    assert [p["text"] for p in posts] == rows
    assert [p["id"] for p in posts] == [f"u{i}" for i in range(len(rows))]
    assert posts[2]["created_at"].day == 3
    bad = run_myna(
        "data", "ingest", str(tmp_path / "dump.csv"), "--out", str(tmp_path / "e"), "--csv-columns", "text"
    )
    assert bad.returncode != 0 and "FIELD=COLUMN" in bad.stderr


def test_cli_strict_stops_at_the_first_file_that_is_not_posts(inputs, tmp_path):
    run = run_myna(
        "data", "ingest", str(inputs[0]), "--out", str(tmp_path / "d"), "--strict", "--workers", "1"
    )
    assert run.returncode != 0 and "Traceback" not in run.stderr
    notes = inputs[0] / "notes.json"  # the first of the two in file order
    assert (
        run.stderr.strip()
        .splitlines()[-1]
        .startswith(f"myna data: error: {notes}: .json file does not start with JSON")
    )
    assert not (tmp_path / "d" / "posts").exists()  # nothing half-written


def test_an_unreadable_file_is_rejected_by_name_or_stops_a_strict_run(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    n = _head_lines(SAMPLE / "posts" / "sentiment140_positive.txt.gz", raw / "s140.txt", 50)
    locked = raw / "locked.jsonl"
    locked.write_bytes(b'{"id": "1", "text": "mine", "source": "x"}\n')
    locked.chmod(0)
    run = run_myna_as_user("data", "ingest", str(raw), "--out", str(tmp_path / "d"), "--workers", "1")
    assert run.returncode == 0, run.stderr
    rejects = [orjson.loads(line) for line in (tmp_path / "d" / "rejects.jsonl").read_bytes().splitlines()]
    reason = "cannot read: Permission denied"
    assert rejects == [{"stage": "ingest", "scope": "file", "file": str(locked), "reason": reason}]
    assert len(pipeline.read_parts(tmp_path / "d" / "posts")) == n
    strict = run_myna_as_user("data", "ingest", str(raw), "--out", str(tmp_path / "e"), "--strict")
    assert strict.returncode != 0 and "Traceback" not in strict.stderr
    assert strict.stderr.strip().splitlines()[-1] == f"myna data: error: {locked}: {reason}"


def test_a_run_where_every_file_is_rejected_fails(tmp_path):
    (tmp_path / "photo.png").write_bytes(png())
    with pytest.raises(ValueError, match=r"no input file could be read as posts \(1 rejected\).*photo\.png"):
        pipeline.ingest([tmp_path / "photo.png"], tmp_path / "d")
    assert not (tmp_path / "d" / "posts").exists()
