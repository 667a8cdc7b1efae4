"""The data pipeline: raw dumps -> posts -> clean corpus -> dialogues, prefs -> tokenizer -> token shards.

Each stage is a function from files in a run directory to files in the same directory, so it can be called from
Python, the CLI or a test, and re-entered after a crash: a stage whose outputs exist and whose stamp (a hash of its
parameters and of its inputs' sizes and mtimes) is unchanged is skipped. Outputs are written atomically, so a killed
run leaves only temp files beside them, which the stage removes when it next runs.

Layout of a data directory:
    posts/               every ingested post, one schema (myna.data.schema), as Parquet parts (one per input file)
    rejects.jsonl        every record that could not be read or parsed: file, line, reason, snippet; and every input
                         file that could not be read or holds no post format: scope "file", file, reason
    conversations.jsonl  dialogues read from conversation files (customer-care threads and the like)
    clean/               posts after the filters of myna.data.clean, as Parquet parts (intermediate)
    corpus.parquet       the clean posts minus duplicates, with a `split` column ("train" or "val")
    funnel.json          input = kept + sum(dropped) + rejected, with a count per reason; files read and rejected
    dialogues.jsonl      OpenAI-messages dialogues from reply trees and conversation files
    prefs.jsonl          preference pairs from sibling replies' likes
    tokenizer.json       byte-level BPE
    shards/{train,val}/  token shards
"""

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from myna.data import readers, threads
from myna.data.clean import CleanConfig, clean_table, normalise, scrub_pii
from myna.data.dedup import DedupConfig, dedup
from myna.data.schema import POST_SCHEMA, Reject, posts_to_table
from myna.data.shards import ShardWriter
from myna.data.threads import ThreadConfig
from myna.io import atomic_dir, atomic_path, atomic_write, remove_stale_temps
from myna.progress import Progress, log
from myna.search.tool import tool_dialogues
from myna.tokenizer import FORMAT_FILE, Tokenizer, train_tokenizer

CORPUS_SCHEMA = POST_SCHEMA.append(pa.field("split", pa.string(), nullable=False))  # "train" or "val"
PART_ROWS = 50_000  # posts per Parquet row group: the unit of work handed to a clean worker


@dataclass
class PrepareConfig:
    format: str | None = None  # force one reader for every input; None = detect per file
    read: readers.ReadOptions = field(default_factory=readers.ReadOptions)
    clean: CleanConfig = field(default_factory=CleanConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    threads: ThreadConfig = field(default_factory=ThreadConfig)
    search_dialogues: int = 2000  # dialogues that teach the chat model to call search, one per common hashtag
    val_fraction: float = 0.02  # share of kept posts held out (the latest ones when timestamps exist)
    seed: int = 1337
    vocab_size: int = 8192  # BPE vocabulary size
    tokenizer_max_docs: int = 2_000_000  # BPE training sees at most this many train posts
    tokenizer_from: str | None = (
        None  # use this run's tokenizer (e.g. an imported model's) instead of training one
    )
    workers: int = max(1, min(os.cpu_count() or 1, 8))  # worker processes: all cores, at most 8
    force: bool = False  # rerun stages even when their stamps say they are up to date
    strict: bool = False  # stop at the first input file that cannot be read or holds no post format


# ---------------------------------------------------------------------------------------------------------------
# Stage bookkeeping: stamps for skip-if-fresh, and a bounded parallel map


def _stamp(inputs: list[Path], params: dict) -> str:
    """A hash of the stage's parameters and of its inputs' paths, sizes and mtimes."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    for p in inputs:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _run_stage(
    name: str,
    out: Path,
    inputs: list[Path],
    outputs: list[str],
    params: dict,
    force: bool,
    fn: Callable[[], dict],
) -> dict:
    """Run fn unless the stage's outputs exist and its stamp matches; returns the stage's summary."""
    stamp_path = out / ".stages" / f"{name}.json"
    removed = [p for o in [*outputs, stamp_path] for p in remove_stale_temps(out / o)]
    if removed:
        log(f"[dim]{name}: removed {len(removed)} leftovers of an interrupted run[/dim]")
    stamp = _stamp(inputs, params)
    if not force and stamp_path.exists() and all((out / o).exists() for o in outputs):
        saved = json.loads(stamp_path.read_text())
        if saved.get("stamp") == stamp:
            log(f"[dim]{name}: up to date, skipped[/dim]")
            return saved["summary"]
    t0 = time.perf_counter()
    summary = fn()
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    with atomic_write(stamp_path, "w") as f:
        json.dump({"stamp": stamp, "summary": summary}, f, indent=1)
    return summary


def _pool(workers: int) -> ProcessPoolExecutor | contextlib.nullcontext:
    """A process pool for workers > 1; one worker runs in-process (`with _pool(1) as pool` gives None)."""
    # spawn, not fork: pyarrow and tiktoken keep threads that a fork would copy mid-flight
    return (
        ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
        if workers > 1
        else contextlib.nullcontext()
    )


def bounded_map(fn: Callable, items: Iterable, pool: ProcessPoolExecutor | None, window: int) -> Iterator:
    """map() over a process pool, in order, with at most `window` items in flight (constant memory)."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: list[Future] = []
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.pop(0).result()
    for fut in pending:
        yield fut.result()


def _config_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("force", None)
    d.pop("workers", None)
    return d


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: ingest


def list_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand folders into the files under them (sorted, hidden files and provenance notes left out)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
                and f.suffix.lower() not in (".md", ".license")
                and "LICENSE" not in f.name
            )
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    return files


