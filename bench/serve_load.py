"""Load on `myna serve`: N concurrent streaming chat requests over loopback, for N in 1, 8, 32.

    python bench/serve_load.py [--ckpt RUN] [--streams 1,8,32] [--requests-per-stream 2] [--max-tokens 64]
                               [--runs 3] [--time-limit 120] [--server-threads 1]

The server runs in its own process on a free port of 127.0.0.1 (so the clients do not share its interpreter),
with max concurrency = the largest N; it is stopped at the end, whatever happens. Without --ckpt the model is
the `cpu` preset's shape with random weights (a tokenizer trained on the bundled tweets): speed depends on shapes
only, and random weights rarely write <|end|>, so replies run to --max-tokens.

Each client thread sends its requests one after another (stream, include_usage); a level is N such threads
started together. Time to first token is request sent -> first chunk with text, as the client sees it. Tokens/s
is all completion tokens of the level over its wall time. Errors: any status but 200, an error event, a
stream without [DONE], or a timeout. Each number is the median over --runs runs (errors: the sum); a level stops
sending new requests after --time-limit seconds.

The server's torch threads are --server-threads (OMP_NUM_THREADS of its process; default 1): the client threads
share the machine, and OpenMP threads that spin against other work are many times slower (on 2 shared cores,
2 threads measured 10-20x below 1).
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TWEETS = REPO / "tests" / "fixtures" / "tok" / "tweets.txt"


def random_run(root: Path) -> Path:
    """A run dir holding the cpu preset with random weights and a tokenizer trained on the bundled tweets."""
    import torch

    from myna.config import preset
    from myna.model import GPT
    from myna.tokenizer import train_tokenizer
    from myna.train import checkpoint
    from myna.train.distributed import Dist

    tok = train_tokenizer(TWEETS.read_text(encoding="utf-8").splitlines(), 8192)
    cfg, _ = preset("cpu", vocab_size=tok.vocab_size)  # the run must match its tokenizer's size
    torch.manual_seed(0)
    model = GPT(cfg)
    run = root / "cpu-random"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"preset": "cpu", "model": asdict(cfg)}))
    tok.save(run / "tokenizer.json")
    checkpoint.save(run, 0, model, torch.optim.SGD(model.parameters(), lr=0.0), {}, Dist())
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int, max_concurrency: int, threads: int) -> subprocess.Popen:
    code = (
        "from myna.serve.api import serve; from myna.serve.config import ServeConfig; "
        "from myna.moderation import Policy; "
        f"serve({str(ckpt)!r}, ServeConfig(port={port}, max_concurrency={max_concurrency}, "
        "policy=Policy.default(), log_level='warning'))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    server = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 120
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            health = json.loads(conn.getresponse().read())
            conn.close()
            if health["status"] == "ready":
                return server
            if health["status"] == "error":
                raise RuntimeError(f"the server failed to load the model: {health['error']}")
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.kill()
            raise RuntimeError("the server did not become ready in 120 s")
        time.sleep(0.2)


def one_request(port: int, model: str, text: str, max_tokens: int, seed: int) -> dict:
    """One streamed chat completion: {"ttft": s or None, "tokens": n, "error": str or None}."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    out = {"ttft": None, "tokens": 0, "error": None}
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            out["error"] = f"HTTP {response.status}: {response.read()[:200]!r}"
            return out
        done = False
        for line in iter(response.readline, b""):
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                out["error"] = chunk["error"]["message"]
                return out
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and out["ttft"] is None:
                out["ttft"] = time.perf_counter() - t0
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"]["completion_tokens"]
        if not done:
            out["error"] = "stream ended without [DONE]"
    except (OSError, ValueError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return out


def level(port: int, model: str, streams: int, per_stream: int, max_tokens: int, time_limit: float) -> dict:
    """`streams` client threads, each sending `per_stream` requests in a row, all started together."""
    lines = TWEETS.read_text(encoding="utf-8").splitlines()
    results: list[dict] = []
    lock = threading.Lock()
    start = threading.Barrier(streams)
    deadline = time.monotonic() + time_limit

    def client(i: int) -> None:
        start.wait()
        for k in range(per_stream):
            if time.monotonic() > deadline:
                return
            r = one_request(
                port, model, lines[(i * per_stream + k) % len(lines)], max_tokens, seed=i * 1000 + k
            )
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    return {
        "requests": len(results),
        "p50_ttft": percentile(ttfts, 50),
        "p99_ttft": percentile(ttfts, 99),
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "errors": sum(r["error"] is not None for r in results),
        "first_error": next((r["error"] for r in results if r["error"]), None),
    }


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on an already sorted list."""
    if not sorted_values:
        return float("nan")
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="a run or checkpoint dir (default: random weights, cpu preset shape)")
    ap.add_argument("--streams", default="1,8,32", help="comma-separated numbers of concurrent streams")
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3, help="runs per level; the table shows medians")
    ap.add_argument(
        "--time-limit", type=float, default=120, help="seconds per run before no new request starts"
    )
    ap.add_argument("--server-threads", type=int, default=1, help="torch threads of the server (default 1)")
    args = ap.parse_args()
    levels = [int(n) for n in args.streams.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else random_run(Path(tmp))
        port = free_port()
        server = start_server(ckpt, port, max(levels), args.server_threads)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/v1/models")
            model = json.loads(conn.getresponse().read())["data"][0]["id"]
            conn.close()
            one_request(port, model, "warm-up", 8, seed=0)
            rows = []
            for n in levels:
                runs = [
                    level(port, model, n, args.requests_per_stream, args.max_tokens, args.time_limit)
                    for _ in range(args.runs)
                ]
                row = {
                    key: statistics.median(r[key] for r in runs)
                    for key in ("p50_ttft", "p99_ttft", "tokens_per_s")
                }
                row.update(
                    streams=n,
                    requests=sum(r["requests"] for r in runs),
                    errors=sum(r["errors"] for r in runs),
                )
                rows.append(row)
                errors = [r["first_error"] for r in runs if r["first_error"]]
                print(f"{n} streams done{': first error ' + errors[0] if errors else ''}", file=sys.stderr)
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()

    source = args.ckpt or "cpu preset, random weights"
    print(
        f"\nmyna serve load on {source}: {args.max_tokens} tokens per reply, {args.server_threads} server "
        f"thread(s), median of {args.runs} runs\n"
    )
    print("| concurrent streams | requests | p50 TTFT (s) | p99 TTFT (s) | tokens/s | errors |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['streams']} | {r['requests']} | {r['p50_ttft']:.3f} | {r['p99_ttft']:.3f} | "
            f"{r['tokens_per_s']:.0f} | {r['errors']} |"
        )


if __name__ == "__main__":
    main()
