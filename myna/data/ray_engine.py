"""`myna data prepare --engine ray`: the stages of myna.data.pipeline run by Ray Data, on one machine or a cluster.

Each stage keeps its stamps, outputs and funnel; only the work moves (pipeline.py calls the methods below):
- ingest: files fan out over the workers. An uncompressed file of one record a line (JSON lines, text) larger than
  span_bytes is cut into line-aligned byte ranges: each range's newlines are counted first (so its reader knows its
  first line number: ids and rejects name the file's own lines), then as many workers read it. Compressed streams,
  CSV (quoted newlines), Parquet and JSON documents are read whole by one worker.
- clean: one task per row group of posts/, written by the worker, as locally.
- dedup: comparison keys per part; a hash shuffle on the key's hash puts every copy of a text in one partition,
  where author repeats and exact copies are decided. The survivors' MinHash signatures are exploded into one row
  per LSH band, and a shuffle on (band, bucket) puts each bucket in one partition, where candidate pairs are made
  and verified: no worker holds every signature. The driver holds the verified pairs (union-find into clusters)
  and the row number of each dropped post (8 bytes a duplicate).
- split: the latest posts, by a distributed sort of the kept posts' (time, row).
- threads: repeated ids by a shuffle on the id; reply edges by a join of replies on their parent's id; the driver
  turns the edges into each reply's conversation (the root of its reply tree, what Twitter's conversation_id is)
  by pointer jumping over replies only; a shuffle on the conversation puts each tree in one partition, where
  threads.build_threads runs on it.
- tokenize: one task per row group of corpus.parquet; the driver writes the shards in order.
The tokenizer is trained on the driver (BPE sees at most tokenizer_max_docs posts), as locally.

Every output equals the local engine's on the same input (tests/test_ray_engine.py): the same functions run on
the same rows, and every order-dependent choice ("the earliest post", "the first row of an id") is by row number.
The data folder must be one that every node sees (NFS, a parallel file system) on a multi-node cluster.
"""

import functools
import math
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from myna.data import pipeline, readers, threads
from myna.data.clean import CleanConfig
from myna.data.dedup import (
    DedupConfig,
    _author_codes,
    _band_hashes,
    _run_starts,
    _union_find,
    _verified,
    author_repeats,
    bucket_pairs,
    comparison_key,
    exact_copies,
    lsh_params,
    minhash_signatures,
)
from myna.io import atomic_path
from myna.tokenizer import Tokenizer

NO_TIME = np.iinfo(np.int64).max  # a post without a timestamp sorts after every dated one ("nulls last")
KEPT, AUTHOR_REPEAT, EXACT_COPY = 0, 1, 2


