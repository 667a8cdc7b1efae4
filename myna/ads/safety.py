"""Brand safety: may an advertiser's ad run next to these posts?

Each post is scored against the IAB Content Taxonomy 3.x "Sensitive Topics" categories by the shared scorer
(myna/safety.py) under a policy in moderation's file format (default: brand_safety.json beside this file), and
gets a risk tier: floor (never monetisable, as GARM's floor), high, medium or low. A category's `tiers` give the
lowest score of each tier; a post's tier is the most severe any category reaches, and the rule that fired is the
one that set it. An advertiser's suitability setting names the tiers its ads may run beside; floor never.

In a feed an ad is seen with the posts around it, so an ad slot is judged against its neighbours
(`slot_context`), and the most severe of them decides. Every decision is a record: post id, model version,
per-category scores, tier, rule, decision and reason.
"""

import gzip
import itertools
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from myna.eval import classify
from myna.eval.settings import TWEETEVAL_DIR, ClassifySettings
from myna.eval.tweeteval import PUBLISHED, load_split, mapping, task_metric
from myna.io import atomic_write
from myna.moderation import TIER_NAMES, Policy
from myna.runs import load_model, resolve
from myna.safety import Scorer

DEFAULT_POLICY = Path(__file__).with_name("brand_safety.json")
SAMPLE_POSTS = Path(__file__).resolve().parents[2] / "data" / "sample" / "posts"
TIERS = ("low", "medium", "high", "floor")  # mildest first
# the tiers an advertiser's ads may run beside; floor is in none of them
SUITABILITY = {
    "conservative": ("low",),
    "standard": ("low", "medium"),
    "relaxed": ("low", "medium", "high"),
}
# Posts judged on each side of a feed slot: on a phone the post just above and the one just below share the screen
# with an ad, and those are the posts a viewer reads the ad against; further ones have scrolled out of view.
ADJACENT_POSTS = 1
# TweetEval tasks behind the classifier categories, and where train_safety_classifiers puts them inside a run
SAFETY_TASKS = {"hate": "hate_speech", "offensive": "obscenity_and_profanity"}
CLASSIFIER_DIR = "safety"


@dataclass
class SafetyRecord:
    """One post scored: everything a decision about it rests on."""

    post_id: str
    model_version: str  # "run/step_N@weights fingerprint", or "keywords only"
    scores: dict[str, float]  # every category's score in [0, 1]
    tier: str  # low, medium, high or floor
    rule: str | None  # "category: rule" that set the tier; None for low
    unscored: list[str] = field(default_factory=list)  # model-based categories no model scored
    reason: str = ""  # the tier in words


@dataclass
class Decision:
    """May an ad run in this context (one post, or a feed slot's neighbours)?"""

    allowed: bool
    suitability: str
    reason: str
    record: SafetyRecord | None  # the post that decided: the most severe one; None for an empty context
    context: list[str]  # the ids of the posts judged

    @property
    def decision(self) -> str:
        return "allow" if self.allowed else "block"

    def to_dict(self) -> dict:
        return {
            "decision": self.decision,
            "suitability": self.suitability,
            "reason": self.reason,
            "context": list(self.context),
            "record": None if self.record is None else asdict(self.record),
        }


def tier_of(score: float, tiers: dict[str, float]) -> str:
    """The most severe tier whose lowest score the category's score reaches; low if none."""
    return next((t for t in TIER_NAMES if t in tiers and score >= tiers[t]), "low")


class BrandSafety:
    def __init__(self, policy: Policy, scorer: Scorer):
        self.policy, self.scorer = policy, scorer

    @classmethod
    def load(
        cls, policy_path: str | Path | None = None, ckpt: str | Path | None = None, embedder=None
    ) -> "BrandSafety":
        """A policy file (None: the default) bound to a run or checkpoint, or to a model already loaded (`embedder`,
        a myna.search.index.Embedder: one copy of the weights); neither: keyword rules only, and model-based
        categories are reported as unscored in every record."""
        policy = Policy.load(policy_path or DEFAULT_POLICY)
        for name, c in policy.categories.items():
            if not c.tiers:
                raise ValueError(
                    f"{policy.source}: categories.{name}.tiers: brand safety needs a category's tiers"
                )
        if embedder is None and ckpt is not None and policy.model_categories:
            from myna.search.index import Embedder

            embedder = Embedder.load(ckpt)
        return cls(policy, Scorer(policy, embedder))

    @property
    def model_version(self) -> str:
        return self.scorer.model_version

    def score(self, texts: list[str], ids: list[str] | None = None) -> list[SafetyRecord]:
        """A record per post; ids default to the posts' positions. Batch many posts per call: the model scores
        them in one pass."""
        if ids is None:
            ids = [str(i) for i in range(len(texts))]
        if len(ids) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(ids)} ids")
        return [self._record(i, s) for i, s in zip(ids, self.scorer.score(texts), strict=True)]

    def _record(self, post_id: str, scores: dict) -> SafetyRecord:
        tier, rule, reason = "low", None, "no category reaches a tier"
        for name, s in scores.items():
            tiers = self.policy.categories[name].tiers
            cat_tier = tier_of(s.score, tiers)
            if TIERS.index(cat_tier) > TIERS.index(tier):
                tier, rule = cat_tier, f"{name}: {s.rule}"
                reason = f"{name} scores {s.score:.2f}, at or above its {tier} tier's {tiers[tier]}"
        unscored = [n for n, s in scores.items() if s.unscored]
        return SafetyRecord(
            str(post_id),
            self.model_version,
            {n: round(s.score, 4) for n, s in scores.items()},
            tier,
            rule,
            unscored,
            reason,
        )


