"""Inference speed of the engine: decode tokens/s for 1 and N concurrent streams, with and without the KV cache,
and time to first token. Each number is the median of several runs after a warm-up.

    python bench/infer.py [--ckpt RUN | --preset P] [--device cpu|cuda] [--streams 1,8] [--prompt-tokens 32]
                          [--max-tokens 64] [--runs 3] [--vs-transformers]

Without --ckpt the model is the `cpu` preset's shape (vocab 8192) with random weights: speed depends on shapes
only. Prompts are bundled tweets. All streams of a run are submitted together and sample at temperature 1 with
their own seeds.

Decode tokens/s counts every token after each stream's first, over the time from the last first token to the
last finish (aggregate over the streams); TTFT is submit -> first token (median over streams), which includes
the prefill and, for batched streams, waiting for the batch's shared prefill. Threads: --threads, else those of
`myna serve` (OMP_NUM_THREADS, or 1 on CPU).

--vs-transformers (CPU) times the engine with its KV cache beside transformers' `generate` on the same weights:
the model goes through `myna export hf` and transformers loads it in fp32 (eval, inference mode). Both decode
greedily exactly --max-tokens tokens (the engine fails the run if <|end|> cuts a stream short; `generate` gets
min_new_tokens = max_new_tokens), on the same number of torch threads. N streams are N concurrent requests to
the engine and one batched `generate` call of the same N prompts (equal lengths, so neither side pads); a
streamer timestamps `generate`'s tokens, and the tokens/s and TTFT definitions above hold for both. With
--profile it then runs each side once more under torch.profiler (every thread, so the engine's scheduler too) and
reports where a decode step's time goes: the weight matmuls, attention, and everything else. With --compile a
third side, "myna compiled" (Engine(compile=True): the decode step through torch.compile), takes its turn too;
its warm-up, which compiles, is timed apart and printed as the compile time.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TWEETS = REPO / "tests" / "fixtures" / "tok" / "tweets.txt"


def load(ckpt: str | None, device: str, preset_name: str = "cpu"):
    import torch

    from myna.config import preset
    from myna.model import GPT
    from myna.runs import load_model
    from myna.tokenizer import train_tokenizer

    if ckpt:
        loaded = load_model(ckpt, device)
        return loaded.model, loaded.tokenizer, f"{ckpt} (step {loaded.step})"
    tok = train_tokenizer(TWEETS.read_text(encoding="utf-8").splitlines(), 8192)
    cfg, _ = preset(
        preset_name, vocab_size=8192
    )  # the tokenizer may be smaller: the engine samples its ids only
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg).eval()
    return model, tok, f"{preset_name} preset shape, random weights"


def prompts(tok, n: int, length: int) -> list[list[int]]:
    """n different prompts of exactly `length` tokens: consecutive slices of the tweets, repeated if need be."""
    lines = TWEETS.read_text(encoding="utf-8").splitlines()
    ids = [t for line in lines for t in (tok.bos_id, *tok.encode(line))]
    ids *= -(-n * length // len(ids))
    return [ids[i * length : (i + 1) * length] for i in range(n)]


def run_once(engine, batch: list[list[int]], max_tokens: int, temperature: float = 1.0) -> dict:
    from myna.infer.engine import SamplingParams

    requests = [
        engine.submit(p, SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i))
        for i, p in enumerate(batch)
    ]
    done = [r.result() for r in requests]
    first = max(r.submitted + c.ttft_s for r, c in zip(requests, done, strict=True))
    last = max(r.submitted + c.total_s for r, c in zip(requests, done, strict=True))
    return {
        "decode_tps": sum(c.completion_tokens - 1 for c in done) / (last - first),
        "ttft_s": statistics.median(c.ttft_s for c in done),
        "tokens": sum(c.completion_tokens for c in done),
    }


def measure(model, tok, counts: list[int], args) -> dict:
    """Median results per (streams, cached). Configurations take turns within each run, so a change in the
    machine's load hits all of them alike and the ratios stay meaningful on a shared machine."""
    from myna.infer.engine import Engine, SamplingParams

    configs = [(n, cached) for n in counts for cached in (True, False)]
    engines = {c: Engine(model, tok, max_batch=c[0], use_cache=c[1]).start() for c in configs}
    batches = {n: prompts(tok, n, args.prompt_tokens) for n in counts}
    runs = {c: [] for c in configs}
    try:
        for c in configs:  # warm-up: allocator, kernels
            engines[c].generate(batches[c[0]][0], SamplingParams(max_tokens=8, seed=0))
        for _ in range(args.runs):
            for c in configs:
                runs[c].append(run_once(engines[c], batches[c[0]], args.max_tokens))
    finally:
        for engine in engines.values():
            engine.close()
    return {c: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for c, rs in runs.items()}


