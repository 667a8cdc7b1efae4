"""The `myna` command: one verb per stage, each a thin layer over a function that tests call directly."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from myna.progress import console, log
from myna.serve.config import ServeConfig

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "sample"


def _csv_columns(spec: str) -> dict[str, str | int]:
    """ "text=tweet,id=0" -> {"text": "tweet", "id": 0}: a Post field to a column name or 0-based index."""
    columns: dict[str, str | int] = {}
    for item in spec.split(","):
        field, sep, column = item.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise ValueError(f"--csv-columns: expected FIELD=COLUMN pairs separated by commas, got {item!r}")
        column = column.strip()
        columns[field.strip()] = int(column) if column.isdigit() else column
    return columns


def _prepare_config(args: argparse.Namespace):
    """PrepareConfig's defaults, overridden by the flags that were given."""
    from myna.data.pipeline import PrepareConfig

    cfg = PrepareConfig(force=args.force)
    csv_columns = getattr(args, "csv_columns", None)
    overrides = [
        (cfg, "format", getattr(args, "format", None)),
        (cfg, "workers", args.workers),
        (cfg, "vocab_size", args.vocab_size),
        (cfg, "val_fraction", args.val_fraction),
        (cfg, "strict", getattr(args, "strict", False) or None),
        (cfg.read, "csv_columns", _csv_columns(csv_columns) if csv_columns else None),
        (cfg.read, "csv_preset", getattr(args, "csv_preset", None)),
        (cfg.clean, "mask_handles", args.mask_handles or None),
        (cfg.clean, "mask_urls", args.mask_urls or None),
        (cfg.clean, "languages", set(args.langs.split(",")) if args.langs else None),
        (cfg.clean, "detect_language", False if args.no_lang_id else None),
        (cfg.dedup, "near", False if args.no_near_dedup else None),
        (cfg.dedup, "threshold", args.dedup_threshold),
        (cfg.dedup, "shingle", args.shingle),
        (cfg.dedup, "num_perm", args.num_perm),
    ]
    for obj, name, value in overrides:
        if value is not None:
            setattr(obj, name, value)
    return cfg


def print_funnel(funnel: dict) -> None:
    t = Table(title="data funnel", title_justify="left")
    t.add_column("stage / reason")
    t.add_column("posts", justify="right")
    t.add_column("share", justify="right")
    n = max(1, funnel["input"])
    t.add_row("input", f"{funnel['input']:,}", "100.0%")
    t.add_row("rejected (unreadable)", f"{funnel['rejected']:,}", f"{100 * funnel['rejected'] / n:.1f}%")
    for reason, count in funnel["dropped"].items():
        t.add_row(f"dropped: {reason}", f"{count:,}", f"{100 * count / n:.1f}%")
    t.add_row("[bold]kept", f"[bold]{funnel['kept']:,}", f"[bold]{100 * funnel['kept'] / n:.1f}%")
    t.add_row("  train / val", f"{funnel['split']['train']:,} / {funnel['split']['val']:,}", "")
    if funnel["pii_scrubbed"]:
        t.add_row(
            "pii scrubbed (kept)", ", ".join(f"{k} {v:,}" for k, v in funnel["pii_scrubbed"].items()), ""
        )
    conv = funnel["conversations"]
    if conv["input"]:
        t.add_row("conversations read / rejected", f"{conv['kept']:,} / {conv['rejected']:,}", "")
    files = funnel["files"]
    if files["rejected"]:
        t.add_row("input files rejected (not posts)", f"{files['rejected']:,} of {files['input']:,}", "")
    console.print(t)


def print_summary(summary: dict) -> None:
    print_funnel(summary["funnel"])
    for path, file in summary["ingest"]["files"].items():
        if "error" in file:  # a file's name and head are the user's text, not rich markup
            log(f"[yellow]rejected input file {escape(path)}: {escape(file['error'])}")
    thr, shd = summary["threads"], summary["shards"]
    log(
        f"dialogues: {thr['dialogues_from_threads']:,} from reply trees + {thr['dialogues_from_conversations']:,} "
        f"from conversation files; preference pairs: {thr['prefs']:,}"
    )
    log(
        f"tokenizer: vocab {summary['tokenizer']['vocab_size']:,}; shards: "
        + ", ".join(
            f"{s} {v['tokens']:,} tokens ({v['bytes_per_token']} bytes/token)"
            for s, v in shd.items()
            if s in ("train", "val")
        )
    )