def _ingest_file(task: tuple[str, Path, str | None, readers.ReadOptions, Path]) -> dict:
    """Read one input file (or one span of it) into a Parquet part of posts (or a JSONL part of conversations),
    plus its rejects; `name` names the part ("00003", or "00003-00001" for a file's second span).

    A file that cannot be read or holds no post format comes back with the reason as its `error` and leaves no
    part: none of its records is kept or counted, the file is.
    """
    name, path, fmt, options, part_dir = task
    size = path.stat().st_size
    part = None
    try:
        readers.check_readable(path)
        fmt = fmt or readers.detect_format(path)
        if fmt == "conversations":
            part = part_dir / f"conversations-{name}.jsonl"
            n_ok, rejects = _write_conversations(path, part)
        else:
            part = part_dir / f"part-{name}.parquet"
            n_ok, rejects = _write_posts(path, fmt, options, part)
    except readers.InputFileError as e:  # raised before the file's first record, or at it (a CSV's header)
        if part is not None:
            part.unlink(missing_ok=True)
        return {"file": str(path), "error": e.reason, "bytes": size}
    return {
        "file": str(path),
        "format": fmt,
        "part": part.name,
        "ok": n_ok,
        "rejects": rejects,
        "bytes": size,
    }


def _write_conversations(path: Path, part: Path) -> tuple[int, list[dict]]:
    rejects: list[dict] = []
    n_ok = 0
    with open(part, "wb") as f:
        for rec in threads.read_conversations(path):
            if isinstance(rec, Reject):
                rejects.append(rec.to_dict())
            else:
                f.write(orjson.dumps(rec) + b"\n")
                n_ok += 1
    return n_ok, rejects


def _write_posts(path: Path, fmt: str, options: readers.ReadOptions, part: Path) -> tuple[int, list[dict]]:
    rejects: list[dict] = []
    n_ok = 0
    with pq.ParquetWriter(part, POST_SCHEMA, compression="zstd") as w:
        batch: list[dict] = []
        for rec in readers.read_posts(path, fmt, options):
            if isinstance(rec, Reject):
                rejects.append(rec.to_dict())
                continue
            batch.append(rec)
            if len(batch) >= PART_ROWS:
                w.write_table(posts_to_table(batch), row_group_size=PART_ROWS)
                n_ok += len(batch)
                batch = []
        if batch:
            w.write_table(posts_to_table(batch), row_group_size=PART_ROWS)
            n_ok += len(batch)
    return n_ok, rejects