def judge(suitability: str, records: list[SafetyRecord]) -> Decision:
    """May an ad with this suitability setting run in this context? The most severe post decides; a model-based
    category left unscored blocks a conservative ad (it may hide anything) and is named in every other reason."""
    if suitability not in SUITABILITY:
        raise ValueError(f"suitability {suitability!r}: expected one of {', '.join(SUITABILITY)}")
    context = [r.post_id for r in records]
    if not records:
        return Decision(True, suitability, "no posts around the slot", None, context)
    worst = max(records, key=lambda r: TIERS.index(r.tier))
    unscored = sorted({n for r in records for n in r.unscored})
    note = f"; not scored (no model): {', '.join(unscored)}" if unscored else ""
    if worst.tier not in SUITABILITY[suitability]:
        return Decision(
            False, suitability, f"post {worst.post_id} is {worst.tier} ({worst.rule}){note}", worst, context
        )
    if unscored and suitability == "conservative":
        blocker = next(r for r in records if r.unscored)
        return Decision(
            False,
            suitability,
            f"post {blocker.post_id}: {', '.join(unscored)} not scored (no model)",
            blocker,
            context,
        )
    return Decision(
        True, suitability, f"every post is {', '.join(SUITABILITY[suitability])}{note}", worst, context
    )


def slot_context(
    records: list[SafetyRecord], slot: int, each_side: int = ADJACENT_POSTS
) -> list[SafetyRecord]:
    """The posts an ad inserted before feed position `slot` is seen with: `each_side` above it and below it."""
    if not 0 <= slot <= len(records):
        raise ValueError(f"slot {slot}: expected 0..{len(records)} in a feed of {len(records)} posts")
    return records[max(0, slot - each_side) : slot + each_side]


def judge_slot(suitability: str, records: list[SafetyRecord], slot: int) -> Decision:
    """`judge` on the neighbours of a feed slot (the adjacency a feed creates, not one post alone)."""
    return judge(suitability, slot_context(records, slot))


# ---------------------------------------------------------------------------------------------------------------
# Classifiers for the hate and profanity categories


def train_safety_classifiers(
    ckpt: str | Path,
    tweeteval_dir: str | Path = TWEETEVAL_DIR,
    out_dir: str | Path | None = None,
    settings: ClassifySettings | None = None,
    train_cap: int | None = None,
) -> dict:
    """Train TweetEval's hate and offensive classifiers on a run (default folder RUN/safety/{hate,offensive}, where
    the default policy's "run:safety/..." paths find them), early-stopped on val's macro-F1, and score them on test.

    Returns (and writes to OUT/report.json) per task the test macro-F1 in percent, its published rows and the
    training report; `train_cap` keeps the first rows of train."""
    run_dir, _ = resolve(ckpt)
    out = Path(out_dir) if out_dir is not None else run_dir / CLASSIFIER_DIR
    s = settings or ClassifySettings(mode="probe")
    report: dict = {"ckpt": str(ckpt), "settings": asdict(s), "tasks": {}}
    for task in SAFETY_TASKS:
        train = load_split(tweeteval_dir, task, "train", train_cap)
        val, test = load_split(tweeteval_dir, task, "val"), load_split(tweeteval_dir, task, "test")
        classes = sorted(int(k) for k in mapping(tweeteval_dir, task))
        trained = classify.fit(
            load_model(ckpt), train, val, s, metric=lambda g, p, t=task: task_metric(t, g, p), labels=classes
        )
        classify.save(trained, out / task)
        pred = [classes[i] for i in classify.predict_proba(trained, test.texts).argmax(1)]
        report["tasks"][task] = {
            "test_macro_f1": round(100 * task_metric(task, test.labels, pred), 1),
            "published": {name: row[task] for name, row in PUBLISHED.items()},
            "train_rows": len(train.texts),
            "training": trained.report,
        }
    with atomic_write(out / "report.json", "w") as f:
        json.dump(report, f, indent=1)
    return report