def cmd_data(args: argparse.Namespace) -> None:
    from myna.data import pipeline

    cfg = _prepare_config(args)
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.stage == "prepare":
        summary = pipeline.prepare(args.inputs, out, cfg)
        print_summary(summary)
        log(f"[green]data ready in {out} ({time.perf_counter() - t0:.1f} s)")
        return
    if args.stage == "ingest":
        result = pipeline.ingest(args.inputs, out, cfg)
    elif args.inputs:
        sys.exit(f"myna data {args.stage} reads {out}; it takes no INPUT (got {args.inputs})")
    else:
        result = {
            "clean": pipeline.clean,
            "dedup": pipeline.dedup_and_split,
            "threads": pipeline.build_dialogues,
            "tokenizer": pipeline.build_tokenizer,
            "tokenize": pipeline.tokenize,
        }[args.stage](out, cfg)
    print(json.dumps(result, indent=1, default=str))


SAMPLE_PROMPTS = [
    "my flight was cancelled and nobody at the gate can tell me anything",
    "what are you up to this weekend?",
    "my bag never arrived in Denver, can you help?",
]


def print_chat_samples(run: Path, prompts: list[str] = SAMPLE_PROMPTS) -> None:
    """One greedy and one sampled reply per prompt, batched through the engine."""
    from myna.infer.engine import Engine, SamplingParams, set_cpu_threads
    from myna.runs import load_model
    from myna.template import render_prompt, turn_stop_ids

    set_cpu_threads("cpu")  # training is over: from here on this process serves
    loaded = load_model(run)
    stops = turn_stop_ids(loaded.tokenizer)
    with Engine(loaded.model, loaded.tokenizer, max_batch=8) as engine:
        requests = [
            (
                p,
                name,
                engine.submit(render_prompt([{"role": "user", "content": p}], loaded.tokenizer).ids, params),
            )
            for p in prompts
            for name, params in (
                ("greedy", SamplingParams(max_tokens=48, temperature=0, stop_token_ids=stops)),
                (
                    "t=0.8",
                    SamplingParams(max_tokens=48, temperature=0.8, top_p=0.95, seed=0, stop_token_ids=stops),
                ),
            )
        ]
        table = Table(title=f"chat samples ({run.name}, step {loaded.step})", title_justify="left")
        table.add_column("user")
        table.add_column("decoding")
        table.add_column("assistant")
        for prompt, name, request in requests:
            result = request.result()
            table.add_row(prompt, name, result.text + ("…" if result.finish_reason == "length" else ""))
    console.print(table)


def cmd_speedrun(args: argparse.Namespace) -> None:
    from myna.data import pipeline
    from myna.train.dpo import dpo
    from myna.train.pretrain import pretrain
    from myna.train.sft import sft

    sample = Path(args.sample)
    if not sample.is_dir():
        sys.exit(f"sample data not found at {sample}: pass --sample DIR (the repository's data/sample)")
    out = Path(args.out)
    cfg = _prepare_config(args)
    t0 = time.perf_counter()
    log(f"[bold]speedrun[/bold] on {sample} -> {out}")
    summary = pipeline.prepare([sample / "posts", sample / "conversations"], out / "data", cfg)
    print_summary(summary)
    # resume=True everywhere: a second speedrun continues (or finds finished) each run instead of refusing
    last = pretrain(out / "data", out / "base", preset=args.preset, steps=args.steps, resume=True)
    log(
        f"base model: step {last['step']}, val loss {last.get('val_loss', float('nan')):.4f}, "
        f"val bits-per-byte {last.get('val_bpb', float('nan')):.4f}"
    )
    last = sft(out / "base", out / "data", out / "sft", steps=args.sft_steps, resume=True)
    log(
        f"chat model (SFT): step {last['step']}, held-out assistant loss {last.get('val_loss', float('nan')):.4f}"
    )
    chat = out / "sft"
    pairs = out / "data" / "prefs.jsonl"
    if pairs.is_file() and pairs.stat().st_size > 0:
        last = dpo(out / "sft", out / "data", out / "dpo", resume=True)
        log(
            f"DPO: step {last['step']}, held-out pair accuracy {last.get('val_pair_accuracy', float('nan')):.3f}, "
            f"reward margin {last.get('val_reward_margin', float('nan')):.3f}"
        )
        chat = out / "dpo"
    else:
        log("DPO skipped: the data has no preference pairs (reply trees with like counts)")
    print_chat_samples(chat)
    from myna.eval.report import write_report
    from myna.eval.run import evaluate_run

    # the quick part of `myna eval` (val bits-per-byte, chat checks); TweetEval takes longer: `myna eval RUN`
    evaluate_run(chat, tweeteval_mode="none", chat_prompts=args.chat_prompts)
    log(f"report card: {write_report(chat)}")
    log(f"[green]speedrun finished in {time.perf_counter() - t0:.1f} s; artifacts in {out}")
    if not args.no_serve:
        from myna.serve.api import serve

        # prints the URL; Ctrl-C stops it
        serve(chat, ServeConfig(host=args.host, port=args.port, allowed_hosts=tuple(args.allow_host)))


