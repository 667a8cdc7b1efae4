"""Exact and near-duplicate removal over the whole cleaned corpus.

Three passes, each over what the one before kept:
1. author_repeat: one author posting the same text more than `author_repeat_max` times loses all of them
   (bots and copy-paste campaigns; no copy of such text is worth keeping from that author).
2. exact: posts with the same comparison key are one group; the earliest post of the group is kept.
3. near: MinHash signatures of character shingles of the key, LSH banding for candidate pairs, pairs
   verified by their estimated Jaccard, union-find into clusters; the earliest post of a cluster is kept.

"Earliest" is the smallest created_at, nulls last, ties broken by row order. The comparison key is the
text casefolded, with @handles and URLs removed and whitespace collapsed (a text that is nothing but
handles and URLs keeps them, so two different bare links are not duplicates).

MinHash here is plain numpy: every k-character window of a batch of concatenated docs is hashed at once
(a 64-bit polynomial over the code points, then a murmur3 finaliser down to 32 bits); each of the
num_perm hash functions is (a*h + b) mod 2^64, top 32 bits (Dietzfelbinger's multiply-add-shift scheme:
2-independent, no division); np.minimum.reduceat takes each doc's minimum. Signatures are uint32,
num_perm * 4 bytes a doc (256 MB for 1M docs at 64 permutations).
"""

import functools
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True  # near-duplicates too (MinHash), not only exact copies
    shingle: int = 5  # characters per shingle
    num_perm: int = 64  # MinHash permutations; the estimate's standard error is sqrt(J(1-J)/num_perm)
    threshold: float = 0.8  # Jaccard similarity at or above which two posts are near-duplicates
    seed: int = 1  # draws the permutations
    author_repeat_max: int | None = 3  # more copies than this from one author drops them all; None: off
    workers: int = 1  # processes computing signatures
    chunk: int = 20_000  # docs per signature task


@dataclass
class DedupResult:
    keep: np.ndarray  # bool per row
    dropped: Counter = field(default_factory=Counter)  # reason -> rows dropped
    dup_of: np.ndarray | None = None  # int64 per row: the kept row it duplicates, else -1
    bands: int = 0  # LSH layout used for the near pass
    rows: int = 0

    def clusters(self) -> list[list[int]]:
        """Each duplicate group as row indices, the kept row first, then its duplicates in row order."""
        groups: dict[int, list[int]] = {}
        for row in np.flatnonzero(self.dup_of >= 0):
            groups.setdefault(int(self.dup_of[row]), []).append(int(row))
        return [[kept, *rows] for kept, rows in sorted(groups.items())]


# Comparison key
_HANDLE_OR_URL = re.compile(r"@\w+|(?:https?://|www\.)\S+")

# Shingle and band hashing: 64-bit odd constants (murmur3's finaliser, and a golden-ratio multiplier).
_MIX1 = np.uint64(0xFF51AFD7ED558CCD)
_MIX2 = np.uint64(0xC4CEB9FE1A85EC53)
_POLY = np.uint64(0x9E3779B97F4A7C15)
_SHINGLES_PER_BLOCK = 1 << 13  # num_perm x shingles uint64 scratch that stays in cache (4 MB at 64)


def comparison_key(text: str) -> str:
    """What two posts must share to be exact duplicates: casefolded, no handles or URLs, single spaces."""
    folded = text.casefold()
    key = " ".join(_HANDLE_OR_URL.sub(" ", folded).split())
    return key or " ".join(folded.split())


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.25) -> tuple[int, int]:
    """Bands x rows (bands*rows <= num_perm) minimising the weighted area of missed and spurious pairs.

    Missed pairs weigh 3x spurious ones by default because every candidate is verified afterwards.
    """
    s = np.linspace(0.0, 1.0, 1001)
    best, best_cost = (1, num_perm), np.inf
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            p = 1.0 - (1.0 - s**rows) ** bands  # chance that a pair of similarity s shares a bucket
            fp = np.trapezoid(np.where(s <= threshold, p, 0.0), s)
            fn = np.trapezoid(np.where(s >= threshold, 1.0 - p, 0.0), s)
            cost = fp_weight * fp + (1.0 - fp_weight) * fn
            if cost < best_cost:
                best, best_cost = (bands, rows), cost
    return best


