"""Plain helpers and constants shared by test modules; the shared fixtures are in conftest.py."""

import gzip
import json
import os
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from myna.data.schema import Reject, new_post
from myna.data.threads import read_conversations

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
AIRLINES = SAMPLE / "conversations" / "twcs_airlines.conversations.jsonl.gz"
V2_POSTS = REPO / "tests" / "fixtures" / "threads" / "twarc_v2_entities_test.posts.jsonl.gz"
# One thread: exact reproducibility across processes, and no OpenMP thrashing when the 2 cores are shared.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

# The shared SFT run (conftest's sft_run): its settings, and the broken lines its data holds after line 10
SFT_ARGS = {"steps": 48, "lr": 2e-3, "eval_every": 12, "save_every": 12}
BAD_LINES = [
    "{not json",
    json.dumps({"messages": [{"role": "robot", "content": "beep"}]}),
    json.dumps({"messages": [{"role": "user", "content": "anyone there?"}]}),
    json.dumps({"id": "x"}),
]


def myna(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The `myna` command as a user runs it, in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "myna", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def airline_dialogues(start: int, stop: int) -> list[dict]:
    found = [d for d in read_conversations(AIRLINES) if not isinstance(d, Reject)]
    return found[start:stop]


def load_v2_posts():
    """Real API v2 tweets (twarc-csv fixture), flattened to Post fields; see PROVENANCE.md."""
    posts = []
    with gzip.open(V2_POSTS, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            rec = json.loads(line)
            created = datetime.fromisoformat(rec.pop("created_at").replace("Z", "+00:00"))
            posts.append(
                new_post(rec.pop("id"), rec.pop("text"), f"{V2_POSTS.name}:{n}", created_at=created, **rec)
            )
    return posts


# Posts with the fields search ranks and filters on (the sample corpus has no authors, times or counts), added to
# conftest's serve_index: Top puts the most engaged first, Latest the newest; s4 replies to s1; s6 is older.
COFFEE_POSTS = [
    {"id": "s1", "author_id": "maya", "created_at": "2024-05-01T08:00:00Z", "like_count": 5000, "repost_count": 800,
     "reply_count": 40, "text": "The best coffee in town is at the harbour cafe, trust me #coffee"},
    {"id": "s2", "author_id": "theo", "created_at": "2024-05-03T09:30:00Z", "like_count": 1, "repost_count": 0,
     "reply_count": 0, "text": "coffee again this morning, my third cup already"},
    {"id": "s3", "author_id": "maya", "created_at": "2024-05-02T14:00:00Z", "like_count": 15, "repost_count": 2,
     "reply_count": 1, "text": "Cold brew coffee is just patience in a glass"},
    {"id": "s4", "author_id": "june", "created_at": "2024-05-04T07:15:00Z", "like_count": 0, "repost_count": 0,
     "reply_count": 0, "text": "@maya the harbour cafe coffee was bitter today", "in_reply_to_id": "s1"},
    {"id": "s5", "author_id": "theo", "created_at": "2024-05-02T20:00:00Z", "like_count": 3, "repost_count": 0,
     "reply_count": 0, "text": "tea people, this is your moment"},
    # untrusted text: markup a page must show as text, and an astral emoji before the match (highlights count
    # code points, JavaScript strings UTF-16 units)
    {"id": "s6", "author_id": "mallory", "created_at": "2024-04-30T12:00:00Z", "like_count": 2, "repost_count": 0,
     "reply_count": 0, "text": '🐍 <img src=x onerror="window.pwned=1"> free coffee <b>here</b>'},
]  # fmt: skip


# The web tests' browser: Debian's chromium driven by Playwright (no browser download), and where screenshots go
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(os.environ.get("MYNA_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
