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