def cmd_pretrain(args: argparse.Namespace) -> None:
    from myna.train.pretrain import pretrain

    pretrain(
        args.data,
        args.out,
        preset=args.preset,
        steps=args.steps,
        save_every=args.save_every,
        resume=args.resume,
        parallel=args.parallel,
        compile=args.compile,
    )


def cmd_sft(args: argparse.Namespace) -> None:
    from myna.train.sft import sft

    sft(
        args.base,
        args.data,
        args.out,
        steps=args.steps,
        resume=args.resume,
        parallel=args.parallel,
        compile=args.compile,
    )


def cmd_dpo(args: argparse.Namespace) -> None:
    from myna.train.dpo import dpo

    dpo(
        args.base,
        args.data,
        args.out,
        steps=args.steps,
        beta=args.beta,
        resume=args.resume,
        parallel=args.parallel,
    )


def _sampling(args: argparse.Namespace, stop_token_ids: tuple[int, ...] = ()):
    from myna.infer.engine import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop or ()),
        stop_token_ids=stop_token_ids,
    )


def _policy(spec: str | None):
    from myna.moderation import Policy

    if spec in (None, "default"):
        return Policy.default()
    return Policy.off() if spec == "off" else Policy.load(spec)


def cmd_generate(args: argparse.Namespace) -> None:
    from myna.infer.engine import Engine, set_cpu_threads
    from myna.runs import load_model
    from myna.template import render_prompt, turn_stop_ids

    set_cpu_threads(args.device)
    loaded = load_model(args.ckpt, args.device)
    tok = loaded.tokenizer
    if args.chat:
        ids = render_prompt([{"role": "user", "content": args.prompt}], tok).ids
        params = _sampling(args, stop_token_ids=turn_stop_ids(tok))
    else:
        # a raw continuation: documents in the pre-training shards end where the next <|bos|> starts
        ids = tok.document(args.prompt)
        params = _sampling(args, stop_token_ids=(tok.bos_id,))
    with Engine(loaded.model, tok, max_batch=1, use_cache=not args.no_kv_cache) as engine:
        request = engine.submit(ids, params)
        for delta in request:
            if not args.json:
                print(delta, end="", flush=True)
        result = request.result()
    if args.json:
        decode_s = max(result.total_s - result.ttft_s, 1e-9)
        print(
            json.dumps(
                {
                    "text": result.text,
                    "finish_reason": result.finish_reason,
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                    "ttft_s": round(result.ttft_s, 4),
                    "total_s": round(result.total_s, 4),
                    "decode_tokens_per_s": round(max(result.completion_tokens - 1, 0) / decode_s, 1),
                    "kv_cache": not args.no_kv_cache,
                },
                ensure_ascii=False,
            )
        )
    else:
        print()