def _permutations(cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(cfg.seed)
    a = rng.integers(0, 2**64, size=cfg.num_perm, dtype=np.uint64, endpoint=False) | np.uint64(1)
    b = rng.integers(0, 2**64, size=cfg.num_perm, dtype=np.uint64, endpoint=False)
    return a, b


def _fmix64(h: np.ndarray) -> np.ndarray:
    h ^= h >> np.uint64(33)
    h *= _MIX1
    h ^= h >> np.uint64(33)
    h *= _MIX2
    h ^= h >> np.uint64(33)
    return h


def _shingle_hashes(texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes (in uint64) of every k-character window of each text, and each text's window count.

    A text shorter than k is padded with NUL to one window, so it still has a signature.
    """
    padded = [t if len(t) >= k else t + "\0" * (k - len(t)) for t in texts]
    lengths = np.fromiter(map(len, padded), dtype=np.int64, count=len(padded))
    points = np.frombuffer("".join(padded).encode("utf-32-le"), dtype=np.uint32)
    n_windows = len(points) - k + 1
    h = points[:n_windows].astype(np.uint64)
    for j in range(1, k):
        h *= _POLY
        h += points[j : j + n_windows]
    h = _fmix64(h) >> np.uint64(32)
    # Keep the windows that start and end inside one text.
    counts = lengths - k + 1
    doc_starts = np.cumsum(lengths) - lengths
    window_starts = np.cumsum(counts) - counts
    inside = np.arange(counts.sum()) + np.repeat(doc_starts - window_starts, counts)
    return h[inside], counts


def _signatures_chunk(texts: list[str], k: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    hashes, counts = _shingle_hashes(texts, k)
    sig = np.empty((len(texts), len(a)), dtype=np.uint32)
    ends = np.cumsum(counts)
    first = 0
    while first < len(texts):
        # A block of whole docs whose shingles fill the scratch matrix (at least one doc).
        start = ends[first] - counts[first]
        last = max(first + 1, int(np.searchsorted(ends, start + _SHINGLES_PER_BLOCK, side="right")))
        stop = ends[last - 1]
        x = np.multiply.outer(a, hashes[start:stop])  # (num_perm, shingles): each row is contiguous
        x += b[:, None]
        x >>= np.uint64(32)
        offsets = (ends[first:last] - counts[first:last]) - start
        sig[first:last] = np.minimum.reduceat(x, offsets, axis=1).T
        first = last
    return sig


def minhash_signatures(texts: list[str], cfg: DedupConfig) -> np.ndarray:
    """uint32 MinHash signatures, shape (len(texts), num_perm), of each text's k-character shingle set.

    The texts are used as given (dedup passes comparison keys). A text shorter than k characters has
    one shingle: itself padded with NUL to k characters.
    """
    a, b = _permutations(cfg)
    one_chunk = functools.partial(_signatures_chunk, k=cfg.shingle, a=a, b=b)
    chunks = [texts[i : i + cfg.chunk] for i in range(0, len(texts), cfg.chunk)]
    if cfg.workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(cfg.workers, mp_context=get_context("spawn")) as pool:
            parts = list(pool.map(one_chunk, chunks))
    else:
        parts = [one_chunk(chunk) for chunk in chunks]
    if not parts:
        return np.empty((0, cfg.num_perm), dtype=np.uint32)
    return np.concatenate(parts)


def _band_hashes(sig: np.ndarray, band: int, rows: int) -> np.ndarray:
    h = np.zeros(len(sig), dtype=np.uint64)
    for col in sig[:, band * rows : (band + 1) * rows].T:
        h ^= col
        h *= _POLY
    return _fmix64(h)


def _run_starts(sorted_values: np.ndarray) -> np.ndarray:
    """True where a run of equal values begins in a sorted array."""
    starts = np.ones(len(sorted_values), dtype=bool)
    starts[1:] = sorted_values[1:] != sorted_values[:-1]
    return starts


def bucket_pairs(bucket: np.ndarray, docs: np.ndarray, window: int = 8) -> np.ndarray:
    """(i, j) pairs of docs that share a bucket, from docs listed bucket by bucket (`bucket` non-decreasing).

    In each bucket every member pairs with the bucket's first member and with its next window-1 neighbours, so
    small buckets give all their pairs and a huge bucket stays linear. The local and the Ray engines both call
    this, so they find the same pairs.
    """
    starts = _run_starts(bucket)
    first = np.maximum.accumulate(np.where(starts, np.arange(len(bucket)), 0))
    found = [np.stack([docs[first[~starts]], docs[~starts]], axis=1)]
    for d in range(1, window):
        same = bucket[d:] == bucket[:-d]
        if not same.any():
            break
        found.append(np.stack([docs[:-d][same], docs[d:][same]], axis=1))
    return np.concatenate(found)


def _candidate_pairs(sig: np.ndarray, bands: int, rows: int, window: int = 8) -> np.ndarray:
    """Unique (i, j), i < j, of docs sharing a bucket in some band (bucket_pairs in each band)."""
    found = []
    for band in range(bands):
        h = _band_hashes(sig, band, rows)
        order = np.argsort(h, kind="stable")
        h = h[order]
        shared = np.flatnonzero(h[1:] == h[:-1])
        if not len(shared):
            continue
        # Only positions inside buckets of two or more matter from here on.
        pos = np.unique(np.concatenate([shared, shared + 1]))
        found.append(bucket_pairs(h[pos], order[pos], window))
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.sort(np.concatenate(found), axis=1).astype(np.int64)
    packed = np.unique(pairs[:, 0] * len(sig) + pairs[:, 1])
    return np.stack([packed // len(sig), packed % len(sig)], axis=1)


def _verified(sig: np.ndarray, pairs: np.ndarray, threshold: float, block: int = 1 << 18) -> np.ndarray:
    """The pairs whose estimated Jaccard (share of equal signature entries) is >= threshold."""
    need = int(np.ceil(threshold * sig.shape[1] - 1e-9))
    keep = np.zeros(len(pairs), dtype=bool)
    for i in range(0, len(pairs), block):
        p = pairs[i : i + block]
        keep[i : i + block] = (sig[p[:, 0]] == sig[p[:, 1]]).sum(axis=1) >= need
    return pairs[keep]


def _union_find(n: int, pairs: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Root of each of n items; every root is the lowest-rank member of its component."""
    parent = list(range(n))
    rank_of = rank.tolist()

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for i, j in pairs.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            if rank_of[rj] < rank_of[ri]:
                ri, rj = rj, ri
            parent[rj] = ri
    roots = np.arange(n)
    touched = np.unique(pairs)
    roots[touched] = [find(x) for x in touched.tolist()]
    return roots


def _time_rank(table: pa.Table) -> np.ndarray:
    """Each row's position in time order: created_at ascending, nulls last, ties by row."""
    n = table.num_rows
    ts = table.column("created_at").cast(pa.int64())
    ts = pc.fill_null(ts, np.iinfo(np.int64).max).to_numpy()
    order = np.lexsort((np.arange(n), ts))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank


def _author_codes(table: pa.Table) -> np.ndarray:
    """A small int per distinct author_id, -1 where it is null."""
    codes = table.column("author_id").combine_chunks().dictionary_encode().indices
    return pc.fill_null(codes.cast(pa.int64()), -1).to_numpy()


def author_repeats(author: np.ndarray, key_hash: np.ndarray, max_copies: int) -> np.ndarray:
    """Rows whose author (a code, -1 for none) posted their key more than max_copies times: all of those rows."""
    order = np.lexsort((key_hash, author))
    a, h = author[order], key_hash[order]
    starts = np.flatnonzero(_run_starts(a) | _run_starts(h))
    sizes = np.diff(np.r_[starts, len(order)])
    return order[(np.repeat(sizes, sizes) > max_copies) & (a >= 0)]


def exact_copies(alive: np.ndarray, key_hash: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(copies, the row each copies) among the rows `alive`: the lowest-ranked row of each key is the one kept."""
    order = alive[np.lexsort((rank[alive], key_hash[alive]))]
    starts = _run_starts(key_hash[order])
    first = order[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))]
    return order[~starts], first[~starts]


def dedup(table: pa.Table, cfg: DedupConfig) -> DedupResult:
    """Decide which rows to keep; the table needs id, author_id, created_at and text columns."""
    missing = {"id", "author_id", "created_at", "text"} - set(table.column_names)
    if missing:
        raise ValueError(f"dedup needs columns {sorted(missing)} (has {table.column_names})")
    n = table.num_rows
    texts = table.column("text").to_pylist()
    for row, text in enumerate(texts):
        if text is None:
            raise ValueError(f"row {row} (id {table.column('id')[row].as_py()!r}): text is null")
    keys = [comparison_key(t) for t in texts]
    key_hash = np.fromiter((xxhash.xxh3_64_intdigest(k.encode()) for k in keys), dtype=np.uint64, count=n)
    rank = _time_rank(table)
    keep = np.ones(n, dtype=bool)
    dup_of = np.full(n, -1, dtype=np.int64)
    result = DedupResult(keep=keep, dup_of=dup_of)
    if cfg.near:
        result.bands, result.rows = lsh_params(cfg.threshold, cfg.num_perm)
    if n == 0:
        return result

    if cfg.author_repeat_max is not None:
        repeat = author_repeats(_author_codes(table), key_hash, cfg.author_repeat_max)
        keep[repeat] = False
        result.dropped["author_repeat"] = len(repeat)

    if cfg.exact:
        dups, first = exact_copies(np.flatnonzero(keep), key_hash, rank)
        keep[dups] = False
        dup_of[dups] = first
        result.dropped["exact_duplicate"] = len(dups)

    if cfg.near:
        reps = np.flatnonzero(keep)
        sig = minhash_signatures([keys[i] for i in reps], cfg)
        pairs = _verified(sig, _candidate_pairs(sig, result.bands, result.rows), cfg.threshold)
        root = reps[_union_find(len(reps), pairs, rank[reps])]
        near = reps[root != reps]
        keep[near] = False
        dup_of[near] = root[root != reps]
        # Exact copies of a near-duplicate point at the cluster's kept row.
        moved = dup_of >= 0
        dup_of[moved] = np.where(keep[dup_of[moved]], dup_of[moved], dup_of[dup_of[moved]])
        result.dropped["near_duplicate"] = len(near)
    return result
