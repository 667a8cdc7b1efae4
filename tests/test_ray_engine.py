"""`myna data prepare --engine ray` writes what the local engine writes, on real sample files and reply trees.

One local Ray instance (bound to 127.0.0.1) runs every stage; a large text file and a large JSONL file are read in
byte ranges by several workers. Skipped only where Ray is not installed (`pip install -e '.[ray]'`).
"""

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from myna.cli import main
from myna.data import pipeline, readers, threads

ray = pytest.importorskip("ray")
from myna.data.ray_engine import RayEngine, conversation_roots  # noqa: E402

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"


def _reply_trees(texts: list[str]) -> list[dict]:
    """Myna posts forming reply trees: chains, siblings ranked by likes, a self-thread, a cycle, an orphan, a
    repeated id, a repost and an empty post; some undated, so both split rules run."""
    posts, n = [], 0

    def post(text, author, parent=None, likes=None, dated=True, **extra):
        nonlocal n
        n += 1
        p = {"id": f"t{n}", "text": text, "author_id": author, "like_count": likes, "source": f"trees:{n}"}
        if parent:
            p["in_reply_to_id"] = parent
        if dated:
            p["created_at"] = f"2024-01-{1 + n % 28:02d}T{n % 24:02d}:00:00Z"
        posts.append({**p, **extra})
        return p["id"]

    it = iter(texts)
    for tree in range(40):
        root = post(next(it), f"u{tree}", likes=3, dated=tree % 5 != 0)
        kids = [post(next(it), f"r{tree}_{k}", root, likes=(k * 7) % 23) for k in range(4)]
        deep = kids[0]
        for d in range(6 if tree % 3 == 0 else 2):
            deep = post(next(it), f"u{tree}" if d % 2 else f"r{tree}_0", deep, likes=d)
        post(next(it), f"u{tree}", root, likes=1)  # the root's author answering themselves: a self-thread
    post(next(it), "x", "t99999", likes=2)  # an orphan: its parent is not in the data
    a = post(next(it), "y", f"t{n + 2}")  # a two-post reply cycle (malformed data): no root reaches it
    post(next(it), "z", a)
    posts.append({**posts[5], "text": "the same id again, a later copy"})
    post("", "w", "t1")
    post(next(it), "v", repost_of_id="t2")
    return posts


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ray_raw")
    text = gzip.decompress((SAMPLE / "posts" / "sentiment140_positive.txt.gz").read_bytes())
    lines = text.splitlines()[:6000]
    (d / "s140.txt").write_bytes(b"\n".join(lines[:3000]) + b"\n\xff\xfe undecodable\n" + lines[3000] + b"\n")
    (d / "crisis.csv.gz").write_bytes((SAMPLE / "posts" / "crisislex_t26.csv.gz").read_bytes())
    for name in (
        "v1/get_search.json",
        "v2/geo_tweets.jsonl",
        "archive/tweet.js",
        "v1/get_home_timeline.json",
    ):
        shutil.copy(SAMPLE / "api" / name, d / Path(name).name)
    conv = sorted((SAMPLE / "conversations").glob("*.conversations.jsonl*"))[0]
    shutil.copy(conv, d / conv.name)
    texts = [line.decode() for line in lines[3001:]]
    trees = _reply_trees(texts) + [{"id": "bad", "text": 7}]  # a record the reader must reject, by line
    with open(d / "trees.jsonl", "wb") as f:
        f.writelines(json.dumps(p).encode() + b"\n" for p in trees)
    (d / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))  # no post format: rejected whole
    return d