def ingest(
    inputs: Iterable[str | Path], out: str | Path, cfg: PrepareConfig | None = None, engine=None
) -> dict:
    """Raw files (any supported format, mixed) -> posts/ (Parquet parts), conversations.jsonl, rejects.jsonl.

    A file that cannot be read or holds no post format is rejected whole and the others go on; with cfg.strict
    it stops the stage (InputFileError) and nothing is written. `engine` (myna.data.ray_engine.RayEngine) reads
    the files on a cluster instead of this machine's processes; every stage takes it.
    """
    cfg = cfg or PrepareConfig()
    out = Path(out)
    files = list_inputs(inputs)
    if not files:
        raise ValueError("no input files given")
    params = {
        "files": [str(f) for f in files],
        "format": cfg.format,
        "read": dataclasses.asdict(cfg.read),
        "strict": cfg.strict,
    }

    def run() -> dict:
        summary = {
            "files": {},
            "files_rejected": 0,
            "posts": 0,
            "conversations": 0,
            "rejected": 0,
            "conversations_rejected": 0,
        }
        with (
            atomic_dir(out / "posts") as part_dir,
            atomic_write(out / "conversations.jsonl", "wb") as cf,
            atomic_write(out / "rejects.jsonl", "wb") as rf,
        ):
            tasks = [(f"{i:05d}", f, cfg.format, cfg.read, part_dir) for i, f in enumerate(files)]
            with (
                Progress("ingest", total=sum(f.stat().st_size for f in files), unit="B") as bar,
                _pool(1 if engine else min(cfg.workers, len(files))) as pool,
            ):
                results = (
                    engine.ingest(files, cfg, part_dir)
                    if engine
                    else bounded_map(_ingest_file, tasks, pool, window=2 * cfg.workers)
                )
                for r in results:
                    bar.advance(r["bytes"], f"{Path(r['file']).name} ({r.get('format', 'rejected')})")
                    if "error" in r:
                        if cfg.strict:
                            raise readers.InputFileError(r["file"], r["error"])
                        summary["files_rejected"] += 1
                        summary["files"][r["file"]] = {"error": r["error"]}
                        reject = {"stage": "ingest", "scope": "file", "file": r["file"], "reason": r["error"]}
                        rf.write(orjson.dumps(reject) + b"\n")
                        continue
                    if r["format"] == "conversations":
                        part = part_dir / r["part"]
                        cf.write(part.read_bytes())
                        part.unlink()
                        summary["conversations"] += r["ok"]
                        summary["conversations_rejected"] += len(r["rejects"])
                    else:
                        summary["posts"] += r["ok"]
                        summary["rejected"] += len(r["rejects"])
                    for rej in r["rejects"]:
                        rf.write(orjson.dumps({"stage": "ingest", **rej}) + b"\n")
                    summary["files"][r["file"]] = {
                        "format": r["format"],
                        "ok": r["ok"],
                        "rejected": len(r["rejects"]),
                    }
            if summary["files_rejected"] == len(files):  # nothing left to go on with: fail, write nothing
                first, file = next(iter(summary["files"].items()))
                raise ValueError(
                    f"no input file could be read as posts ({len(files)} rejected); the first: {first}: "
                    f"{file['error']}"
                )
        return summary

    return _run_stage(
        "ingest", out, files, ["posts", "conversations.jsonl", "rejects.jsonl"], params, cfg.force, run
    )


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: clean


def parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet"))


def read_parts(folder: Path, columns: list[str] | None = None) -> pa.Table:
    """A folder of Parquet parts as one table, in part order."""
    tables = [pq.read_table(p, columns=columns) for p in parts(folder)]
    return (
        pa.concat_tables(tables) if tables else POST_SCHEMA.empty_table().select(columns or POST_SCHEMA.names)
    )


def _clean_row_group(task: tuple[int, Path, int, CleanConfig, Path]) -> tuple[int, Counter, Counter, int]:
    """Clean one row group of a posts part into its own clean part (written by the worker, not sent back)."""
    index, src, row_group, ccfg, dst_dir = task
    batch = pq.ParquetFile(src).read_row_group(row_group)
    kept, dropped, pii = clean_table(batch, ccfg)
    pq.write_table(kept, dst_dir / f"part-{index:06d}.parquet", compression="zstd")
    return kept.num_rows, dropped, pii, batch.num_rows