def as_transformers(model, tok, ckpt: str | None, tmp: Path):
    """The same weights as a transformers model, through `myna export hf`."""
    import torch
    from transformers import AutoModelForCausalLM

    from myna.export import export_hf
    from myna.train import checkpoint
    from myna.train.distributed import Dist

    if not ckpt:  # export_hf reads a run: write the random model as one
        ckpt = tmp / "run"
        ckpt.mkdir()
        (ckpt / "config.json").write_text(json.dumps({"model": asdict(model.cfg)}))
        tok.save(ckpt / "tokenizer.json")
        checkpoint.save(ckpt, 1, model, torch.optim.AdamW(model.parameters()), {}, Dist())
    out = export_hf(ckpt, tmp / "hf")
    return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def hf_run_once(hf, batch: list[list[int]], max_tokens: int) -> dict:
    """One batched greedy `generate` call, timed as run_once times the engine."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        """When `generate` hands over each step's tokens (its first put is the prompt)."""

        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    ids = torch.tensor(batch)
    stamps = Stamps()
    start = time.perf_counter()
    with torch.inference_mode():
        hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,  # the stop tokens are masked: every run decodes the same count
            streamer=stamps,
        )
    assert len(stamps.times) == max_tokens + 1, "generate stopped early"
    first, last = stamps.times[1], stamps.times[-1]
    return {"decode_tps": len(batch) * (max_tokens - 1) / (last - first), "ttft_s": first - start}


def measure_vs_transformers(model, tok, hf, counts: list[int], args) -> dict:
    """Median results per (streams, "myna" | "transformers"), the two taking turns within each run."""
    from myna.infer.engine import Engine, SamplingParams

    mine = ("myna", "myna compiled") if args.compile else ("myna",)
    engines = {
        (n, side): Engine(model, tok, max_batch=n, compile=side == "myna compiled").start()
        for n in counts
        for side in mine
    }
    batches = {n: prompts(tok, n, args.prompt_tokens) for n in counts}
    runs = {(n, side): [] for n in counts for side in (*mine, "transformers")}
    compile_s = {}
    try:
        for n in counts:  # warm-up: allocator, kernels
            engines[(n, "myna")].generate(batches[n][0], SamplingParams(max_tokens=8, temperature=0))
            if args.compile:  # all n streams at once: the decode step compiles at this batch size
                start = time.perf_counter()
                run_once(engines[(n, "myna compiled")], batches[n], 8, temperature=0)
                compile_s[n] = time.perf_counter() - start
            hf_run_once(hf, batches[n], 8)
        for _ in range(args.runs):
            for n in counts:
                for side in mine:
                    r = run_once(engines[(n, side)], batches[n], args.max_tokens, temperature=0)
                    if r["tokens"] != n * args.max_tokens:
                        raise RuntimeError("greedy decoding reached <|end|>: try another --prompt-tokens")
                    runs[(n, side)].append(r)
                runs[(n, "transformers")].append(hf_run_once(hf, batches[n], args.max_tokens))
    finally:
        for engine in engines.values():
            engine.close()
    results = {c: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for c, rs in runs.items()}
    for n, seconds in compile_s.items():
        results[(n, "myna compiled")]["warm_up_s"] = seconds
    return results


MATMULS = ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise")  # the weight matmuls of either side
ATTENTION = (
    "aten::bmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_attention_math",
)


def profile_vs_transformers(model, tok, hf, counts: list[int], args) -> dict:
    """Per (streams, side): ms per decode step in weight matmuls and in attention (the profiler's self CPU time
    over one run, prefill included, divided by --max-tokens). Big kernels time true under the profiler; its
    overhead lands on the many small operations, which is why the step itself comes from the unprofiled runs."""
    from torch._C._profiler import _ExperimentalConfig
    from torch.profiler import ProfilerActivity, profile

    from myna.infer.engine import Engine

    out = {}
    for n in counts:
        batch = prompts(tok, n, args.prompt_tokens)
        with Engine(model, tok, max_batch=n) as engine:
            run_once(engine, batch, 8, temperature=0)  # warm-up
            for side in ("myna", "transformers"):
                config = _ExperimentalConfig(profile_all_threads=True)  # the engine decodes in its own thread
                with profile(activities=[ProfilerActivity.CPU], experimental_config=config) as prof:
                    if side == "myna":
                        run_once(engine, batch, args.max_tokens, temperature=0)
                    else:
                        hf_run_once(hf, batch, args.max_tokens)
                self_ms = {e.key: e.self_cpu_time_total / 1000 for e in prof.key_averages()}
                out[(n, side)] = {
                    part: sum(self_ms.get(name, 0.0) for name in names) / args.max_tokens
                    for part, names in (("matmul_ms", MATMULS), ("attention_ms", ATTENTION))
                }
    return out