def cmd_chat(args: argparse.Namespace) -> None:
    from myna.infer.chat import ChatSession, run_terminal
    from myna.infer.engine import Engine, set_cpu_threads
    from myna.runs import load_model

    set_cpu_threads(args.device)
    loaded = load_model(args.ckpt, args.device)
    log(f"loaded {loaded.checkpoint} (step {loaded.step}, {loaded.model.num_params() / 1e6:.1f}M parameters)")
    with Engine(loaded.model, loaded.tokenizer, max_batch=1) as engine:
        session = ChatSession(engine, _sampling(args), _policy(args.policy), system=args.system or "")
        run_terminal(session)


def cmd_serve(args: argparse.Namespace) -> None:
    from myna.serve.api import serve

    config = ServeConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        allowed_hosts=tuple(args.allow_host),
        max_concurrency=args.max_concurrency,
        body_timeout=args.body_timeout,
        header_timeout=args.header_timeout,
        policy=_policy(args.policy),
        device=args.device,
    )
    serve(args.ckpt, config)


def cmd_classify(args: argparse.Namespace) -> None:
    from myna.eval.classify import ClassifySettings, predict_file, train_classifier
    from myna.infer.engine import set_cpu_threads

    set_cpu_threads(args.device)  # small models, short texts: one thread is as fast and never thrashes
    if args.action == "train":
        if not (args.ckpt and args.train and args.val and args.out):
            sys.exit("myna classify train: --ckpt, --train, --val and --out are required")
        report = train_classifier(
            args.ckpt,
            args.train,
            args.val,
            args.out,
            ClassifySettings(mode=args.mode, **finetune_settings(args)),
            device=args.device,
        )
        print(json.dumps(report, indent=1, default=str))
    else:
        if not (args.model and args.input):
            sys.exit("myna classify predict: --model and --input are required")
        n = predict_file(args.model, args.input, args.out, device=args.device)
        log(f"{n:,} predictions" + (f" -> {args.out}" if args.out else ""))


def cmd_eval(args: argparse.Namespace) -> None:
    from myna.eval.run import evaluate_run, format_eval
    from myna.eval.tweeteval import TASKS, format_table, score_predictions

    if args.target == "tweeteval-score":
        if not args.predictions:
            sys.exit("myna eval tweeteval-score: --predictions DIR is required")
        from myna.eval.run import TWEETEVAL_DIR

        scores = score_predictions(args.data or TWEETEVAL_DIR, args.predictions)
        print(format_table({Path(args.predictions).name: scores}, approx=set()))
        return
    from myna.eval.classify import ClassifySettings

    settings = ClassifySettings(
        mode=args.classifier,
        **finetune_settings(args),
    )
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else TASKS
    if unknown := set(tasks) - set(TASKS):
        sys.exit(
            f"myna eval --tasks: unknown task(s) {', '.join(sorted(unknown))}; expected {', '.join(TASKS)}"
        )
    result = evaluate_run(
        args.target,
        out=args.out,
        tweeteval=args.tweeteval,
        tweeteval_mode=args.mode,
        train_cap=args.train_cap,
        test_cap=args.test_cap,
        settings=settings,
        shots=args.shots,
        tasks=tasks,
        seeds=args.seeds,
        seed_choice=args.seed_choice,
        chat_prompts=args.chat_prompts,
        device=args.device,
    )
    console.print(format_eval(result), highlight=False, markup=False)


def cmd_checkpoint(args: argparse.Namespace) -> None:
    from myna.runs import convert_checkpoint

    if not args.trust_checkpoint:
        raise ValueError(
            "converting unpickles the checkpoint's old files, which can run any code they hold; "
            "pass --trust-checkpoint if you trust whoever wrote it"
        )
    log(f"converted to safetensors: {convert_checkpoint(args.path)}")


def cmd_report(args: argparse.Namespace) -> None:
    from myna.eval.report import write_report

    log(f"report: {write_report(args.run)}")


def serve_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--host", default=ServeConfig.host, help="address to listen on (default %(default)s)")
    sp.add_argument("--port", type=int, default=ServeConfig.port, help="port (default %(default)s)")
    sp.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="without --api-key, also answer requests addressed to NAME (repeatable; '*': any name); "
        "loopback names always work",
    )