def clean(out: str | Path, cfg: PrepareConfig | None = None, engine=None) -> dict:
    """posts/ -> clean/, counting every drop by reason."""
    cfg = cfg or PrepareConfig()
    out = Path(out)
    src = parts(out / "posts")

    def run() -> dict:
        dropped: Counter = Counter()
        pii: Counter = Counter()
        kept = total = 0
        groups = [(p, g) for p in src for g in range(pq.ParquetFile(p).num_row_groups)]
        n_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in src)
        with (
            atomic_dir(out / "clean") as dst,
            Progress("clean", total=n_rows, unit="posts") as bar,
            _pool(1 if engine else cfg.workers) as pool,
        ):
            tasks = [(i, p, g, cfg.clean, dst) for i, (p, g) in enumerate(groups)]
            results = (
                engine.clean(tasks)
                if engine
                else bounded_map(_clean_row_group, tasks, pool, window=2 * cfg.workers)
            )
            for n_kept, d, p, n in results:
                kept += n_kept
                total += n
                dropped.update(d)
                pii.update(p)
                bar.advance(n)
        return {"input": total, "kept": kept, "dropped": dict(dropped), "pii": dict(pii)}

    return _run_stage("clean", out, src, ["clean"], {"clean": dataclasses.asdict(cfg.clean)}, cfg.force, run)


# ---------------------------------------------------------------------------------------------------------------
# Stage 3: de-duplicate and split


def untimed_val(ids: list[str], val_fraction: float, seed: int) -> list[bool]:
    """The val share of posts without a timestamp: a seeded hash of the id, so a post's split never changes."""
    cutoff = int(val_fraction * 2**32)
    return [xxhash.xxh32_intdigest(i.encode(), seed) < cutoff for i in ids]


def assign_split(table: pa.Table, val_fraction: float, seed: int) -> np.ndarray:
    """True for val rows: the latest posts among those with a timestamp, a seeded random share of the others."""
    n = table.num_rows
    is_val = np.zeros(n, dtype=bool)
    if n == 0 or val_fraction <= 0:
        return is_val
    has_time = np.asarray(table.column("created_at").is_valid())
    n_timed = int(has_time.sum())
    if n_timed:
        # nulls sort first, so the last n_val rows of the order are the latest timestamped posts
        order = np.asarray(pc.sort_indices(table, sort_keys=[("created_at", "ascending", "at_start")]))
        n_val = max(1, round(n_timed * val_fraction))
        is_val[order[n - n_val :]] = True
    untimed = np.flatnonzero(~has_time)
    if len(untimed):
        is_val[untimed] = untimed_val(
            table.column("id").take(pa.array(untimed)).to_pylist(), val_fraction, seed
        )
    return is_val


def dedup_and_split(out: str | Path, cfg: PrepareConfig | None = None, engine=None) -> dict:
    """clean/ -> corpus.parquet: duplicates removed (the earliest post kept), each post given a split."""
    cfg = cfg or PrepareConfig()
    out = Path(out)
    src = parts(out / "clean")

    def run() -> dict:
        # only the columns dedup and the split read are held for the whole set; the rest streams part by part
        table = read_parts(out / "clean", ["id", "author_id", "created_at", "text"])
        log(f"dedup: {table.num_rows:,} posts")
        res = dedup(table, dataclasses.replace(cfg.dedup, workers=cfg.workers))
        is_val = np.zeros(table.num_rows, dtype=bool)
        is_val[res.keep] = assign_split(table.filter(pa.array(res.keep)), cfg.val_fraction, cfg.seed)
        split = np.where(is_val, "val", "train")
        start = 0
        with (
            atomic_path(out / "corpus.parquet") as tmp,
            pq.ParquetWriter(tmp, CORPUS_SCHEMA, compression="zstd") as w,
        ):
            for part in src:
                rows = pq.read_table(part)
                end = start + rows.num_rows
                keep = pa.array(res.keep[start:end])
                rows = rows.append_column(CORPUS_SCHEMA.field("split"), pa.array(split[start:end]))
                w.write_table(rows.filter(keep))
                start = end
        return {
            "input": table.num_rows,
            "kept": int(res.keep.sum()),
            "dropped": dict(res.dropped),
            "train": int((res.keep & ~is_val).sum()),
            "val": int(is_val.sum()),
        }

    body = functools.partial(engine.dedup_and_split, out, cfg) if engine else run
    params = {"dedup": _config_dict(cfg.dedup), "val_fraction": cfg.val_fraction, "seed": cfg.seed}
    return _run_stage("dedup", out, src, ["corpus.parquet"], params, cfg.force, body)


