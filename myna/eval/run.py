"""`myna eval RUN`: every number about one run, in RUN/eval.json.

- val: next-token loss and bits per byte on the held-out posts (the val shards of the data directory the run, or
  the base run it was tuned from, was pre-trained on). Bits per byte divide the summed nats by ln 2 and by the
  UTF-8 bytes of the predicted tokens, so models with different tokenizers compare.
- chat: for runs whose data has dialogues, on the held-out split SFT uses (hash of the opening message): the loss
  of the assistant tokens; format compliance, the share of up to 200 held-out prompts (each dialogue up to its
  last assistant turn) that a greedy reply closes with <|end|> within 64 tokens; and replies to a fixed set of
  sample conversations. A base (pre-trained only) run gets the same checks, marked as such: they show where SFT
  starts from.
- tweeteval: the seven TweetEval tasks and ALL with fine-tuned classifiers and/or label-word scoring by LM
  likelihood (myna.eval.tweeteval), beside the published rows. Full size (the defaults: every bundled train row,
  at most 2,000 per task, and the complete test sets) is slow on a CPU: for the `cpu` preset on 2 shared cores,
  classifier mode with train_cap=1000 and 3 epochs took 14 minutes (emoji, with its 50,000-row test set and
  5,000-row val set, 9 of them); the full defaults take about twice that. LM mode scores every label word on
  every test row (emoji: 20 x 50,000 sequences): pass test_cap for a look at it. train_cap / test_cap / tasks cut
  the cost; a capped test set is marked as not comparable to the published rows. Classifiers always get all of a
  task's labels (from its mapping.txt), so a small train_cap that misses a rare class still trains.
"""

import json
import math
import os
import platform
import time
import typing
from contextlib import nullcontext
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

import torch

from myna.data.loader import TokenLoader
from myna.eval.settings import EvalConfig
from myna.eval.tweeteval import TASKS, format_table, run_tweeteval
from myna.infer.engine import Engine, SamplingParams, cpu_threads
from myna.io import atomic_write
from myna.progress import log
from myna.runs import Loaded, load_model, read_config, resolve
from myna.template import render_prompt
from myna.train.distributed import Dist
from myna.train.loop import autocast_dtype, evaluate
from myna.train.sft import PackedLoader, assistant_eval_fn, encode_dialogues, parse_dialogue
from myna.train.tuning import held_out, opening, read_records

MODES = typing.get_args(typing.get_type_hints(EvalConfig)["tweeteval_mode"])
BASE_NOTE = "base model (pre-trained only): it never learned the chat template; these show where SFT starts"

# The fixed sample conversations: the same prompts for every run, so replies compare across runs and stages.
SAMPLE_CONVERSATIONS: list[list[dict]] = [
    [{"role": "user", "content": "hi! how is your day going?"}],
    [{"role": "user", "content": "my flight got cancelled and nobody at the gate can tell me anything"}],
    [{"role": "user", "content": "what should I watch tonight? something funny please"}],
    [
        {"role": "system", "content": "You are a friendly support agent for a phone company."},
        {"role": "user", "content": "my phone bill doubled this month, why??"},
    ],
    [
        {"role": "user", "content": "i ordered a pizza an hour ago and it still isn't here"},
        {"role": "assistant", "content": "Sorry about the wait! Can you send us your order number?"},
        {"role": "user", "content": "it's 48213"},
    ],
]


# ---------------------------------------------------------------------------------------------------------------
# Where a run's data lives


def _base_run_dir(run_dir: Path, base: str) -> Path:
    """The run directory behind a config's "base" (a checkpoint folder, or the run itself)."""
    p = Path(base)
    if p.parent.name == "checkpoints":
        p = p.parent.parent  # the checkpoint may have been pruned since; its run is what matters
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir}/config.json: its base run {base} is gone (no {p}/config.json)")
    return p


def lineage(run: str | Path) -> list[tuple[Path, dict]]:
    """(run dir, config) of the run and each run it was tuned from, newest first: dpo -> sft -> base."""
    run_dir, _ = resolve(run)
    chain = [(run_dir, read_config(run_dir))]
    while "base" in chain[-1][1]:
        if len(chain) > 16:
            raise ValueError(f"{run_dir}: the chain of base runs does not end (a cycle?)")
        base = _base_run_dir(chain[-1][0], chain[-1][1]["base"])
        chain.append((base, read_config(base)))
    return chain


def stage_of(config: dict) -> str:
    return config.get("stage", "base")