def format_f1_table(report: dict, name: str) -> str:
    """Markdown: the published TweetEval rows for hate and offensive, then ours."""
    tasks = list(SAFETY_TASKS)
    rows = ["| Model | " + " | ".join(t.capitalize() for t in tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for model, row in PUBLISHED.items():
        rows.append(f"| {model} | " + " | ".join(f"{row[t]:.1f}" for t in tasks) + " |")
    ours = [f"{report['tasks'][t]['test_macro_f1']:.1f}" if t in report["tasks"] else "-" for t in tasks]
    rows.append(f"| **{name}** | " + " | ".join(ours) + " |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------------
# Offline evaluation


def sample_posts(limit: int | None = None, root: Path = SAMPLE_POSTS) -> list[str]:
    """The bundled Sentiment140 posts (negative then positive file), the first `limit` of each file."""
    out: list[str] = []
    for name in ("sentiment140_negative", "sentiment140_positive"):
        with gzip.open(root / f"{name}.txt.gz", "rt", encoding="utf-8") as f:
            out += [line.rstrip("\n") for line in itertools.islice(f, limit)]
    return out


def evaluate(
    safety: BrandSafety,
    tweeteval_dir: str | Path = TWEETEVAL_DIR,
    posts: list[str] | None = None,
    batch: int = 512,
) -> dict:
    """Brand safety offline: F1 per category where labels exist, and the share of posts each tier (and each
    suitability setting) blocks.

    - F1: hate_speech against TweetEval hate's test labels, obscenity_and_profanity against offensive's: a post
      counts as flagged when its category reaches any tier (medium or above); macro-F1 as TweetEval scores them,
      and the F1 of the flagged class.
    - Tiers: on `posts` (default: the bundled sample's 100,000 Sentiment140 posts), the share at each tier, the
      share each suitability setting blocks alone and in a feed (a post beside a slot's neighbours), the share
      each category puts above low, and posts per second."""
    result: dict = {"model_version": safety.model_version, "f1": {}}
    for task, category in SAFETY_TASKS.items():
        if category not in safety.policy.categories:
            continue
        test = load_split(tweeteval_dir, task, "test")
        records = _score_all(safety, test.texts, batch)
        flagged = [int(_reaches(safety, r, category)) for r in records]
        gold = [int(y) for y in test.labels]
        result["f1"][category] = {
            "labels": f"TweetEval {task} test ({len(gold)} posts)",
            "macro_f1": round(100 * task_metric(task, gold, flagged), 1),
            "f1_flagged": round(100 * classify.class_scores(gold, flagged).get(1, {"f1": 0.0})["f1"], 1),
            "flagged_share": round(sum(flagged) / len(flagged), 4),
            "published_macro_f1": {name: row[task] for name, row in PUBLISHED.items()},
        }
    posts = sample_posts() if posts is None else posts
    start = time.perf_counter()
    records = _score_all(safety, posts, batch)
    seconds = time.perf_counter() - start
    n = len(records)
    tiers = Counter(r.tier for r in records)
    result["posts"] = n
    result["posts_per_second"] = round(n / seconds, 1)
    result["tier_share"] = {t: round(tiers[t] / n, 4) for t in TIERS}
    result["blocked_share"] = {}
    for name in SUITABILITY:
        alone = sum(not judge(name, [r]).allowed for r in records) / n
        # every gap between two posts as a slot: what an ad there is judged against
        feed = sum(not judge_slot(name, records, k).allowed for k in range(1, n)) / max(n - 1, 1)
        result["blocked_share"][name] = {"post": round(alone, 4), "feed_slot": round(feed, 4)}
    result["category_share"] = {
        c: round(sum(_reaches(safety, r, c) for r in records) / n, 4) for c in safety.policy.categories
    }
    return result


def _reaches(safety: BrandSafety, record: SafetyRecord, category: str) -> bool:
    """Does the category's score reach any tier (medium or above) in this record?"""
    return tier_of(record.scores[category], safety.policy.categories[category].tiers) != "low"


def _score_all(safety: BrandSafety, texts: list[str], batch: int) -> list[SafetyRecord]:
    out: list[SafetyRecord] = []
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        out += safety.score(chunk, [str(start + i) for i in range(len(chunk))])
    return out