# ---------------------------------------------------------------------------------------------------------------
# Stage 4: threads -> dialogues and preference pairs


def _scrub_dialogue(record: dict, pii: Counter) -> dict:
    """Dialogues get the corpus's normalisation and PII scrubbing: they are training text too."""
    for m in [*record.get("messages", ()), *record.get("prompt", ())]:
        if m.get("content") is not None:  # None: an assistant turn that only calls a tool
            m["content"] = scrub_pii(normalise(m["content"]), pii)
    for key in ("chosen", "rejected"):
        if key in record:
            record[key] = scrub_pii(normalise(record[key]), pii)
    return record


def _hashtag_posts(corpus: Path) -> dict[str, list]:
    """The train posts that carry a hashtag (listed, or written with '#'): all that tool_dialogues reads, streamed
    so that only those posts are held, not the corpus."""
    columns = ["id", "author_id", "author_name", "created_at", "text", "hashtags", "split"]
    columns = [c for c in columns if c in pq.read_schema(corpus).names]
    kept = []
    for batch in pq.ParquetFile(corpus).iter_batches(batch_size=65_536, columns=columns):
        t = pa.Table.from_batches([batch])
        tagged = pc.or_kleene(
            pc.greater(pc.list_value_length(t["hashtags"]), 0), pc.match_substring(t["text"], "#")
        )
        kept.append(t.filter(pc.and_kleene(pc.equal(t["split"], "train"), tagged)))
    return pa.concat_tables(kept).to_pydict() if kept else {c: [] for c in columns}


def build_dialogues(out: str | Path, cfg: PrepareConfig | None = None, engine=None) -> dict:
    """posts/ reply trees + conversations.jsonl + corpus.parquet's hashtags -> dialogues.jsonl and prefs.jsonl."""
    cfg = cfg or PrepareConfig()
    out = Path(out)
    inputs = [*parts(out / "posts"), out / "conversations.jsonl", out / "corpus.parquet"]

    def run() -> dict:
        if engine:
            dialogues, prefs, stats = engine.threads(out, cfg)
        else:
            res = threads.build_threads(read_parts(out / "posts", threads.COLUMNS), cfg.threads)
            dialogues, prefs, stats = res.dialogues, res.prefs, res.stats
        pii: Counter = Counter()
        n_conv = n_threads = n_prefs = 0
        with atomic_write(out / "dialogues.jsonl", "wb") as f:
            for d in dialogues:
                f.write(orjson.dumps(_scrub_dialogue(d, pii)) + b"\n")
                n_threads += 1
            with open(out / "conversations.jsonl", "rb") as conv:
                for line in conv:
                    f.write(orjson.dumps(_scrub_dialogue(orjson.loads(line), pii)) + b"\n")
                    n_conv += 1
            searching = tool_dialogues(_hashtag_posts(out / "corpus.parquet"), cfg.search_dialogues)
            for d in searching:
                f.write(orjson.dumps(_scrub_dialogue(d, pii)) + b"\n")
        with atomic_write(out / "prefs.jsonl", "wb") as f:
            for p in prefs:
                f.write(orjson.dumps(_scrub_dialogue(p, pii)) + b"\n")
                n_prefs += 1
        return {
            "dialogues_from_threads": n_threads,
            "dialogues_from_conversations": n_conv,
            "dialogues_calling_search": len(searching),
            "prefs": n_prefs,
            "pii_scrubbed": dict(pii),
            "threads": stats,
        }

    params = {"threads": dataclasses.asdict(cfg.threads), "search_dialogues": cfg.search_dialogues}
    return _run_stage("threads", out, inputs, ["dialogues.jsonl", "prefs.jsonl"], params, cfg.force, run)