def data_sources(chain: list[tuple[Path, dict]]) -> tuple[Path, Path | None]:
    """(the pre-training data dir, the dialogues file or None): the data dir of the run at the chain's root; the
    dialogues the nearest SFT run was tuned on, else the data dir's dialogues.jsonl when it has one."""
    root_dir, root = chain[-1]
    if "data" not in root:
        raise ValueError(
            f"{root_dir}/config.json: no 'data' entry naming the data directory it was trained on"
        )
    data_dir = Path(root["data"])
    if not (data_dir / "shards" / "val").is_dir():
        raise FileNotFoundError(
            f"{root_dir}/config.json: its data directory {data_dir} is gone (no {data_dir}/shards/val); "
            "restore it or run `myna data prepare` again with the same settings"
        )
    sft = next((c for _, c in chain if stage_of(c) == "sft"), None)
    if sft is not None:
        dialogues = Path(sft["data"])
        if not dialogues.is_file():
            raise FileNotFoundError(
                f"the SFT run's dialogues {dialogues} are gone (named in its config.json)"
            )
        return data_dir, dialogues
    default = data_dir / "dialogues.jsonl"
    return data_dir, default if default.is_file() and default.stat().st_size > 0 else None


# ---------------------------------------------------------------------------------------------------------------
# The checks


def _seq_len(loaded: Loaded, config: dict) -> int:
    return min(config.get("train", {}).get("seq_len", loaded.config.max_seq_len), loaded.config.max_seq_len)