def profile_table(results: dict, shares: dict, counts: list[int], title: str):
    from rich.table import Table

    table = Table(title=title)
    for col in ("streams", "engine", "ms per step", "weight matmuls", "attention", "the rest"):
        table.add_column(col, justify="right")
    for n in counts:
        for side in ("myna", "transformers"):
            step = 1000 * n / results[(n, side)]["decode_tps"]
            mm, attn = shares[(n, side)]["matmul_ms"], shares[(n, side)]["attention_ms"]
            cells = [f"{ms:.2f} ({ms / step:.0%})" for ms in (mm, attn, max(0.0, step - mm - attn))]
            table.add_row(str(n), side, f"{step:.2f}", *cells)
    return table


def vs_transformers_table(results: dict, counts: list[int], title: str):
    from rich.table import Table

    table = Table(title=title)
    for col in ("streams", "engine", "decode tok/s", "per stream", "TTFT ms", "decode vs HF", "TTFT vs HF"):
        table.add_column(col, justify="right")
    for n in counts:
        theirs = results[(n, "transformers")]
        for side in ("myna", "myna compiled", "transformers"):
            if (n, side) not in results:
                continue
            r = results[(n, side)]
            table.add_row(
                str(n),
                side,
                f"{r['decode_tps']:,.0f}",
                f"{r['decode_tps'] / n:,.1f}",
                f"{1000 * r['ttft_s']:,.1f}",
                f"{r['decode_tps'] / theirs['decode_tps']:.2f}x",
                f"{theirs['ttft_s'] / r['ttft_s']:.2f}x",  # how many times sooner the first token comes
            )
    return table


def cache_table(results: dict, counts: list[int], title: str):
    from rich.table import Table

    table = Table(title=title)
    for col in (
        "streams",
        "KV cache",
        "decode tok/s",
        "per stream",
        "TTFT ms",
        "cache speed-up",
        "vs 1 stream",
    ):
        table.add_column(col, justify="right")
    one = results[(counts[0], True)]["decode_tps"]
    for n in counts:
        for cached in (True, False):
            r = results[(n, cached)]
            speedup = r["decode_tps"] / results[(n, False)]["decode_tps"]
            table.add_row(
                str(n),
                "yes" if cached else "no",
                f"{r['decode_tps']:,.0f}",
                f"{r['decode_tps'] / n:,.1f}",
                f"{1000 * r['ttft_s']:,.1f}",
                f"{speedup:.2f}x" if cached else "",
                f"{r['decode_tps'] / one:.2f}x" if cached else "",
            )
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="a run or checkpoint dir (default: random weights, cpu preset shape)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="cpu", help="model shape without --ckpt (default cpu)")
    ap.add_argument("--streams", default="1,8", help="comma-separated numbers of concurrent streams")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads on CPU (default: 1, as myna serve/chat use)")
    ap.add_argument(
        "--vs-transformers",
        action="store_true",
        help="greedy decode beside transformers' generate on the same weights (CPU)",
    )
    ap.add_argument(
        "--profile", action="store_true", help="with --vs-transformers: where each side's decode step goes"
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="with --vs-transformers: Myna's engine with compile=True (torch.compile) as a third side too",
    )
    args = ap.parse_args()
    if args.vs_transformers and args.device != "cpu":
        ap.error("--vs-transformers runs on CPU only")
    if args.profile and not args.vs_transformers:
        ap.error("--profile goes with --vs-transformers")
    if args.compile and not args.vs_transformers:
        ap.error("--compile goes with --vs-transformers")

    import torch

    from myna.infer.engine import set_cpu_threads

    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        set_cpu_threads(args.device)
    from rich.console import Console

    model, tok, what = load(args.ckpt, args.device, args.preset)
    counts = [int(s) for s in args.streams.split(",")]
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads"
    )
    shape = f"prompt {args.prompt_tokens} tokens, {args.max_tokens} new, median of {args.runs}"
    if args.vs_transformers:
        with tempfile.TemporaryDirectory() as tmp:
            hf = as_transformers(model, tok, args.ckpt, Path(tmp))
            results = measure_vs_transformers(model, tok, hf, counts, args)
            shares = profile_vs_transformers(model, tok, hf, counts, args) if args.profile else None
        title = f"greedy decode on {device}, Myna's engine vs transformers' generate: {what}; {shape}"
        table = vs_transformers_table(results, counts, title)
        for n in counts if args.compile else ():
            print(
                f"{n} stream(s): compiled engine's warm-up (compiles) {results[(n, 'myna compiled')]['warm_up_s']:.1f} s"
            )
        if shares:
            Console(width=120).print(table)
            table = profile_table(
                results, shares, counts, "decode step, ms (share): torch.profiler, one run each"
            )
    else:
        results = measure(model, tok, counts, args)
        table = cache_table(results, counts, f"decode on {device}: {what}; {shape}")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
