"""`myna speedrun` end to end on a cut of the bundled sample, as a user runs it: data, pre-training, SFT, chat
samples, then serving the chat model (stopped by the test), and a second run with --no-serve that finds every
stage done."""

import gzip
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import ENV, SAMPLE, free_port


def head(src: Path, dst: Path, n: int) -> None:
    with gzip.open(src, "rt", encoding="utf-8") as f:
        dst.write_text("".join(line for _, line in zip(range(n), f, strict=False)), encoding="utf-8")


@pytest.mark.slow
def test_speedrun_trains_tunes_samples_and_serves(tmp_path):
    sample = tmp_path / "sample"
    (sample / "posts").mkdir(parents=True)
    (sample / "conversations").mkdir()
    head(SAMPLE / "posts" / "sentiment140_negative.txt.gz", sample / "posts" / "neg.txt", 2000)
    conv = sorted((SAMPLE / "conversations").glob("*.conversations.jsonl*"))[0]
    head(conv, sample / "conversations" / "c.conversations.jsonl", 120)
    port = free_port()
    flags = ["--sample", str(sample), "--out", str(tmp_path / "run"), "--vocab-size", "400", "--workers", "1"]
    flags += ["--preset", "tiny", "--steps", "6", "--sft-steps", "4", "--chat-prompts", "8"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "myna", "speedrun", *flags, "--port", str(port)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # until the server prints its URL
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if f"http://127.0.0.1:{port}/" in line:
                break
        out = "".join(lines)
        assert f"http://127.0.0.1:{port}/" in out, out
        assert "data funnel" in out and "base model: step 6" in out
        assert "chat model (SFT): step 4" in out and "DPO skipped" in out and "chat samples" in out
        assert (tmp_path / "run" / "sft" / "checkpoints" / "step_00000004" / "model.safetensors").is_file()
        assert "report card:" in out
        assert "myna search --index" in out and "myna ask --index" in out and "searched:" in out
        assert "myna chat --ckpt" in out and "myna> " in out  # the chat with search as its tool
        assert (tmp_path / "run" / "index" / "index.sqlite").is_file()
        # the ad server on the example inventory: a winner, and an ad blocked beside a post about an attack
        assert "myna ads match --inventory" in out and "winner " in out and "brand_safety: standard" in out
        report = (tmp_path / "run" / "sft" / "report.md").read_text()
        assert (
            "Chat checks" in report
            and "bits per byte" in report
            and (tmp_path / "run" / "sft" / "eval.json").is_file()
        )

        health = {}
        for _ in range(100):  # the model loads in the background after the server is up
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    health = json.load(r)
                    break
            except OSError:
                time.sleep(0.2)
        assert health.get("model") == "sft", health
        body = json.dumps({"model": "sft", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            body.encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            reply = json.load(r)
        assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    again = subprocess.run(
        [sys.executable, "-m", "myna", "speedrun", *flags, "--no-serve"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert again.returncode == 0, again.stderr
    assert "chat model (SFT): step 4" in again.stderr and "http://" not in again.stderr + again.stdout
    assert re.search(r"speedrun finished in [\d.]+ s", again.stderr)
    assert "posts into" not in again.stderr  # the index is current: not built again

    # the tuning verbs on their own: SFT on an OpenAI-messages file, then DPO on real replies (chosen: the reply a
    # conversation got; rejected: another conversation's reply) against the SFT model
    dialogues = [json.loads(line) for line in (tmp_path / "run" / "data" / "dialogues.jsonl").open()][:60]
    with open(tmp_path / "chats.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"messages": d["messages"]}) + "\n" for d in dialogues)
    with open(tmp_path / "prefs.jsonl", "w", encoding="utf-8") as f:
        for d, other in zip(dialogues, dialogues[1:] + dialogues[:1], strict=True):
            pair = {"prompt": d["messages"][:-1], "chosen": d["messages"][-1]["content"]}
            f.write(json.dumps({**pair, "rejected": other["messages"][-1]["content"]}) + "\n")
    for verb, base, data, out, extra in [
        ("sft", "base", "chats.jsonl", "sft2", []),
        ("dpo", "sft2", "prefs.jsonl", "dpo", ["--beta", "0.2"]),
    ]:
        args = ["--base", str(tmp_path / "run" / base), "--data", str(tmp_path / data)]
        args += ["--out", str(tmp_path / "run" / out), "--steps", "3", *extra]
        done = subprocess.run(
            [sys.executable, "-m", "myna", verb, *args], env=ENV, capture_output=True, text=True, timeout=240
        )
        assert done.returncode == 0, done.stderr
        config = json.loads((tmp_path / "run" / out / "config.json").read_text())
        assert config["stage"] == verb and (tmp_path / "run" / out / "tokenizer.json").is_file()
        last = json.loads((tmp_path / "run" / out / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["step"] == 3 and "val_loss" in last
    assert config["beta"] == 0.2 and "val_pair_accuracy" in last
