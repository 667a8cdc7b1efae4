"""The content scorer that moderation and brand safety share: per policy category, a score in [0, 1] and the rule
that gave it.

A category's score is the highest of its rules':
- keywords: a term or pattern of the category (matched by moderation.Policy, whole words, leetspeak) scores the
  category's `keyword_score` (1.0 unless set lower: a mention may weigh less than a model's confident call);
- examples: the text's embedding against the category's example phrases, embedded once with the bound model as
  the engine embeds (mean-pooled final hidden states, L2-normalised); the nearest example's cosine c maps to 0.5
  at the category's `similarity`, rising linearly to 1.0 at c = 1 and falling linearly to 0.0 at c = 0;
- classifier: the calibrated probability of the category's `label` from a classifier folder (myna/eval/classify.py).

One forward pass of the bound model serves every text's embedding and every mean-pooled probe trained on the
same weights (a probe's features are the embedding before normalisation); other classifiers run their own body.
Without a model, a category with model-based rules is marked unscored, never passed as clean.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from myna.eval import classify
from myna.moderation import RUN_PREFIX, Policy
from myna.runs import resolve
from myna.search.index import fingerprint

BATCH_TOKENS = 2048  # padded token slots per scoring forward pass
MAX_EXAMPLES = 10_000  # example phrases of a whole policy: each is embedded when the scorer is built


@dataclass
class CategoryScore:
    keyword: str | None = None  # the first term or pattern that matched
    keyword_score: float = 1.0  # the category's score for a keyword match
    # the model-based rules' score; None: the category has none, or no model ran
    model_score: float | None = None
    model_rule: str | None = None  # the example or classifier that gave model_score
    unscored: bool = False  # the category has model-based rules and no model ran them

    @property
    def score(self) -> float:
        return max(self.keyword_score if self.keyword else 0.0, self.model_score or 0.0)

    @property
    def rule(self) -> str | None:
        """What gave the score: "keyword '…'", "example '…' (cosine 0.931)", "classifier DIR label 1 (p 0.870)"."""
        if self.keyword and self.keyword_score >= (self.model_score or 0.0):
            return f"keyword {self.keyword!r}"
        return self.model_rule if self.model_score else None


@dataclass
class _Classifier:
    path: str  # as the policy names it
    trained: classify.Trained
    column: int  # the label's column in the probabilities
    # a mean-pooled probe on the bound model's own weights: it reads the embedding pass's features
    shared: bool


def similarity_score(cosine: np.ndarray, threshold: float) -> np.ndarray:
    """Cosine to the nearest example -> score: 0.5 at the threshold, linear to 1.0 at 1 above it and to 0.0 at 0."""
    above = 0.5 + 0.5 * (cosine - threshold) / max(1.0 - threshold, 1e-9)
    below = 0.5 * np.clip(cosine, 0.0, None) / threshold
    return np.clip(np.where(cosine >= threshold, above, below), 0.0, 1.0)


def examples_separate(
    vectors: np.ndarray, rows: dict[str, tuple[int, int]], thresholds: dict[str, float]
) -> bool:
    """Does the model tell the categories' examples apart? Examples of different categories are about different
    things: when their typical cosine reaches the lowest firing threshold, every text would fire."""
    if len(rows) < 2:
        return True
    category = np.empty(len(vectors), np.int64)
    for k, (lo, hi) in enumerate(rows.values()):
        category[lo:hi] = k
    cos = vectors @ vectors.T
    across = cos[category[:, None] != category[None, :]]
    return float(np.median(across)) < min(thresholds.values())


class Scorer:
    """A policy's categories scored on texts. `embedder` (myna.search.index.Embedder) is the bound model; None
    scores keywords only."""

    def __init__(self, policy: Policy, embedder=None):
        self.policy = policy
        self.embedder = embedder
        self.keyword_categories = {n for n, c in policy.categories.items() if c.terms or c.patterns}
        self.model_categories = policy.model_categories
        self.model_version = "keywords only"
        self.classifiers: dict[str, _Classifier] = {}
        self.untrained: dict[str, Path] = {}  # "run:" classifiers the bound run has not trained (yet)
        if embedder is None or not self.model_categories:
            return
        run_dir, ckpt = resolve(embedder.ckpt)
        self.model_version = f"{run_dir.name}/{ckpt.name}@{embedder.fingerprint}"
        for name in self.model_categories:
            given = policy.categories[name].classifier
            if (
                given
                and given.startswith(RUN_PREFIX)
                and not (run_dir / given.removeprefix(RUN_PREFIX)).exists()
            ):
                # a run without them still scores the rest; the category says it went unscored
                self.untrained[name] = run_dir / given.removeprefix(RUN_PREFIX)
            elif given:
                self.classifiers[name] = self._load_classifier(name, run_dir)
        # the shared pass stops where the shortest shared probe was trained to stop
        self.max_tokens = min(
            [embedder.model.cfg.max_seq_len]
            + [c.trained.settings.max_len for c in self.classifiers.values() if c.shared]
        )
        self._embed_examples()
        thresholds = {n: policy.categories[n].similarity for n in self.example_rows}
        if not examples_separate(self.example_vectors, self.example_rows, thresholds):
            # the model embeds everything alike (under-trained): its example rules would fire on every post, so they
            # are left out and their categories go unscored, as without a model
            self.example_rows = {}

    def _load_classifier(self, name: str, run_dir: Path) -> _Classifier:
        cat = self.policy.categories[name]
        where = f"{self.policy.source}: categories.{name}.classifier"
        given = cat.classifier
        path = run_dir / given.removeprefix(RUN_PREFIX) if given.startswith(RUN_PREFIX) else Path(given)
        try:
            trained = classify.load(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}: {path} is not a usable classifier folder: {e}") from e
        labels = [str(x) for x in trained.labels]
        if cat.label not in labels:
            raise ValueError(
                f"{self.policy.source}: categories.{name}.label: {cat.label!r} is not a label of {path} "
                f"({', '.join(labels)})"
            )
        s = trained.settings
        shared = (
            s.mode == "probe"
            and s.pooling == "mean"
            and fingerprint(Path(trained.base)) == self.embedder.fingerprint
        )
        return _Classifier(given, trained, labels.index(cat.label), shared)

    def _embed_examples(self) -> None:
        """Every category's examples as rows of one matrix, with each category's row range."""
        texts: list[str] = []
        self.example_rows: dict[str, tuple[int, int]] = {}
        for name in self.model_categories:
            examples = self.policy.categories[name].examples
            if examples:
                self.example_rows[name] = (len(texts), len(texts) + len(examples))
                texts += examples
        if len(texts) > MAX_EXAMPLES:
            raise ValueError(f"{self.policy.source}: {len(texts):,} examples; at most {MAX_EXAMPLES:,}")
        self.examples = texts
        self.example_vectors = (
            self._normalised(self._pooled(texts)) if texts else np.zeros((0, 1), np.float32)
        )

    # -- scoring ---------------------------------------------------------------------------------------------------

    def score(self, texts: list[str]) -> list[dict[str, CategoryScore]]:
        """Every category of the policy, whatever its action, for each text (in the policy's order)."""
        model = self.model_scores(texts) if self.embedder is not None else [{} for _ in texts]
        out = []
        for text, by_model in zip(texts, model, strict=True):
            hits = {
                h.category: h.matches[0] for h in self.policy.scan(text, self.keyword_categories).categories
            }
            row = {}
            for name in self.policy.categories:
                s = CategoryScore(hits.get(name), self.policy.categories[name].keyword_score)
                if name in by_model:
                    s.model_score, s.model_rule = by_model[name]
                s.unscored = name in self.untrained or (
                    name in self.model_categories and name not in by_model
                )
                row[name] = s
            out.append(row)
        return out

    def model_scores(self, texts: list[str]) -> list[dict[str, tuple[float, str]]]:
        """The model-based categories' (score, rule) for each text; needs a bound model."""
        if self.embedder is None:
            raise RuntimeError(
                f"{self.policy.source}: no model bound; model-based categories cannot be scored"
            )
        if not texts or not self.model_categories:
            return [{} for _ in texts]
        pooled = self._pooled(texts)
        candidates: dict[str, list[tuple[np.ndarray, list[str]]]] = {n: [] for n in self.model_categories}
        if self.example_rows:
            cos = self._normalised(pooled) @ self.example_vectors.T
            for name, (lo, hi) in self.example_rows.items():
                nearest = lo + cos[:, lo:hi].argmax(1)
                best = cos[np.arange(len(texts)), nearest]
                score = similarity_score(best, self.policy.categories[name].similarity)
                rules = [
                    f"example {self.examples[j]!r} (cosine {c:.3f})"
                    for j, c in zip(nearest, best, strict=True)
                ]
                candidates[name].append((score, rules))
        for name, c in self.classifiers.items():
            p = self._probabilities(c, texts, pooled)[:, c.column]
            rules = [f"classifier {c.path} label {self.policy.categories[name].label} (p {x:.3f})" for x in p]
            candidates[name].append((p, rules))
        out: list[dict[str, tuple[float, str]]] = [{} for _ in texts]
        for name, options in candidates.items():
            # a category whose only rule is a classifier the run has not trained has nothing to score it
            for i in range(len(texts) if options else 0):
                score, rules = max(options, key=lambda o: o[0][i])
                out[i][name] = (float(score[i]), rules[i])
        return out

    def _probabilities(self, c: _Classifier, texts: list[str], pooled: torch.Tensor) -> np.ndarray:
        m = c.trained.model
        if c.shared:
            features = pooled
        else:
            tok = c.trained.tokenizer
            seqs = classify.encode(tok, texts, min(c.trained.settings.max_len, m.body.cfg.max_seq_len))
            features = _features(m.body, seqs, tok.pad_id, m.pooling)
        with torch.inference_mode():
            logits = m.head(features.to(m.head.weight.device)).float().cpu()
        return (logits / c.trained.temperature).softmax(-1).numpy()

    def _pooled(self, texts: list[str]) -> torch.Tensor:
        """The bound model's mean-pooled final hidden states [N, C]: the engine's embedding before normalising."""
        tok = self.embedder.tokenizer
        return _features(
            self.embedder.model, classify.encode(tok, texts, self.max_tokens), tok.pad_id, "mean"
        )

    @staticmethod
    def _normalised(pooled: torch.Tensor) -> np.ndarray:
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()


@torch.inference_mode()
def _features(body, seqs: list[list[int]], pad_id: int, pooling: str) -> torch.Tensor:
    """Pooled final hidden states [N, C] in input order, in batches of texts of similar length."""
    device = next(body.parameters()).device
    out = torch.empty(len(seqs), body.cfg.n_embd)
    for b in classify.length_batches(seqs, BATCH_TOKENS, None):
        idx, lengths = classify.collate(seqs, b, pad_id, device)
        out[b] = classify.pool(body.hidden(idx).float(), lengths, pooling).cpu()
    return out