# ---------------------------------------------------------------------------------------------------------------
# Stage 5: tokenizer and token shards


def _texts(corpus: Path, split: str, limit: int | None = None) -> Iterator[str]:
    n = 0
    for batch in pq.ParquetFile(corpus).iter_batches(batch_size=65_536, columns=["text", "split"]):
        texts = batch.column(0).filter(pc.equal(batch.column(1), split)).to_pylist()
        for t in texts:
            if limit is not None and n >= limit:
                return
            n += 1
            yield t


def build_tokenizer(out: str | Path, cfg: PrepareConfig | None = None) -> dict:
    """corpus.parquet (train split) -> tokenizer.json; or the tokenizer of the run `cfg.tokenizer_from`."""
    cfg = cfg or PrepareConfig()
    out = Path(out)
    src = out / "corpus.parquet"
    if cfg.tokenizer_from is not None:
        given = Path(cfg.tokenizer_from)
        given = given / "tokenizer.json" if given.is_dir() else given
        if not given.is_file():
            raise FileNotFoundError(
                f"{given}: no tokenizer to use (--tokenizer-from takes a run or a tokenizer.json)"
            )
        inputs = [given, *[p for p in [given.with_name(FORMAT_FILE)] if p.is_file()]]

        def copy() -> dict:
            log(f"tokenizer: {given}'s, as it is")
            tok = Tokenizer.from_file(given)
            tok.save(out / "tokenizer.json")
            return {"vocab_size": tok.vocab_size, "from": str(given)}

        return _run_stage("tokenizer", out, inputs, ["tokenizer.json"], {"from": str(given)}, cfg.force, copy)

    def run() -> dict:
        log(f"tokenizer: training byte-level BPE, vocab {cfg.vocab_size:,}")
        tok = train_tokenizer(
            _texts(src, "train", cfg.tokenizer_max_docs), cfg.vocab_size, out / "tokenizer.json"
        )
        return {"vocab_size": tok.vocab_size}

    params = {"vocab_size": cfg.vocab_size, "max_docs": cfg.tokenizer_max_docs}
    return _run_stage("tokenizer", out, [src], ["tokenizer.json"], params, cfg.force, run)


def encode_row_group(
    corpus: Path, row_group: int, tok: Tokenizer, threads: int
) -> list[tuple[str, list, int]]:
    """(split, token ids of each post, text bytes) for one row group of corpus.parquet, batch by batch, train
    before val in each batch: the order the shards hold them in (both engines write through this)."""
    table = pq.ParquetFile(corpus).read_row_group(row_group, columns=["text", "split"])
    out = []
    for batch in table.to_batches(max_chunksize=8192):
        for split in ("train", "val"):
            texts = batch.column(0).filter(pc.equal(batch.column(1), split))
            ids = tok.encode_batch(texts.to_pylist(), num_threads=threads)
            out.append((split, ids, pc.sum(pc.binary_length(texts)).as_py() or 0))
    return out


def write_shards(
    out: Path, vocab_size: int, bos_id: int, encoded: Iterable[list[tuple[str, list, int]]]
) -> dict:
    """shards/{train,val}/ from encode_row_group's output, row group by row group."""
    counts = {s: {"docs": 0, "tokens": 0, "bytes": 0} for s in ("train", "val")}
    with contextlib.ExitStack() as stack:
        writers = {}
        for split in counts:  # each split's folder is swapped in whole, so no run mixes with an older one
            folder = stack.enter_context(atomic_dir(out / "shards" / split))
            writers[split] = stack.enter_context(ShardWriter(folder, split, vocab_size, bos_id=bos_id))
        for group in encoded:
            for split, ids, n_bytes in group:
                writers[split].add_many(ids)
                c = counts[split]
                c["docs"] += len(ids)
                c["tokens"] = writers[split].num_tokens  # bos included
                c["bytes"] += n_bytes
    for c in counts.values():
        c["bytes_per_token"] = round(c["bytes"] / max(1, c["tokens"] - c["docs"]), 3)  # bos carries no text
    return counts