def val_loss_bpb(loaded: Loaded, data_dir: Path, seq_len: int, max_tokens: int) -> dict:
    """Loss and bits per byte over the val shards' windows in order (at most max_tokens predicted tokens)."""
    device = loaded.model.tok_emb.weight.device
    shards = data_dir / "shards" / "val"
    windows = TokenLoader(shards, 1, seq_len).num_windows
    batch = min(8, windows)
    batches = max(1, min(windows // batch, max_tokens // (batch * seq_len)))
    loader = TokenLoader(shards, batch, seq_len, device=device)
    tok = loaded.tokenizer
    bytes_per_token = torch.tensor([len(b) for b in tok.token_bytes], dtype=torch.int64, device=device)
    amp = autocast_dtype("auto", device)

    def autocast():
        return nullcontext() if amp is None else torch.autocast(device.type, dtype=amp)

    loss, bpb = evaluate(loaded.model, loader, batches, bytes_per_token, Dist(device=device), autocast)
    return {
        "data": str(data_dir),
        "loss": loss,
        "bpb": bpb,
        "tokens": batches * batch * seq_len,
        "bytes_per_token": loss / math.log(2) / bpb,
        "seq_len": seq_len,
        "windows": batches * batch,
        "windows_available": windows,
    }


def _generate(loaded: Loaded, conversations: list[list[dict]], max_tokens: int) -> list[dict]:
    """Greedy replies (text, finish_reason, tokens) to each conversation, batched through the engine."""
    tok = loaded.tokenizer
    device = loaded.model.tok_emb.weight.device
    budget = loaded.config.max_seq_len - max_tokens
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    with cpu_threads(device), Engine(loaded.model, tok, max_batch=8) as engine:
        requests = [engine.submit(render_prompt(c, tok, budget).ids, params) for c in conversations]
        results = [r.result() for r in requests]
    return [
        {"reply": r.text, "finish_reason": r.finish_reason, "tokens": r.completion_tokens} for r in results
    ]


def chat_checks(
    loaded: Loaded, dialogues_path: Path, seq_len: int, stage: str, prompts: int, max_tokens: int
) -> dict:
    """Held-out assistant loss, format compliance over up to `prompts` held-out prompts, sample replies."""
    dialogues, rejects = read_records(dialogues_path, parse_dialogue)
    if not dialogues:
        raise ValueError(f"{dialogues_path}: no usable dialogue ({len(rejects)} lines rejected)")
    side = held_out([opening(d["messages"]) for d in dialogues])
    val = [d for d, v in zip(dialogues, side, strict=True) if v]

    examples, _ = encode_dialogues(val, loaded.tokenizer, seq_len)
    loss = None
    if examples:
        device = loaded.model.tok_emb.weight.device
        loader = PackedLoader(examples, 8, seq_len, loaded.tokenizer.pad_id, device=device, repeat=False)
        amp = autocast_dtype("auto", device)

        def autocast():
            return nullcontext() if amp is None else torch.autocast(device.type, dtype=amp)

        loss = assistant_eval_fn(Dist(device=device), 10**9)(loaded.model, loader, autocast)["val_loss"]
        loaded.model.eval()  # the eval function leaves the model in train mode

    # each held-out dialogue up to its last assistant turn: the reply the model has to write and close
    asks = []
    for d in val[:prompts]:
        last = max(i for i, m in enumerate(d["messages"]) if m["role"] == "assistant")
        if last > 0:
            asks.append(d["messages"][:last])
    replies = _generate(loaded, asks, max_tokens) if asks else []
    closed = sum(r["finish_reason"] == "stop" for r in replies)
    samples = _generate(loaded, SAMPLE_CONVERSATIONS, max_tokens)
    return {
        "stage": stage,
        "note": BASE_NOTE if stage == "base" else "",
        "dialogues": str(dialogues_path),
        "held_out": len(val),
        "held_out_loss": loss,
        "held_out_assistant_tokens": int(sum((y >= 0).sum() for _, y in examples)),
        "compliance": {
            "prompts": len(replies),
            "closed_with_end": closed,
            "rate": closed / len(replies) if replies else None,
            "max_tokens": max_tokens,
            "mean_reply_tokens": sum(r["tokens"] for r in replies) / len(replies) if replies else None,
        },
        "samples": [{"messages": c, **r} for c, r in zip(SAMPLE_CONVERSATIONS, samples, strict=True)],
    }


def hardware() -> dict:
    """This machine: CPU model, cores, torch version, GPU (if any)."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------------------------
# The command


def evaluate_run(
    run: str | Path, out: str | Path | None = None, config: EvalConfig | None = None, **settings
) -> dict:
    """`myna eval RUN`: val loss/bpb, chat checks, TweetEval; writes `out` (default RUN/eval.json) and returns it.

    `config` (default EvalConfig()) says what to measure and how; keyword `settings` replace its fields by name.
    TweetEval modes: "classifier" (`seeds` fine-tuned classifiers per task, their probabilities averaged or, with
    seed_choice "best", the one val scores highest kept), "lm" (label words scored by LM likelihood, `shots`
    examples), "both" or "none". TweetEval's predictions and per-mode results go to OUT_DIR/tweeteval/MODE/.
    """
    config = replace(config or EvalConfig(), **settings)
    tweeteval, tasks = _tweeteval_inputs(config)
    chain = lineage(run)
    run_dir, run_config = chain[0]
    data_dir, dialogues = data_sources(chain)  # fails early when the data is gone
    out = Path(out) if out is not None else run_dir / "eval.json"
    stage = stage_of(run_config)

    loaded = load_model(run, config.device)
    seq_len = _seq_len(loaded, run_config)
    seconds: dict[str, float] = {}
    result: dict = {
        "run": str(run_dir),
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
        "stage": stage,
        "params": loaded.model.num_params(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "hardware": hardware(),
        "seconds": seconds,
    }

    t = time.time()
    result["val"] = val_loss_bpb(loaded, data_dir, seq_len, config.val_tokens)
    seconds["val"] = round(time.time() - t, 1)
    log(f"val: loss {result['val']['loss']:.4f}, {result['val']['bpb']:.4f} bits per byte")

    t = time.time()
    if dialogues is None:
        result["chat"] = {"stage": stage, "skipped": f"{data_dir} has no dialogues.jsonl"}
    else:
        result["chat"] = chat_checks(
            loaded, dialogues, seq_len, stage, config.chat_prompts, config.chat_max_tokens
        )
        _log_chat(result["chat"], stage)
    seconds["chat"] = round(time.time() - t, 1)
    del loaded

    result["tweeteval"] = {}
    modes = {"both": ("classifier", "lm"), "none": ()}.get(config.tweeteval_mode, (config.tweeteval_mode,))
    for mode in modes:
        t = time.time()
        r = run_tweeteval(
            run,
            tweeteval,
            out.parent / "tweeteval" / mode,
            mode=mode,
            shots=config.shots,
            train_cap=config.train_cap if mode == "classifier" else None,
            test_cap=config.test_cap,
            settings=config.settings,
            tasks=tasks,
            device=config.device,
            seeds=config.seeds,
            seed_choice=config.seed_choice,
        )
        result["tweeteval"][mode] = {**r, "name": _row_name(stage, mode, r)}
        seconds[f"tweeteval_{mode}"] = round(time.time() - t, 1)
        log(f"TweetEval ({r['mode']}): " + ", ".join(f"{k} {v:.1f}" for k, v in r["scores"].items()))
    # the classifier settings are in each TweetEval result
    settings = {k: v for k, v in asdict(config).items() if k != "settings"}
    result["settings"] = settings | {"tweeteval": str(tweeteval), "tasks": list(tasks)}
    with atomic_write(out, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    log(f"[green]eval written to {out}")
    return result


def _tweeteval_inputs(config: EvalConfig) -> tuple[Path, tuple[str, ...]]:
    """The TweetEval data folder and tasks, checked before any work starts."""
    if config.tweeteval_mode not in MODES:
        raise ValueError(f"tweeteval_mode={config.tweeteval_mode!r}: expected one of {', '.join(MODES)}")
    tasks = tuple(config.tasks or TASKS)
    if unknown := set(tasks) - set(TASKS):
        raise ValueError(
            f"unknown TweetEval task(s) {', '.join(sorted(unknown))}; expected {', '.join(TASKS)}"
        )
    tweeteval = Path(config.tweeteval)
    if config.tweeteval_mode != "none" and not tweeteval.is_dir():
        raise FileNotFoundError(f"{tweeteval}: no TweetEval data folder (pass --tweeteval DIR)")
    return tweeteval, tasks


def _log_chat(c: dict, stage: str) -> None:
    rate = c["compliance"]["rate"]
    log(
        f"chat ({stage}): held-out loss {c['held_out_loss']}, "
        f"closed with the end-of-turn token: {c['compliance']['closed_with_end']}/{c['compliance']['prompts']}"
        + (f" ({100 * rate:.0f}%)" if rate is not None else "")
    )


def _row_name(stage: str, mode: str, r: dict) -> str:
    name = f"Myna {stage}, " + (r["mode"] if mode == "classifier" else f"LM {r['mode'].split(', ')[1]}")
    caps = []
    if r.get("train_cap"):
        caps.append(f"train ≤{r['train_cap']}")
    if r.get("test_cap"):
        caps.append(f"test ≤{r['test_cap']}, not comparable")
    return name + (f" [{'; '.join(caps)}]" if caps else "")


# ---------------------------------------------------------------------------------------------------------------
# Printing


def format_eval(ev: dict) -> str:
    """Markdown: val loss/bpb, TweetEval beside the published rows, chat checks and sample replies."""
    v = ev["val"]
    parts = [
        "### Held-out posts",
        "",
        "| val loss (nats/token) | bits per byte | tokens | bytes/token |",
        "|---:|---:|---:|---:|",
        f"| {v['loss']:.4f} | {v['bpb']:.4f} | {v['tokens']:,} | {v['bytes_per_token']:.3f} |",
        "",
    ]
    if ev.get("tweeteval"):
        rows = {r["name"]: r["scores"] for r in ev["tweeteval"].values()}
        trained = {r["name"] for r in ev["tweeteval"].values() if r.get("notes")}
        parts += ["### TweetEval (test, official metrics, %)", "", format_table(rows, trained), ""]
        notes = {n for r in ev["tweeteval"].values() for n in r.get("notes", {}).values()}
        if notes:
            parts += [
                "Sentiment is trained on an approximate rebuild of its train split (upstream's train text is "
                'missing): marked "approx. train".',
                "",
            ]
    chat = ev.get("chat", {})
    parts += [f"### Chat checks ({chat.get('stage', '?')} model)", ""]
    if "skipped" in chat:
        return "\n".join([*parts, f"Skipped: {chat['skipped']}.", ""])
    if chat.get("note"):
        parts += [f"*{chat['note']}.*", ""]
    c = chat["compliance"]
    rate = "-" if c["rate"] is None else f"{100 * c['rate']:.1f}%"
    loss = "-" if chat["held_out_loss"] is None else f"{chat['held_out_loss']:.4f}"
    parts += [
        "| held-out dialogues | assistant loss | prompts | closed with <\\|end\\|> | mean reply tokens |",
        "|---:|---:|---:|---:|---:|",
        f"| {chat['held_out']} | {loss} | {c['prompts']} | {c['closed_with_end']} ({rate} within "
        f"{c['max_tokens']} tokens) | {c['mean_reply_tokens'] or 0:.1f} |",
        "",
        "### Sample conversations (greedy)",
        "",
    ]
    for s in chat["samples"]:
        for m in s["messages"]:
            parts.append(f"> **{m['role']}**: {_one_line(m['content'])}  ")
        cut = " *(cut at max tokens)*" if s["finish_reason"] == "length" else ""
        parts += [f"> **assistant (model)**: {_one_line(s['reply'])}{cut}", ""]
    return "\n".join(parts)


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "*(empty)*"