def finetune_flags(sp: argparse.ArgumentParser) -> None:
    """The classifier settings `classify train` and `eval` share."""
    sp.add_argument("--epochs", type=int, help="finetune: epochs at most (default 5; early-stopped on val)")
    sp.add_argument(
        "--lm-weight",
        type=float,
        help="finetune: weight of the auxiliary next-token loss (default 0.5; 0 = off)",
    )
    sp.add_argument(
        "--lr-body",
        type=float,
        help="finetune: peak learning rate of the pre-trained body (default 3e-4)",
    )
    sp.add_argument(
        "--lr-head", type=float, help="finetune: peak learning rate of the fresh head (default 3e-3)"
    )


def finetune_settings(args: argparse.Namespace) -> dict:
    """ClassifySettings fields the shared flags set; a flag left out keeps the dataclass default."""
    given = {
        "epochs": args.epochs,
        "lm_weight": args.lm_weight,
        "lr_body": args.lr_body,
        "lr_head": args.lr_head,
    }
    return {k: v for k, v in given.items() if v is not None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="myna", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)

    def data_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--workers", type=int, help="worker processes (default: all cores, at most 8)")
        sp.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default 8192)")
        sp.add_argument(
            "--val-fraction", type=float, help="share of posts held out for validation (default 0.02)"
        )
        sp.add_argument(
            "--mask-handles", action="store_true", help="replace @handles with @user (as BERTweet does)"
        )
        sp.add_argument(
            "--mask-urls", action="store_true", help="replace URLs with 'http' (as BERTweet does)"
        )
        sp.add_argument("--langs", help="comma-separated ISO codes to keep, e.g. en,es (default: all)")
        sp.add_argument(
            "--no-lang-id", action="store_true", help="keep the source's language only, no fastText"
        )
        sp.add_argument("--no-near-dedup", action="store_true", help="exact de-duplication only")
        sp.add_argument(
            "--dedup-threshold", type=float, help="Jaccard similarity of near duplicates (default 0.8)"
        )
        sp.add_argument("--shingle", type=int, help="near-dedup shingle size in characters (default 5)")
        sp.add_argument("--num-perm", type=int, help="MinHash permutations (default 64)")
        sp.add_argument("--force", action="store_true", help="rerun stages that are up to date")

    d = sub.add_parser("data", help="raw dumps -> corpus, dialogues, prefs, tokenizer, token shards")
    d.add_argument(
        "stage", choices=["prepare", "ingest", "clean", "dedup", "threads", "tokenizer", "tokenize"]
    )
    d.add_argument("inputs", nargs="*", help="files or folders (prepare and ingest)")
    d.add_argument("--out", required=True, help="data directory")
    d.add_argument("--format", help="force one reader for every input (default: detect per file)")
    d.add_argument("--csv-columns", help="CSV column mapping, FIELD=NAME_OR_INDEX pairs: text=tweet,id=0")
    d.add_argument("--csv-preset", choices=["sentiment140"], help="a known headerless CSV layout")
    d.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first input file that cannot be read or is no post format (default: reject it, go on)",
    )
    data_flags(d)
    d.set_defaults(fn=cmd_data)

    s = sub.add_parser("speedrun", help="the whole pipeline on the bundled sample")
    s.add_argument("--out", default="runs/speedrun", help="run directory (default runs/speedrun)")
    s.add_argument("--sample", default=str(SAMPLE_DIR), help="sample data folder (default: the bundled one)")
    s.add_argument(
        "--preset", default="cpu", help="model to pre-train (default cpu: about 10 minutes on 2 cores)"
    )
    s.add_argument("--steps", type=int, help="pre-training steps (default: the preset's)")
    s.add_argument("--no-serve", action="store_true", help="end after the report card instead of serving")
    s.add_argument(
        "--chat-prompts",
        type=int,
        default=200,
        help="held-out prompts of the chat format check (default 200)",
    )
    serve_flags(s)
    s.add_argument(
        "--sft-steps",
        type=int,
        default=200,
        help="SFT steps (default 200: a third of an epoch, ~3 min on 2 cores)",
    )
    data_flags(s)
    s.set_defaults(fn=cmd_speedrun)

    def resume_flag(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--resume",
            nargs="?",
            const=True,
            default=False,
            metavar="STEP_DIR",
            help="continue from the newest checkpoint in --out, or from the one named (step_00000200)",
        )

    t = sub.add_parser("pretrain", help="train a GPT on token shards (run under torchrun for several GPUs)")
    t.add_argument("--data", required=True, help="data directory from `myna data prepare`")
    t.add_argument("--out", required=True, help="run directory: config, metrics.jsonl, checkpoints")
    t.add_argument(
        "--preset", default="cpu", help="model size: tiny, cpu, 124m, 350m, 1b, 8b, 70b (default cpu)"
    )
    t.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    t.add_argument("--save-every", type=int, help="checkpoint every N steps (default: the preset's)")
    resume_flag(t)
    t.add_argument("--parallel", choices=["none", "ddp", "fsdp"], default="none", help="data parallelism")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.set_defaults(fn=cmd_pretrain)

    def tune_flags(sp: argparse.ArgumentParser, base_help: str, data_help: str) -> None:
        sp.add_argument("--base", required=True, help=base_help)
        sp.add_argument("--data", required=True, help=data_help)
        sp.add_argument("--out", required=True, help="run directory for the tuned model")
        sp.add_argument("--steps", type=int, help="optimizer steps (default: scaled to the data)")
        resume_flag(sp)
        sp.add_argument(
            "--parallel", choices=["none", "ddp", "fsdp"], default="none", help="data parallelism"
        )

    f = sub.add_parser("sft", help="supervised fine-tuning on dialogues (loss on assistant turns only)")
    tune_flags(
        f,
        "pre-trained run (or one of its checkpoints)",
        "data directory (its dialogues.jsonl) or a JSONL file of OpenAI-messages records",
    )
    f.add_argument("--compile", action="store_true", help="torch.compile the model")
    f.set_defaults(fn=cmd_sft)

    o = sub.add_parser("dpo", help="Direct Preference Optimisation on engagement pairs against the SFT model")
    tune_flags(
        o, "SFT run (also the frozen reference)", "data directory (its prefs.jsonl) or a prefs JSONL file"
    )
    o.add_argument("--beta", type=float, default=0.1, help="DPO temperature beta (default 0.1)")
    o.set_defaults(fn=cmd_dpo)

    def sampling_flags(sp: argparse.ArgumentParser, max_tokens: int) -> None:
        sp.add_argument(
            "--ckpt", required=True, help="run directory (newest checkpoint) or a checkpoint folder"
        )
        sp.add_argument(
            "--max-tokens", type=int, default=max_tokens, help=f"most new tokens (default {max_tokens})"
        )
        sp.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
        sp.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest tokens (0 = off)")
        sp.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 = off)")
        sp.add_argument("--repetition-penalty", type=float, default=1.1, help="1 = off (default 1.1)")
        sp.add_argument("--seed", type=int, help="sampling seed, for a reproducible output")
        sp.add_argument("--stop", action="append", help="stop string (repeatable)")
        sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")

    g = sub.add_parser("generate", help="complete a raw prompt (or one chat turn with --chat)")
    sampling_flags(g, 128)
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument(
        "--chat", action="store_true", help="wrap the prompt as one user turn of the chat template"
    )
    g.add_argument(
        "--no-kv-cache", action="store_true", help="re-run the whole sequence each token (baseline)"
    )
    g.add_argument("--json", action="store_true", help="print one JSON object with token counts and timings")
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser(
        "chat", help="chat with a model in the terminal (streamed; /reset, /system, /temperature)"
    )
    sampling_flags(c, 256)
    c.add_argument("--system", help="system prompt")
    c.add_argument("--policy", help="moderation policy: a JSON file, 'default' (label only) or 'off'")
    c.set_defaults(fn=cmd_chat)

    v = sub.add_parser("serve", help="OpenAI-compatible API and the web chat page")
    v.add_argument("--ckpt", required=True, help="run directory (newest checkpoint) or a checkpoint folder")
    serve_flags(v)
    v.add_argument(
        "--api-key",
        default=os.environ.get("MYNA_API_KEY"),
        help="require this bearer key (default $MYNA_API_KEY)",
    )
    v.add_argument(
        "--max-concurrency",
        type=int,
        default=ServeConfig.max_concurrency,
        help="requests in flight; more get 429 (default %(default)s)",
    )
    v.add_argument("--policy", help="moderation policy: a JSON/TOML file, 'default' (label only) or 'off'")
    v.add_argument("--device", default=ServeConfig.device, help="cpu, cuda, cuda:1 ...")
    v.add_argument(
        "--header-timeout",
        type=float,
        metavar="SECONDS",
        default=ServeConfig.header_timeout,
        help="close a connection that has not sent a request's headers in this many seconds (default %(default)g)",
    )
    v.add_argument(
        "--body-timeout",
        type=float,
        metavar="SECONDS",
        default=ServeConfig.body_timeout,
        help="answer 408 to a request whose body has not all arrived in this many seconds (default %(default)g)",
    )
    v.set_defaults(fn=cmd_serve)

    k = sub.add_parser("classify", help="text classifiers on a trained model: train, then predict")
    k.add_argument("action", choices=["train", "predict"])
    k.add_argument("--ckpt", help="train: the run whose model is the body")
    k.add_argument("--train", help="train: JSONL (text, label) or TSV (text<TAB>label)")
    k.add_argument("--val", help="train: the same format; early stopping and calibration")
    k.add_argument(
        "--mode", choices=["finetune", "probe"], default="finetune", help="train: (default finetune)"
    )
    finetune_flags(k)
    k.add_argument("--model", help="predict: a folder written by classify train")
    k.add_argument("--input", help="predict: JSONL or TSV (labels optional)")
    k.add_argument("--out", help="train: output folder; predict: JSONL file (default stdout)")
    k.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    k.set_defaults(fn=cmd_classify)

    e = sub.add_parser("eval", help="evaluate a run (RUN/eval.json), or score TweetEval predictions")
    e.add_argument("target", help="a run directory, or 'tweeteval-score' to score a predictions folder")
    e.add_argument("--tweeteval", help="TweetEval data folder (default: the bundled data/tweeteval)")
    e.add_argument(
        "--mode", choices=["classifier", "lm", "both", "none"], default="classifier", help="TweetEval mode"
    )
    e.add_argument("--classifier", choices=["finetune", "probe"], default="finetune", help="classifier mode")
    e.add_argument("--train-cap", type=int, help="first N train rows per task (default: all bundled)")
    e.add_argument("--tasks", help="comma-separated TweetEval tasks (default: all seven)")
    e.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="classifiers per task from consecutive seeds, probabilities averaged (or see --seed-choice)",
    )
    e.add_argument(
        "--seed-choice",
        choices=["average", "best"],
        default="average",
        help="with --seeds: average the classifiers' probabilities, or keep the one val scores highest (restarts)",
    )
    finetune_flags(e)
    e.add_argument(
        "--test-cap", type=int, help="first N test rows per task (not comparable to published rows)"
    )
    e.add_argument("--shots", type=int, default=0, help="lm mode: examples in the prompt (default 0)")
    e.add_argument("--chat-prompts", type=int, default=200, help="held-out prompts for format compliance")
    e.add_argument("--out", help="eval.json path (default RUN/eval.json)")
    e.add_argument("--data", help="tweeteval-score: the TweetEval data folder (default: the bundled one)")
    e.add_argument("--predictions", help="tweeteval-score: a folder laid out like the upstream repository's")
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    e.set_defaults(fn=cmd_eval)

    ck = sub.add_parser("checkpoint", help="checkpoint upkeep: convert one from the old pickle format")
    ck.add_argument("action", choices=["convert"])
    ck.add_argument("path", help="run directory (its newest checkpoint) or one step_N checkpoint folder")
    ck.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="required: converting unpickles the old files, which can run code; only for checkpoints you trust",
    )
    ck.set_defaults(fn=cmd_checkpoint)

    r = sub.add_parser(
        "report", help="write RUN/report.md: config, data funnel, curves, eval tables, samples"
    )
    r.add_argument("run", help="run directory")
    r.set_defaults(fn=cmd_report)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (OSError, ValueError) as e:  # bad input, named in one line; anything else is a bug: a traceback
        sys.exit(f"myna {args.verb}: error: {e}")


if __name__ == "__main__":
    main()