def tokenize(out: str | Path, cfg: PrepareConfig | None = None, engine=None) -> dict:
    """corpus.parquet + tokenizer.json -> shards/train/*.bin and shards/val/*.bin (each post starts with bos)."""
    cfg = cfg or PrepareConfig()
    out = Path(out)
    inputs = [out / "corpus.parquet", out / "tokenizer.json"]

    def run() -> dict:
        tok = Tokenizer.from_file(inputs[1])
        meta = pq.ParquetFile(inputs[0]).metadata
        with Progress("tokenize", total=meta.num_rows, unit="posts") as bar:

            def encoded() -> Iterator[list]:
                groups = (
                    engine.encode(inputs[0], inputs[1], meta.num_row_groups)
                    if engine
                    else (
                        encode_row_group(inputs[0], g, tok, cfg.workers) for g in range(meta.num_row_groups)
                    )
                )
                for g, group in enumerate(groups):
                    yield group
                    bar.advance(meta.row_group(g).num_rows)

            return write_shards(out, tok.vocab_size, tok.bos_id, encoded())

    return _run_stage("tokenize", out, inputs, ["shards/train", "shards/val"], {}, cfg.force, run)


# ---------------------------------------------------------------------------------------------------------------
# All stages


def write_funnel(out: Path, ing: dict, cln: dict, ddp: dict) -> dict:
    """funnel.json: input = kept + sum(dropped) + rejected, checked here so a broken count never gets written.

    Posts are counted in posts; an input file rejected whole holds no countable posts, so `files` counts it.
    """
    dropped = Counter(cln["dropped"]) + Counter(ddp["dropped"])
    n_files, n_bad = len(ing["files"]), ing["files_rejected"]
    funnel = {
        "input": ing["posts"] + ing["rejected"],
        "kept": ddp["kept"],
        "dropped": dict(sorted(dropped.items(), key=lambda kv: -kv[1])),
        "rejected": ing["rejected"],
        "pii_scrubbed": cln["pii"],
        "split": {"train": ddp["train"], "val": ddp["val"]},
        "conversations": {
            "input": ing["conversations"] + ing["conversations_rejected"],
            "kept": ing["conversations"],
            "rejected": ing["conversations_rejected"],
        },
        "files": {"input": n_files, "read": n_files - n_bad, "rejected": n_bad},
    }
    if funnel["input"] != funnel["kept"] + sum(dropped.values()) + funnel["rejected"]:
        raise RuntimeError(f"funnel does not add up: {funnel}")
    remove_stale_temps(out / "funnel.json")
    with atomic_write(out / "funnel.json", "w") as f:
        json.dump(funnel, f, indent=2)
    return funnel


def prepare(
    inputs: Iterable[str | Path], out: str | Path, cfg: PrepareConfig | None = None, engine=None
) -> dict:
    """Every stage, in order; returns a summary with the funnel and each stage's numbers. The tokenizer is
    trained on this machine whatever the engine (BPE sees at most cfg.tokenizer_max_docs posts)."""
    cfg = cfg or PrepareConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ing = ingest(inputs, out, cfg, engine)
    cln = clean(out, cfg, engine)
    ddp = dedup_and_split(out, cfg, engine)
    funnel = write_funnel(out, ing, cln, ddp)
    thr = build_dialogues(out, cfg, engine)
    tkn = build_tokenizer(out, cfg)
    shd = tokenize(out, cfg, engine)
    return {
        "funnel": funnel,
        "ingest": ing,
        "clean": cln,
        "dedup": ddp,
        "threads": thr,
        "tokenizer": tkn,
        "shards": shd,
    }