@pytest.fixture(scope="module")
def both(inputs, tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    cfg = pipeline.PrepareConfig(vocab_size=512, workers=2, search_dialogues=50)
    local, remote = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("ray")
    summary_local = pipeline.prepare([inputs], local, cfg)
    summary_ray = pipeline.prepare(
        [inputs], remote, cfg, RayEngine(span_bytes=64 << 10, cpus=2, partitions=3)
    )
    return local, remote, summary_local, summary_ray


@pytest.fixture(scope="module", autouse=True)
def one_ray_instance():
    """One local instance for the module (the engine starts it; the CLI test finds it running)."""
    yield
    ray.shutdown()


@pytest.mark.slow
def test_large_line_files_are_read_in_spans_with_the_files_line_numbers(inputs, both):
    _, remote, _, _ = both
    names = sorted(p.name for p in (remote / "posts").glob("*.parquet"))
    assert sum("-" in n.removeprefix("part-") for n in names) >= 4  # s140.txt in spans of 64 KiB
    rejects = [json.loads(line) for line in (remote / "rejects.jsonl").read_text().splitlines()]
    bad_utf8 = next(r for r in rejects if r["file"].endswith("s140.txt"))
    assert bad_utf8["line"] == 3001  # counted across the spans before it
    assert any(r["file"].endswith("trees.jsonl") and r["reason"].startswith("text:") for r in rejects)


@pytest.mark.slow
def test_every_output_equals_the_local_engines(both):
    local, remote, summary_local, summary_ray = both
    tables = [pipeline.read_parts(d / "posts") for d in (local, remote)]
    assert tables[0].equals(tables[1])
    for name in ("corpus.parquet",):
        assert pq.read_table(local / name).equals(pq.read_table(remote / name))
    for name in ("rejects.jsonl", "conversations.jsonl", "funnel.json", "dialogues.jsonl", "prefs.jsonl"):
        assert (local / name).read_bytes() == (remote / name).read_bytes(), name
    for split in ("train", "val"):
        shards = [sorted((d / "shards" / split).glob("*.bin")) for d in (local, remote)]
        assert [p.read_bytes() for p in shards[0]] == [p.read_bytes() for p in shards[1]]
    for stage in ("clean", "dedup", "threads", "shards", "funnel"):
        a, b = summary_local[stage], summary_ray[stage]
        if isinstance(a, dict):
            a, b = (
                {k: v for k, v in a.items() if k != "seconds"},
                {k: v for k, v in b.items() if k != "seconds"},
            )
        assert a == b, stage
    funnel = summary_ray["funnel"]
    assert funnel["input"] == funnel["kept"] + sum(funnel["dropped"].values()) + funnel["rejected"]
    stats = summary_ray["threads"]["threads"]
    # the trees hold every case the stage counts: nothing here passes for want of data
    for key in ("trees", "orphan_roots", "unreachable_posts", "duplicate_ids", "reposts_skipped", "prefs"):
        assert stats[key] > 0, key
    assert summary_ray["dedup"]["dropped"]["exact_duplicate"] > 0
    assert summary_ray["dedup"]["dropped"]["near_duplicate"] > 0
    assert summary_ray["dedup"]["val"] > 0


def test_spans_of_a_file_read_what_the_whole_file_reads(tmp_path):
    lines = [
        json.dumps({"id": str(i), "text": f"post {i} " + "x" * (i % 50), "source": "s"}) for i in range(500)
    ]
    path = tmp_path / "posts.jsonl"
    path.write_text("\n".join(lines[:200]) + "\n{broken\n" + "\n".join(lines[200:]))  # no final newline
    whole = list(readers.read_posts(path, "jsonl"))
    spans = readers.line_spans(path, 1000)
    assert len(spans) > 10 and spans[0][0] == 0 and spans[-1][1] == path.stat().st_size
    got, first = [], 1
    for start, end in spans:
        span = readers.Span(start, end, first)
        got += readers.read_posts(path, "jsonl", readers.ReadOptions(span=span))
        first += readers.count_lines(path, start, end)
    assert got == whole


def test_conversation_roots_follow_chains_and_leave_cycles_out():
    # 1 <- 2 <- 3 <- 4 (a chain), 5 <- 6, and 7 <-> 8 (a cycle) with 9 hanging off it
    child = np.array([2, 3, 4, 6, 7, 8, 9])
    parent = np.array([1, 2, 3, 5, 8, 7, 8])
    rows, root = conversation_roots(child, parent)
    assert rows.tolist() == [2, 3, 4, 6, 7, 8, 9]
    assert root.tolist() == [1, 1, 1, 5, -1, -1, -1]


@pytest.mark.slow
def test_the_cli_runs_a_stage_on_ray(inputs, both, tmp_path, capsys):
    local = both[0]
    main(["data", "ingest", str(inputs), "--out", str(tmp_path), "--engine", "ray", "--span-mb", "1"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["files_rejected"] == 1 and summary["posts"] > 30_000
    assert pipeline.read_parts(tmp_path / "posts").equals(pipeline.read_parts(local / "posts"))


@pytest.mark.slow
def test_posts_that_answer_no_one_make_trees_of_one(inputs, tmp_path):
    """A dump without a single reply (the union of posts and replies was empty on one side and broke the shuffle)."""
    cfg = pipeline.PrepareConfig(workers=1)
    pipeline.ingest([inputs / "s140.txt"], tmp_path, cfg)
    dialogues, prefs, stats = RayEngine(partitions=3).threads(tmp_path, cfg)
    posts = pipeline.read_parts(tmp_path / "posts", threads.COLUMNS)
    assert list(dialogues) == [] and list(prefs) == []
    assert stats == threads.build_threads(posts, cfg.threads).stats
    assert stats["trees"] == posts.num_rows > 3000
