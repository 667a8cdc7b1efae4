"""The `myna` command: one verb per stage, each a thin layer over a function that tests call directly."""

import argparse
import json
import sys
import time
from pathlib import Path

from rich.table import Table

from myna.progress import console, log

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
    console.print(t)


def print_summary(summary: dict) -> None:
    print_funnel(summary["funnel"])
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


def cmd_speedrun(args: argparse.Namespace) -> None:
    from myna.data import pipeline
    from myna.train.pretrain import pretrain

    sample = Path(args.sample)
    if not sample.is_dir():
        sys.exit(f"sample data not found at {sample}: pass --sample DIR (the repository's data/sample)")
    out = Path(args.out)
    cfg = _prepare_config(args)
    t0 = time.perf_counter()
    log(f"[bold]speedrun[/bold] on {sample} -> {out}")
    summary = pipeline.prepare([sample / "posts", sample / "conversations"], out / "data", cfg)
    print_summary(summary)
    # resume=True: a second speedrun continues (or finds finished) the base run instead of refusing to overwrite it
    last = pretrain(out / "data", out / "base", preset=args.preset, steps=args.steps, resume=True)
    log(
        f"base model: step {last['step']}, val loss {last.get('val_loss', float('nan')):.4f}, "
        f"val bits-per-byte {last.get('val_bpb', float('nan')):.4f}"
    )
    log(f"[green]speedrun finished in {time.perf_counter() - t0:.1f} s; artifacts in {out}")


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
    data_flags(d)
    d.set_defaults(fn=cmd_data)

    s = sub.add_parser("speedrun", help="the whole pipeline on the bundled sample")
    s.add_argument("--out", default="runs/speedrun", help="run directory (default runs/speedrun)")
    s.add_argument("--sample", default=str(SAMPLE_DIR), help="sample data folder (default: the bundled one)")
    s.add_argument(
        "--preset", default="cpu", help="model to pre-train (default cpu: about 10 minutes on 2 cores)"
    )
    s.add_argument("--steps", type=int, help="pre-training steps (default: the preset's)")
    data_flags(s)
    s.set_defaults(fn=cmd_speedrun)

    t = sub.add_parser("pretrain", help="train a GPT on token shards (run under torchrun for several GPUs)")
    t.add_argument("--data", required=True, help="data directory from `myna data prepare`")
    t.add_argument("--out", required=True, help="run directory: config, metrics.jsonl, checkpoints")
    t.add_argument(
        "--preset", default="cpu", help="model size: tiny, cpu, 124m, 350m, 1b, 8b, 70b (default cpu)"
    )
    t.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    t.add_argument("--save-every", type=int, help="checkpoint every N steps (default: the preset's)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--parallel", choices=["none", "ddp", "fsdp"], default="none", help="data parallelism")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.set_defaults(fn=cmd_pretrain)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"myna {args.verb}: error: {e}")


if __name__ == "__main__":
    main()