@dataclass
class RayEngine:
    address: str | None = None  # a running cluster ("auto", "ray://head:10001"); None starts one on 127.0.0.1
    span_bytes: int = 256 << 20  # larger line-format files are read in ranges of about this many bytes
    partitions: int | None = None  # hash-shuffle partitions; None: 4 per CPU of the cluster
    cpus: int | None = None  # CPUs of the local instance (None: all); ignored with an address

    def start(self) -> None:
        """Connect to the cluster, or start a local instance bound to the loopback address."""
        import ray

        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                # the node binds to its non-loopback address unless told otherwise
                ray.init(
                    _node_ip_address="127.0.0.1",
                    include_dashboard=False,
                    num_cpus=self.cpus,
                    log_to_driver=False,
                )
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # outputs in input order, so both engines write the same
        if self.partitions is None:
            self.partitions = 4 * max(1, int(ray.cluster_resources().get("CPU", 1)))

    # -----------------------------------------------------------------------------------------------------------
    # ingest and clean

    def ingest(self, files: list[Path], cfg: pipeline.PrepareConfig, part_dir: Path) -> Iterator[dict]:
        """Each file's result as pipeline._ingest_file gives it, in file order (a file's spans merged)."""
        self.start()
        items = [{"index": i, "path": str(f)} for i, f in enumerate(files)]
        plan = functools.partial(_plan_file, fmt=cfg.format, span_bytes=self.span_bytes)
        plans = _run(items, plan)
        spans = [
            {"index": p["index"], "path": p["path"], "k": k, "start": s, "end": e}
            for p in plans
            for k, (s, e) in enumerate(orjson.loads(p["spans"]))
        ]
        split = {s["index"] for s in spans if s["k"] > 0}
        counted = _run([s for s in spans if s["index"] in split], _count_span)
        lines = {(c["index"], c["k"]): c["lines"] for c in counted}
        tasks, first_line = [], {}
        for s in spans:
            first = first_line.get(s["index"], 1)
            first_line[s["index"]] = first + lines.get((s["index"], s["k"]), 0)
            several = s["index"] in split
            tasks.append(
                {
                    "index": s["index"],
                    "name": f"{s['index']:05d}-{s['k']:05d}" if several else f"{s['index']:05d}",
                    "path": s["path"],
                    "fmt": plans[s["index"]]["fmt"],
                    "span": orjson.dumps([s["start"], s["end"], first]).decode() if several else "",
                    "error": plans[s["index"]]["error"],
                }
            )
        read = functools.partial(_read_span, options=cfg.read, part_dir=str(part_dir))
        by_file: dict[int, list[dict]] = {}
        for r in _run(tasks, read):
            by_file.setdefault(r["index"], []).append(orjson.loads(r["result"]))
        for i, f in enumerate(files):
            yield _merge_spans(str(f), by_file[i], part_dir)

    def clean(self, tasks: list[tuple[int, Path, int, CleanConfig, Path]]) -> Iterator[tuple]:
        """pipeline._clean_row_group over the row groups, in order."""
        self.start()
        if not tasks:
            return
        ccfg, dst = tasks[0][3], str(tasks[0][4])
        items = [{"index": i, "path": str(p), "group": g} for i, p, g, _, _ in tasks]
        for r in _run(items, functools.partial(_clean_task, ccfg=ccfg, dst=dst)):
            yield r["kept"], Counter(orjson.loads(r["dropped"])), Counter(orjson.loads(r["pii"])), r["rows"]

    # -----------------------------------------------------------------------------------------------------------
    # dedup and split

    def dedup_and_split(self, out: Path, cfg: pipeline.PrepareConfig) -> dict:
        """clean/ -> corpus.parquet, as pipeline.dedup_and_split decides it."""
        import ray

        self.start()
        dcfg = cfg.dedup
        parts = _row_offsets(pipeline.parts(out / "clean"))
        n = sum(p["rows"] for p in parts)
        if n == 0:  # nothing to compare: every part is written as it is (empty)
            return self._write_corpus(
                out, cfg, parts, np.empty(0, np.int64), np.empty(0, np.int64), Counter()
            )
        keys = ray.data.from_items(parts).map_batches(_key_rows, batch_size=1, batch_format="pyarrow")
        groups = keys.repartition(self.partitions, keys=["key_hash"]).map_batches(
            functools.partial(_exact_partition, author_max=dcfg.author_repeat_max, exact=dcfg.exact),
            batch_size=None,
            batch_format="pyarrow",
        )
        decided = groups.materialize()
        status = _column_arrays(_where(decided, pc.field("status") != KEPT).select_columns(["row", "status"]))
        dropped = Counter()
        if dcfg.author_repeat_max is not None:
            dropped["author_repeat"] = int((status["status"] == AUTHOR_REPEAT).sum())
        if dcfg.exact:
            dropped["exact_duplicate"] = int((status["status"] == EXACT_COPY).sum())
        gone = [status["row"]]
        reps = _where(decided, pc.field("status") == KEPT)
        if dcfg.near:
            near = self._near_duplicates(reps, dcfg)
            dropped["near_duplicate"] = len(near)
            gone.append(near)
        gone = np.sort(np.concatenate(gone))
        return self._write_corpus(out, cfg, parts, gone, self._latest(reps, gone, cfg.val_fraction), dropped)

    def _write_corpus(
        self, out: Path, cfg, parts: list[dict], gone: np.ndarray, val: np.ndarray, dropped
    ) -> dict:
        """corpus.parquet: each clean part's kept posts with their split, written by the workers, then joined
        in part order (a temp folder that a killed run's next stage removes)."""
        write = functools.partial(_write_corpus_part, gone=gone, val=val, cfg=cfg)
        tmp = Path(tempfile.mkdtemp(prefix=".corpus.parquet.", suffix=".tmp", dir=out))
        try:
            written = _run([{**p, "dst": str(tmp)} for p in parts], write)
            with (
                atomic_path(out / "corpus.parquet") as path,
                pq.ParquetWriter(path, pipeline.CORPUS_SCHEMA, compression="zstd") as w,
            ):
                for p in parts:
                    w.write_table(pq.read_table(tmp / Path(p["path"]).name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        n, n_val = sum(p["rows"] for p in parts), sum(r["val"] for r in written)
        kept = n - len(gone)
        return {"input": n, "kept": kept, "dropped": dict(dropped), "train": kept - n_val, "val": n_val}

    def _near_duplicates(self, reps, dcfg: DedupConfig) -> np.ndarray:
        """Rows of the surviving posts that are near-duplicates of an earlier one."""
        bands, rows = lsh_params(dcfg.threshold, dcfg.num_perm)
        exploded = reps.map_batches(
            functools.partial(_band_rows, dcfg=replace(dcfg, workers=1), bands=bands, rows=rows),
            batch_format="pyarrow",
        )
        pairs = _column_arrays(
            exploded.repartition(self.partitions, keys=["band", "bucket"]).map_batches(
                functools.partial(_bucket_pairs, threshold=dcfg.threshold, num_perm=dcfg.num_perm),
                batch_size=None,
                batch_format="pyarrow",
            )
        )
        if not len(pairs["i"]):
            return np.empty(0, dtype=np.int64)
        # the same pair may come from several bands: one of each, as the local engine's np.unique
        packed, first = np.unique(np.stack([pairs["i"], pairs["j"]], axis=1), axis=0, return_index=True)
        touched, where = np.unique(packed, return_inverse=True)
        ts = np.empty(len(touched), dtype=np.int64)
        ts[where.reshape(-1, 2)[:, 0]] = pairs["ts_i"][first]
        ts[where.reshape(-1, 2)[:, 1]] = pairs["ts_j"][first]
        rank = np.empty(len(touched), dtype=np.int64)
        rank[np.lexsort((touched, ts))] = np.arange(len(touched))
        root = _union_find(len(touched), where.reshape(-1, 2), rank)
        return touched[root != np.arange(len(touched))]

    def _latest(self, reps, gone: np.ndarray, val_fraction: float) -> np.ndarray:
        """Rows of the val split among dated posts: the latest share of those kept (ties: the later row)."""
        if val_fraction <= 0:
            return np.empty(0, dtype=np.int64)
        # materialised: counting and sorting would each run the filters again
        dated = (
            _where(reps, pc.field("ts") != NO_TIME)
            .map_batches(functools.partial(_not_in, gone=gone), batch_format="pyarrow")
            .select_columns(["ts", "row"])
            .materialize()
        )
        n_timed = dated.count()
        if not n_timed:
            return np.empty(0, dtype=np.int64)
        n_val = max(1, round(n_timed * val_fraction))
        latest = dated.sort(["ts", "row"], descending=True).limit(n_val)
        return np.sort(_column_arrays(latest)["row"])

    # -----------------------------------------------------------------------------------------------------------
    # threads

    def threads(self, out: Path, cfg: pipeline.PrepareConfig) -> tuple[Iterator[dict], Iterator[dict], dict]:
        """(dialogues, preference pairs, stats) as threads.build_threads gives them over every post."""
        import ray

        self.start()
        parts = _row_offsets(pipeline.parts(out / "posts"))
        posts = ray.data.from_items(parts).map_batches(_thread_rows, batch_size=1, batch_format="pyarrow")
        # skip: 1 a repost, 2 no text, 3 an id seen in an earlier row; 0 a post a thread can hold
        posts = (
            posts.repartition(self.partitions, keys=["id"])
            .map_batches(_first_of_id, batch_size=None, batch_format="pyarrow")
            .materialize()
        )
        skipped = Counter(_column_arrays(posts.select_columns(["skip"]))["skip"].tolist())
        usable = _where(posts, pc.field("skip") == 0).drop_columns(["skip"]).materialize()
        # a reply meets its parent in the partition of the parent's id
        edges = _column_arrays(
            usable.map_batches(_keyed, batch_format="pyarrow")
            .repartition(self.partitions, keys=["key"])
            .map_batches(_reply_edges, batch_size=None, batch_format="pyarrow")
        )
        child, root = conversation_roots(edges["row"], edges["parent_row"])
        trees = usable.map_batches(
            functools.partial(_with_root, child=child, root=root), batch_format="pyarrow"
        )
        built = _column_arrays(
            _where(trees, pc.field("root") >= 0)
            .repartition(self.partitions, keys=["root"])
            .map_batches(
                functools.partial(_threads_partition, tcfg=cfg.threads),
                batch_size=None,
                batch_format="pyarrow",
            )
        )
        stats = Counter()
        for record in built["record"][built["kind"] == "s"]:
            part = orjson.loads(record)
            stats["max_depth"] = max(stats["max_depth"], part.pop("max_depth"))
            stats.update(part)
        stats.update(
            posts=sum(p["rows"] for p in parts),
            reposts_skipped=skipped.get(1, 0),
            empty_text_skipped=skipped.get(2, 0),
            duplicate_ids=skipped.get(3, 0),
            unreachable_posts=int((root < 0).sum()),
        )
        stats = {key: stats.get(key, 0) for key in threads.STAT_KEYS}
        # the local engine's order: conversation by conversation (by root row), each in build_threads' order
        order = np.lexsort((built["seq"], built["root"]))
        kinds, records = built["kind"][order], built["record"][order]
        return _records(records, kinds, "d"), _records(records, kinds, "p"), stats

    # -----------------------------------------------------------------------------------------------------------
    # tokenize

    def encode(self, corpus: Path, tokenizer: Path, groups: int) -> Iterator[list]:
        """pipeline.encode_row_group for every row group of corpus.parquet, in order."""
        self.start()
        items = [{"group": g} for g in range(groups)]
        enc = functools.partial(_encode_task, corpus=str(corpus), tokenizer=str(tokenizer))
        for r in _run(items, enc):
            docs = np.split(
                np.frombuffer(r["tokens"], dtype=np.int32), np.cumsum(np.frombuffer(r["lengths"], np.int64))
            )
            group, at = [], 0
            for split, n_docs, n_bytes in orjson.loads(r["chunks"]):
                group.append((split, docs[at : at + n_docs], n_bytes))
                at += n_docs
            yield group


# ---------------------------------------------------------------------------------------------------------------
# Driver helpers


def _run(items: list[dict], fn) -> list[dict]:
    """fn over each item on the cluster, results in item order (one row in, one row out)."""
    import ray

    if not items:
        return []
    return ray.data.from_items(items).map(fn).take_all()


def _column_arrays(ds) -> dict[str, np.ndarray]:
    """A (small) dataset's columns as numpy arrays on the driver; a dataset of no rows gives empty arrays."""
    tables = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    columns = defaultdict(lambda: np.empty(0, dtype=np.int64))
    if tables:
        table = pa.concat_tables(tables)
        columns.update({name: table.column(name).to_numpy() for name in table.column_names})
    return columns


def _row_offsets(parts: list[Path]) -> list[dict]:
    """Each Parquet part with the global row number of its first row (the local engine's row order)."""
    items, start = [], 0
    for p in parts:
        rows = pq.ParquetFile(p).metadata.num_rows
        items.append({"path": str(p), "offset": start, "rows": rows})
        start += rows
    return items


def _where(ds, condition: pc.Expression):
    """The rows of a dataset that meet an Arrow expression, filtered batch by batch in the workers."""
    return ds.map_batches(functools.partial(_filter, condition=condition), batch_format="pyarrow")


def _filter(t: pa.Table, condition: pc.Expression) -> pa.Table:
    return t.filter(condition)


def _records(records: np.ndarray, kinds: np.ndarray, kind: str) -> Iterator[dict]:
    for record in records[kinds == kind]:
        yield orjson.loads(record)


def conversation_roots(child: np.ndarray, parent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(replies sorted, the root row of each, -1 inside a reply cycle) from reply edges, by pointer jumping:
    each round every reply jumps to its ancestor's ancestor, so a thread n posts deep takes log2(n) rounds."""
    order = np.argsort(child, kind="stable")
    child, up = child[order].astype(np.int64), parent[order].astype(np.int64)
    for _ in range(max(1, math.ceil(math.log2(len(child) + 1))) + 1):
        at = np.minimum(np.searchsorted(child, up), max(0, len(child) - 1))
        is_reply = len(child) > 0 and child[at] == up
        if not np.any(is_reply):
            break
        up = np.where(is_reply, up[at], up)
    if len(child):
        at = np.minimum(np.searchsorted(child, up), len(child) - 1)
        up[child[at] == up] = -1  # still a reply after enough rounds for any chain: a cycle
    return child, up


# ---------------------------------------------------------------------------------------------------------------
# Worker functions (module level, so Ray workers import them)


def _plan_file(item: dict, fmt: str | None, span_bytes: int) -> dict:
    """The file's format and byte spans; a file that cannot be read keeps its error for the read task."""
    path = item["path"]
    try:
        readers.check_readable(path)
        fmt = fmt or readers.detect_format(path)
    except readers.InputFileError as e:
        return {**item, "fmt": "", "spans": "[[0, 0]]", "error": e.reason}
    size = os.path.getsize(path)
    if fmt != "conversations" and size > span_bytes and readers.splittable(path, fmt):
        spans = readers.line_spans(path, span_bytes)
    else:
        spans = [(0, size)]
    return {**item, "fmt": fmt, "spans": orjson.dumps(spans).decode(), "error": ""}


def _count_span(item: dict) -> dict:
    return {**item, "lines": readers.count_lines(item["path"], item["start"], item["end"])}


def _read_span(item: dict, options: readers.ReadOptions, part_dir: str) -> dict:
    if item["error"]:
        size = Path(item["path"]).stat().st_size if Path(item["path"]).exists() else 0
        result = {"file": item["path"], "error": item["error"], "bytes": size}
    else:
        if item["span"]:
            start, end, first = orjson.loads(item["span"])
            options = replace(options, span=readers.Span(start, end, first))
        task = (item["name"], Path(item["path"]), item["fmt"], options, Path(part_dir))
        result = pipeline._ingest_file(task)
        if item["span"]:
            result["bytes"] = end - start
    return {"index": item["index"], "result": orjson.dumps(result).decode()}


def _merge_spans(path: str, results: list[dict], part_dir: Path) -> dict:
    """One file's result from its spans': any span's error rejects the whole file (its parts removed)."""
    error = next((r for r in results if "error" in r), None)
    if error is not None:
        for r in results:
            if "part" in r:
                (part_dir / r["part"]).unlink(missing_ok=True)
        return {"file": path, "error": error["error"], "bytes": sum(r["bytes"] for r in results)}
    if len(results) == 1:
        return results[0]
    return {
        "file": path,
        "format": results[0]["format"],
        "part": None,  # several parts, already in place
        "ok": sum(r["ok"] for r in results),
        "rejects": [rej for r in results for rej in r["rejects"]],
        "bytes": sum(r["bytes"] for r in results),
    }


def _clean_task(item: dict, ccfg: CleanConfig, dst: str) -> dict:
    task = (item["index"], Path(item["path"]), item["group"], ccfg, Path(dst))
    kept, dropped, pii, rows = pipeline._clean_row_group(task)
    return {
        "kept": kept,
        "dropped": orjson.dumps(dropped).decode(),
        "pii": orjson.dumps(pii).decode(),
        "rows": rows,
    }


def _key_rows(batch: pa.Table) -> pa.Table:
    """Per post of one clean part: global row, time (NO_TIME if none), author, comparison key and its hash."""
    import xxhash

    path, offset = batch.column("path")[0].as_py(), batch.column("offset")[0].as_py()
    table = pq.read_table(path, columns=["author_id", "created_at", "text"])
    keys = [comparison_key(t) for t in table.column("text").to_pylist()]
    ts = pc.fill_null(table.column("created_at").cast(pa.int64()), NO_TIME)
    return pa.table(
        {
            "row": np.arange(offset, offset + table.num_rows, dtype=np.int64),
            "ts": ts,
            "author_id": table.column("author_id"),
            "key_hash": np.fromiter(
                (xxhash.xxh3_64_intdigest(k.encode()) for k in keys), dtype=np.uint64, count=len(keys)
            ),
            "key": keys,
        }
    )


def _rank(row: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Position in time order (nulls last, ties by row): comparable with the local engine's global rank."""
    rank = np.empty(len(row), dtype=np.int64)
    rank[np.lexsort((row, ts))] = np.arange(len(row))
    return rank


def _exact_partition(t: pa.Table, author_max: int | None, exact: bool) -> pa.Table:
    """Every copy of a key is in this partition: author repeats and exact copies decided as dedup() does."""
    key_hash = t.column("key_hash").to_numpy()
    status = np.zeros(t.num_rows, dtype=np.int8)
    if author_max is not None:
        status[author_repeats(_author_codes(t), key_hash, author_max)] = AUTHOR_REPEAT
    if exact:
        rank = _rank(t.column("row").to_numpy(), t.column("ts").to_numpy())
        copies, _ = exact_copies(np.flatnonzero(status == KEPT), key_hash, rank)
        status[copies] = EXACT_COPY
    return t.select(["row", "ts", "key"]).append_column("status", pa.array(status))


def _band_rows(t: pa.Table, dcfg: DedupConfig, bands: int, rows: int) -> pa.Table:
    """One row per post and LSH band: (band, bucket hash, row, time, the whole signature as bytes)."""
    sig = minhash_signatures(t.column("key").to_pylist(), dcfg)
    width = 4 * dcfg.num_perm
    blob = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), len(sig), [None, pa.py_buffer(sig.tobytes())]
    )
    n = len(sig)
    return pa.table(
        {
            "band": np.repeat(np.arange(bands, dtype=np.int32), n),
            "bucket": np.concatenate([_band_hashes(sig, b, rows) for b in range(bands)])
            if n
            else np.empty(0, np.uint64),
            "row": np.tile(t.column("row").to_numpy(), bands),
            "ts": np.tile(t.column("ts").to_numpy(), bands),
            "sig": pa.concat_arrays([blob] * bands) if n else pa.array([], pa.binary(width)),
        }
    )


def _signatures(column: pa.ChunkedArray, num_perm: int) -> np.ndarray:
    arr = column.combine_chunks()
    width = 4 * num_perm
    raw = np.frombuffer(arr.buffers()[1], dtype=np.uint8)[
        arr.offset * width : (arr.offset + len(arr)) * width
    ]
    return raw.view(np.uint32).reshape(len(arr), num_perm)


def _bucket_pairs(t: pa.Table, threshold: float, num_perm: int) -> pa.Table:
    """Every member of a bucket is in this partition: candidate pairs as the local engine makes them (members in
    row order), kept when their signatures agree on enough permutations."""
    band, bucket, row = (t.column(c).to_numpy() for c in ("band", "bucket", "row"))
    order = np.lexsort((row, bucket, band))
    starts = _run_starts(band[order]) | _run_starts(bucket[order])
    run = np.cumsum(starts)
    shared = np.flatnonzero(run[1:] == run[:-1])
    empty = pa.table({c: pa.array([], pa.int64()) for c in ("i", "j", "ts_i", "ts_j")})
    if not len(shared):
        return empty
    pos = np.unique(np.concatenate([shared, shared + 1]))
    candidates = np.sort(order[bucket_pairs(run[pos], pos)], axis=1)
    sig = _signatures(t.column("sig"), num_perm)
    pairs = _verified(sig, candidates, threshold)
    ts = t.column("ts").to_numpy()
    i, j = row[pairs[:, 0]], row[pairs[:, 1]]
    swap = i > j
    i, j = np.where(swap, j, i), np.where(swap, i, j)
    ti, tj = ts[pairs[:, 0]], ts[pairs[:, 1]]
    return pa.table({"i": i, "j": j, "ts_i": np.where(swap, tj, ti), "ts_j": np.where(swap, ti, tj)})


def _not_in(t: pa.Table, gone: np.ndarray) -> pa.Table:
    rows = t.column("row").to_numpy()
    at = np.minimum(np.searchsorted(gone, rows), max(0, len(gone) - 1))
    dropped = gone[at] == rows if len(gone) else np.zeros(len(rows), dtype=bool)
    return t.filter(pa.array(~dropped))


def _write_corpus_part(item: dict, gone: np.ndarray, val: np.ndarray, cfg: pipeline.PrepareConfig) -> dict:
    """One clean part's kept posts with their split, as pipeline.dedup_and_split writes them."""
    offset, n = item["offset"], item["rows"]
    rows = np.arange(offset, offset + n)
    lo, hi = np.searchsorted(gone, [offset, offset + n])
    keep = ~np.isin(rows, gone[lo:hi])
    lo, hi = np.searchsorted(val, [offset, offset + n])
    is_val = np.isin(rows, val[lo:hi])
    table = pq.read_table(item["path"])
    if cfg.val_fraction > 0:
        untimed = np.flatnonzero(~np.asarray(table.column("created_at").is_valid()) & keep)
        ids = table.column("id").take(pa.array(untimed, pa.int64())).to_pylist()
        is_val[untimed] = pipeline.untimed_val(ids, cfg.val_fraction, cfg.seed)
    split = np.where(is_val, "val", "train")
    table = table.append_column(pipeline.CORPUS_SCHEMA.field("split"), pa.array(split)).filter(pa.array(keep))
    pq.write_table(table, Path(item["dst"]) / Path(item["path"]).name, compression="zstd")
    return {"val": int((is_val & keep).sum())}


# threads.STAT_KEYS that the driver counts over every post; a partition counts the rest
_WHOLE_RUN_STATS = ("posts", "reposts_skipped", "empty_text_skipped", "duplicate_ids", "unreachable_posts")


def _thread_rows(batch: pa.Table) -> pa.Table:
    """One posts part with global rows, and why a post cannot be in a thread: 1 a repost, 2 no text, else 0."""
    path, offset = batch.column("path")[0].as_py(), batch.column("offset")[0].as_py()
    table = pq.read_table(path, columns=threads.COLUMNS)
    repost = np.asarray(table.column("repost_of_id").is_valid())
    empty = np.array([not t.strip() for t in table.column("text").to_pylist()], dtype=bool)
    skip = np.where(repost, 1, np.where(empty, 2, 0)).astype(np.int8)
    rows = pa.array(np.arange(offset, offset + table.num_rows, dtype=np.int64))
    return table.append_column("row", rows).append_column("skip", pa.array(skip))


def _first_of_id(t: pa.Table) -> pa.Table:
    """Every row of an id is in this partition: among the posts a thread can hold, the first by row is the post,
    the later ones repeats (skip 3), as threads._usable_rows decides."""
    skip = t.column("skip").to_numpy().copy()
    usable = np.flatnonzero(skip == 0)
    ids = t.column("id").to_numpy(zero_copy_only=False)[usable]
    order = usable[np.lexsort((t.column("row").to_numpy()[usable], ids))]
    skip[order[~_run_starts(t.column("id").to_numpy(zero_copy_only=False)[order])]] = 3
    return t.set_column(t.column_names.index("skip"), "skip", pa.array(skip))


def _keyed(t: pa.Table) -> pa.Table:
    """(key, row, is the row a parent): every post under its id, and each reply again under its parent's id."""
    reply = np.asarray(t.column("in_reply_to_id").is_valid())
    replies = t.filter(pa.array(reply))
    return pa.table(
        {
            "key": pa.concat_arrays(
                [t.column("id").combine_chunks(), replies.column("in_reply_to_id").combine_chunks()]
            ).cast(pa.string()),
            "row": np.concatenate([t.column("row").to_numpy(), replies.column("row").to_numpy()]).astype(
                np.int64
            ),
            "parent": np.r_[np.ones(t.num_rows, dtype=bool), np.zeros(replies.num_rows, dtype=bool)],
        }
    )


def _reply_edges(t: pa.Table) -> pa.Table:
    """(reply row, parent row) for each reply whose parent is a post here (ids are unique by now)."""
    is_parent = t.column("parent").to_numpy()
    parents, replies = t.filter(pa.array(is_parent)), t.filter(pa.array(~is_parent))
    at = pc.index_in(replies.column("key"), value_set=parents.column("key").combine_chunks())
    found = np.asarray(at.is_valid())
    rows = replies.column("row").to_numpy()[found]
    parent_rows = parents.column("row").to_numpy()[pc.fill_null(at, 0).to_numpy()[found]]
    return pa.table({"row": rows.astype(np.int64), "parent_row": parent_rows.astype(np.int64)})


def _with_root(t: pa.Table, child: np.ndarray, root: np.ndarray) -> pa.Table:
    """Each post's conversation: its own row for a post that answers no post here, else its tree's root."""
    rows = t.column("row").to_numpy()
    if len(child):
        at = np.minimum(np.searchsorted(child, rows), len(child) - 1)
        roots = np.where(child[at] == rows, root[at], rows)
    else:
        roots = rows
    return t.append_column("root", pa.array(roots.astype(np.int64)))


def _threads_partition(t: pa.Table, tcfg: threads.ThreadConfig) -> pa.Table:
    """build_threads over whole conversations (rows in row order); each record tagged with its conversation."""
    t = t.take(pa.array(np.argsort(t.column("row").to_numpy(), kind="stable")))
    res = threads.build_threads(t, tcfg)
    root_of = dict(zip(t.column("id").to_pylist(), t.column("root").to_pylist(), strict=True))
    roots, kinds, seqs, records = [], [], [], []
    for kind, items, id_of in (
        ("d", res.dialogues, lambda d: d["id"].removeprefix("thread:")),
        ("p", res.prefs, lambda p: p["id"].removeprefix("pref:").split(">")[0]),
    ):
        for seq, item in enumerate(items):
            roots.append(root_of[id_of(item)])
            kinds.append(kind)
            seqs.append(seq)
            records.append(orjson.dumps(item))
    stats = {k: v for k, v in res.stats.items() if k not in _WHOLE_RUN_STATS}
    roots.append(-1)
    kinds.append("s")
    seqs.append(0)
    records.append(orjson.dumps(stats))
    return pa.table(
        {
            "root": pa.array(roots, pa.int64()),
            "kind": kinds,
            "seq": pa.array(seqs, pa.int64()),
            "record": pa.array(records, pa.binary()),
        }
    )


_TOKENIZERS: dict[str, Tokenizer] = {}  # one load per worker process


def _encode_task(item: dict, corpus: str, tokenizer: str) -> dict:
    tok = _TOKENIZERS.get(tokenizer) or _TOKENIZERS.setdefault(tokenizer, Tokenizer.from_file(tokenizer))
    chunks, docs = [], []
    for split, ids, n_bytes in pipeline.encode_row_group(Path(corpus), item["group"], tok, 1):
        chunks.append((split, len(ids), n_bytes))
        docs += ids
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    flat = np.fromiter((i for doc in docs for i in doc), dtype=np.int32, count=int(lengths.sum()))
    return {"chunks": orjson.dumps(chunks).decode(), "lengths": lengths.tobytes(), "tokens": flat.tobytes()}
