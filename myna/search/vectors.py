"""Nearest posts by embedding: exact search for small indexes, an inverted-file (IVF) index past APPROXIMATE_FROM.

The IVF index (faiss) is made when the search index is opened, from the vectors stored in it: it is never a file of
its own that a killed `myna index add` could leave out of step with the posts, so the SQLite transaction stays the
one truth. Its lists hold float16 codes, the precision the vectors are stored in, so they cost no recall beyond the
lists themselves. bench/search.py measures the choices below and the alternatives (HNSW, int8 codes).
"""

import math

import faiss
import numpy as np

APPROXIMATE_FROM = 500_000  # below, exact search costs little and needs nothing built at open
POSTS_PER_LIST = 2048  # k-means lists of about this many posts: building them at open costs N * N/2048 * dim
NPROBE = 16  # lists scanned per query: recall@10 >= 0.95 against exact search at 1M posts
SCAN_PER_RESULT = 8  # a deeper k scans more lists, about this many vectors per result asked for
TRAIN_PER_LIST = 40  # k-means trains on a sample of this many vectors per list (faiss asks for at least 39)


class VectorIndex:
    """Inner-product search over the rows of `vectors`; row i is the post with rowid i + 1."""

    def __init__(self, vectors: np.ndarray, approximate_from: int = APPROXIMATE_FROM):
        self.vectors, self.approximate_from = vectors, approximate_from
        self.ivf = _ivf(vectors) if len(vectors) >= approximate_from else None

    def extend(self, vectors: np.ndarray) -> None:
        """Take `vectors`, the rows so far followed by new ones: the IVF lists take the new rows as they are (the
        lists' centres stay those trained at open), a small index may become large enough for them."""
        old, self.vectors = len(self.vectors), vectors
        if self.ivf is not None:
            self.ivf.add(vectors[old:])
        elif len(vectors) >= self.approximate_from:
            self.ivf = _ivf(vectors)

    @property
    def kind(self) -> str:
        return "exact" if self.ivf is None else f"IVF{self.ivf.nlist},float16, {NPROBE} lists a query"

    def search(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The rowids of the k rows nearest to query, best first, and their inner products; only rows where the
        boolean mask `allowed` is set, when given (fewer than k when fewer pass)."""
        n = len(self.vectors)
        passing = n if allowed is None else int(allowed.sum())
        k = min(k, passing)
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if self.ivf is not None:
            nlist = self.ivf.nlist
            # scan enough lists to meet about SCAN_PER_RESULT passing vectors per result asked for
            nprobe = max(NPROBE, math.ceil(SCAN_PER_RESULT * k * nlist / passing))
            if nprobe < nlist // 2:  # past half of the lists, exact search is as cheap
                params = faiss.SearchParametersIVF(nprobe=nprobe)
                if allowed is not None:
                    bits = np.packbits(allowed, bitorder="little")  # must outlive the search
                    params.sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits))
                scores, rows = self.ivf.search(query[None].astype(np.float32), k, params=params)
                found = rows[0] >= 0  # faiss pads with -1 when the scanned lists hold fewer than k
                return rows[0][found] + 1, scores[0][found]
        scores = self.vectors @ query
        if allowed is not None:
            scores[~allowed] = -np.inf
        top = _top(scores, k)
        return top + 1, scores[top]

    def among(self, query: np.ndarray, rowids: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        """search() restricted to the given rowids, exactly."""
        rows = np.asarray(rowids, dtype=np.int64) - 1
        # a post added after the vectors were read is not among them yet
        rows = rows[rows < len(self.vectors)]
        scores = self.vectors[rows] @ query
        top = _top(scores, min(k, len(rows)))
        return rows[top] + 1, scores[top]


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indexes of the k highest scores, highest first."""
    top = np.argpartition(-scores, k - 1)[:k] if 0 < k < len(scores) else np.arange(k)
    return top[np.argsort(-scores[top], kind="stable")]


def _ivf(vectors: np.ndarray) -> faiss.Index:
    n, dim = vectors.shape
    nlist = max(1, round(n / POSTS_PER_LIST))
    ivf = faiss.IndexIVFScalarQuantizer(
        faiss.IndexFlatIP(dim), dim, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    )
    ivf.cp.niter = 10  # k-means rounds: the lists only route queries, and each round costs a pass
    sample = np.random.default_rng(0).choice(n, min(n, TRAIN_PER_LIST * nlist), replace=False)
    ivf.train(vectors[np.sort(sample)])
    ivf.add(vectors)
    return ivf
