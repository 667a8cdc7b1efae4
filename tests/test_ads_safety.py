"""Brand safety and the shared scorer: policy fields and their errors, keyword, embedding and classifier rules on
the tiny base, tiers, advertisers' suitability beside a feed slot's neighbours, the records, the offline
evaluation, and chat moderation reading the same file."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from myna.ads.safety import (
    ADJACENT_POSTS,
    DEFAULT_POLICY,
    SUITABILITY,
    BrandSafety,
    SafetyRecord,
    evaluate,
    judge,
    judge_slot,
    sample_posts,
    slot_context,
    tier_of,
    train_safety_classifiers,
)
from myna.eval import classify
from myna.eval.classify import ClassifySettings
from myna.eval.settings import TWEETEVAL_DIR
from myna.moderation import Policy, StreamGuard, moderate_exchange
from myna.safety import Scorer, similarity_score
from myna.search.index import Embedder, fingerprint

IAB = {
    "adult",
    "arms",
    "crime",
    "death_and_conflict",
    "debated_social_issues",
    "hate_speech",
    "illegal_drugs_tobacco_alcohol",
    "obscenity_and_profanity",
    "online_piracy",
    "spam",
    "terrorism",
}
EXAMPLE = "the quarterly meeting moved to thursday afternoon"


@pytest.fixture(scope="module")
def safety_run(base_run: Path, tmp_path_factory) -> Path:
    """A copy of the tiny base with hate and offensive probes in RUN/safety/, trained on 300 bundled train rows."""
    run = tmp_path_factory.mktemp("safety") / "run"
    shutil.copytree(base_run, run)
    train_safety_classifiers(run, settings=ClassifySettings(mode="probe", probe_epochs=30), train_cap=300)
    return run


def write(tmp_path: Path, data: dict, name: str = "policy.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def mixed_policy(tmp_path: Path, safety_run: Path, **hate) -> Path:
    """One category of each kind; the classifier path is relative to the policy file."""
    (tmp_path / "clf").mkdir(exist_ok=True)
    shutil.copytree(safety_run / "safety" / "hate", tmp_path / "clf" / "hate", dirs_exist_ok=True)
    return write(
        tmp_path,
        {
            "extends": "none",
            "categories": {
                "spam": {
                    "terms": ["free followers"],
                    "keyword_score": 0.6,
                    "tiers": {"high": 0.7, "medium": 0.5},
                },
                "meetings": {"examples": [EXAMPLE], "similarity": 0.99, "tiers": {"floor": 0.9}},
                "hate": {"classifier": "clf/hate", "label": 1, "tiers": {"medium": 0.5}, **hate},
            },
        },
    )


# -- the policy file ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, field, said",
    [
        ({"examples": ["a b"]}, "categories.x.similarity", "required with examples"),
        ({"examples": ["a b"], "similarity": 1.5}, "categories.x.similarity", "(0, 1]"),
        ({"examples": [""], "similarity": 0.9}, "categories.x.examples[0]", "non-empty"),
        ({"classifier": "clf"}, "categories.x.label", "required with a classifier"),
        ({"classifier": "clf", "label": True}, "categories.x.label", "label name or id"),
        (
            {"terms": ["a"], "tiers": {"medium": 0.9, "high": 0.5}},
            "categories.x.tiers",
            "floor >= high >= medium",
        ),
        ({"terms": ["a"], "tiers": {"severe": 0.9}}, "categories.x.tiers", "unknown tier 'severe'"),
        ({"terms": ["a"], "keyword_score": 0}, "categories.x.keyword_score", "(0, 1]"),
        ({"terms": ["a"], "threshold": "high"}, "categories.x.threshold", "(0, 1]"),
        ({"terms": ["a"], "colour": "red"}, "categories.x", "unknown field 'colour'"),
    ],
)
def test_policy_errors_name_the_field(tmp_path: Path, spec, field, said):
    path = write(tmp_path, {"extends": "none", "categories": {"x": spec}})
    with pytest.raises(ValueError) as e:
        Policy.load(path)
    assert f"{path}: {field}" in str(e.value) and said in str(e.value)


def test_brand_safety_needs_tiers_on_every_category(tmp_path: Path):
    path = write(tmp_path, {"extends": "none", "categories": {"x": {"terms": ["a"]}}})
    with pytest.raises(ValueError, match=r"categories\.x\.tiers: brand safety needs"):
        BrandSafety.load(path)


def test_default_policy_is_the_iab_topics_and_moderation_reads_it(tmp_path: Path):
    p = Policy.load(DEFAULT_POLICY)
    assert set(p.categories) == IAB
    assert all(c.tiers and c.action == "label" for c in p.categories.values())
    assert p.categories["hate_speech"].classifier == "run:safety/hate"
    assert Policy.load(write(tmp_path, p.to_dict())).categories == p.categories
    assert p.scan("isis claims the car bomb", set(p.categories)).names() == ["terrorism"]


# -- scoring ---------------------------------------------------------------------------------------------------------


def test_keyword_embedding_and_classifier_rules_score(tmp_path: Path, safety_run: Path):
    b = BrandSafety.load(mixed_policy(tmp_path, safety_run), safety_run)
    texts = ["get free followers now", EXAMPLE, "lovely weather for a walk"]
    records = b.score(texts, ["k", "e", "c"])
    k, e, c = records
    assert k.scores["spam"] == 0.6 and k.tier == "medium" and k.rule == "spam: keyword 'free followers'"
    assert e.scores["meetings"] == pytest.approx(1.0, abs=1e-5) and e.tier == "floor"
    assert e.rule.startswith(f"meetings: example {EXAMPLE!r} (cosine 1.000)")
    # the shared pass gives a probe the probabilities its own folder gives
    trained = classify.load(tmp_path / "clf" / "hate")
    expected = classify.predict_proba(trained, texts)[:, trained.labels.index(1)]
    assert [r.scores["hate"] for r in records] == pytest.approx(expected, abs=1e-4)
    assert b.scorer.classifiers["hate"].shared
    # and the embeddings are the engine's
    emb = Embedder.load(safety_run)
    pooled = b.scorer._normalised(b.scorer._pooled(texts))
    assert np.allclose(pooled, emb(texts), atol=1e-5)


def test_similarity_maps_the_threshold_to_one_half():
    cos = np.array([0.0, 0.45, 0.9, 0.95, 1.0, -0.3])
    assert similarity_score(cos, 0.9).tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 0.0])


def test_tiers_and_records_carry_every_field(safety_run: Path):
    b = BrandSafety.load(None, safety_run)
    assert tier_of(0.96, {"floor": 0.95, "high": 0.85}) == "floor"
    assert tier_of(0.9, {"floor": 0.95, "high": 0.85}) == "high" and tier_of(0.1, {"high": 0.5}) == "low"
    (slur, war, plain) = b.score(
        ["you filthy f4ggot", "the death toll keeps rising", "good morning all"], ["1", "2", "3"]
    )
    assert slur.tier == "floor" and slur.rule == "hate_speech: keyword 'faggot'"
    assert war.scores["death_and_conflict"] == 0.6  # a mention: keyword_score 0.6, the medium tier
    ckpt = Path(b.scorer.embedder.ckpt)
    assert plain.model_version.endswith(
        "@" + b.scorer.embedder.fingerprint
    ) and plain.model_version.startswith("run/")
    assert b.scorer.embedder.fingerprint == fingerprint(sorted((ckpt / "checkpoints").iterdir())[-1])
    d = asdict(slur)
    assert set(d) == {"post_id", "model_version", "scores", "tier", "rule", "unscored", "reason"}
    assert set(d["scores"]) == IAB and d["unscored"] == [] and "hate_speech scores 1.00" in d["reason"]
    decision = judge("relaxed", [slur]).to_dict()
    assert json.loads(json.dumps(decision)) == decision
    assert (
        decision["decision"] == "block"
        and decision["record"]["post_id"] == "1"
        and decision["context"] == ["1"]
    )


def test_without_a_model_model_rules_are_reported_unscored():
    b = BrandSafety.load(None, None)
    (r,) = b.score(["good morning all"], ["p"])
    assert r.model_version == "keywords only" and r.tier == "low"
    assert set(r.unscored) == IAB  # every default category has example phrases
    blocked = judge("conservative", [r])
    assert not blocked.allowed and "not scored (no model)" in blocked.reason
    allowed = judge("standard", [r])
    assert allowed.allowed and "not scored (no model): adult" in allowed.reason


# -- suitability and adjacency ----------------------------------------------------------------------------------------


def record(post_id: str, tier: str) -> SafetyRecord:
    return SafetyRecord(post_id, "m", {}, tier, None if tier == "low" else f"x: {tier}", [], "")


def test_suitability_settings_and_floor_never():
    for tier, allowed_by in [
        ("low", {"conservative", "standard", "relaxed"}),
        ("medium", {"standard", "relaxed"}),
        ("high", {"relaxed"}),
        ("floor", set()),
    ]:
        assert {s for s in SUITABILITY if judge(s, [record("a", tier)]).allowed} == allowed_by
    with pytest.raises(ValueError, match="suitability 'lax'"):
        judge("lax", [record("a", "low")])


def keyword_only_default(tmp_path: Path) -> Path:
    """The default policy without its model-based rules: tiers that the tiny model's scores cannot move."""
    data = Policy.load(DEFAULT_POLICY).to_dict()
    for c in data["categories"].values():
        for key in ("examples", "similarity", "classifier", "label", "threshold"):
            c.pop(key, None)
    return write(tmp_path, data)


def test_a_safe_post_next_to_a_floor_post_blocks_a_conservative_ad(tmp_path: Path):
    b = BrandSafety.load(keyword_only_default(tmp_path), None)
    feed = b.score(
        ["good morning all", "you filthy f4ggot", "lovely walk today", "coffee time"], list("abcd")
    )
    assert [r.tier for r in feed] == ["low", "floor", "low", "low"]
    assert ADJACENT_POSTS == 1 and [r.post_id for r in slot_context(feed, 2)] == ["b", "c"]
    # the post below slot 2 is safe alone, but the slot shows the floor post above it
    assert judge("conservative", [feed[2]]).allowed
    d = judge_slot("conservative", feed, 2)
    assert (
        not d.allowed
        and d.record.post_id == "b"
        and d.context == ["b", "c"]
        and "post b is floor" in d.reason
    )
    assert not judge_slot("relaxed", feed, 1).allowed
    assert judge_slot("conservative", feed, 3).allowed and judge_slot("conservative", feed, 4).allowed
    with pytest.raises(ValueError, match="slot 5"):
        slot_context(feed, 5)


# -- offline evaluation ---------------------------------------------------------------------------------------------


def test_offline_evaluation(safety_run: Path):
    result = evaluate(BrandSafety.load(None, safety_run), TWEETEVAL_DIR, sample_posts(150))
    assert set(result["f1"]) == {"hate_speech", "obscenity_and_profanity"}
    for f1 in result["f1"].values():
        assert 0 < f1["macro_f1"] <= 100 and f1["published_macro_f1"]["SVM"] > 0
    assert result["posts"] == 300 and sum(result["tier_share"].values()) == pytest.approx(1.0)
    shares = result["blocked_share"]
    # a wider circle of posts can only block more; a stricter setting blocks at least as much
    assert all(shares[s]["feed_slot"] >= shares[s]["post"] for s in SUITABILITY)
    assert shares["conservative"]["post"] >= shares["standard"]["post"] >= shares["relaxed"]["post"]
    assert result["posts_per_second"] > 0


def test_trained_classifier_report(safety_run: Path):
    report = json.loads((safety_run / "safety" / "report.json").read_text())
    assert set(report["tasks"]) == {"hate", "offensive"}
    assert (
        report["tasks"]["hate"]["train_rows"] == 300 and report["tasks"]["hate"]["published"]["SVM"] == 36.7
    )


# -- moderation reads the same file and uses the scorer -----------------------------------------------------------------


def test_moderation_uses_the_scorer_once_bound(tmp_path: Path, safety_run: Path):
    policy = Policy.load(mixed_policy(tmp_path, safety_run, threshold=0.01))
    policy.categories["meetings"].action = "block"
    with pytest.raises(RuntimeError, match="meetings, hate are model-based; bind the policy"):
        moderate_exchange(policy, "hello")
    policy.bind(Embedder.load(safety_run))
    report = moderate_exchange(policy, EXAMPLE)
    assert report.blocked == "input" and "meetings" in report.message
    assert report.input.categories[0].matches[0].startswith(f"example {EXAMPLE!r}")
    # a threshold this low makes the classifier category fire on any text, naming the classifier
    labels = moderate_exchange(policy, "hi there", "get free followers")
    assert (
        labels.input.names() == ["hate"] and "/clf/hate label 1 (p " in labels.input.categories[0].matches[0]
    )
    assert labels.output.names() == ["spam", "hate"]
    # the stream guard stays keyword-only: no block term, so text flows through
    guard = StreamGuard(policy)
    assert guard.feed(EXAMPLE + " and more ") != "" and guard.blocked is None


# -- bad classifier folders ------------------------------------------------------------------------------------------


def test_bad_classifier_folder_is_a_clear_error(tmp_path: Path, safety_run: Path):
    emb = Embedder.load(safety_run)
    missing = write(tmp_path, {"extends": "none", "categories": {"h": {"classifier": "nowhere", "label": 1}}})
    with pytest.raises(
        ValueError, match=r"categories\.h\.classifier: .*nowhere is not a usable classifier folder"
    ):
        Policy.load(missing).bind(emb)
    broken = tmp_path / "broken"
    shutil.copytree(safety_run / "safety" / "hate", broken)
    (broken / "classifier.json").write_text("{}")
    bad = write(
        tmp_path, {"extends": "none", "categories": {"h": {"classifier": "broken", "label": 1}}}, "b.json"
    )
    with pytest.raises(ValueError, match=r"categories\.h\.classifier: .*missing"):
        Scorer(Policy.load(bad), emb)
    wrong = write(
        tmp_path, {"extends": "none", "categories": {"h": {"classifier": "broken", "label": 7}}}, "w.json"
    )
    shutil.copy(safety_run / "safety" / "hate" / "classifier.json", broken / "classifier.json")
    with pytest.raises(ValueError, match=r"categories\.h\.label: '7' is not a label of .*\(0, 1\)"):
        Scorer(Policy.load(wrong), emb)


def test_a_run_without_safety_classifiers_scores_the_rest_and_says_so(base_run):
    """The default policy's hate and profanity classifiers live in RUN/safety (myna ads train-safety): a run without
    them is still scored by keywords and examples, and those categories are reported unscored, never passed."""
    safety = BrandSafety.load(None, base_run)
    (record,) = safety.score(["you are a fucking idiot"])
    assert {"hate_speech", "obscenity_and_profanity"} <= set(record.unscored)
    assert record.scores["obscenity_and_profanity"] > 0  # its keyword still fires
    assert not judge("conservative", [record]).allowed


def test_example_rules_of_a_model_that_embeds_everything_alike_are_left_out():
    """An under-trained model puts every text near one direction: examples of different categories then sit as
    close as the firing threshold, and their rules would fire on every post (seen with the speedrun's smoke model:
    every post floor). Such rules are left out; a model that tells the examples apart keeps them."""
    from myna.safety import examples_separate

    rng = np.random.default_rng(0)
    rows = {"arms": (0, 3), "spam": (3, 6)}
    apart = rng.normal(size=(6, 32))
    apart /= np.linalg.norm(apart, axis=1, keepdims=True)
    alike = np.ones((6, 32)) + 0.01 * rng.normal(size=(6, 32))
    alike /= np.linalg.norm(alike, axis=1, keepdims=True)
    thresholds = {"arms": 0.97, "spam": 0.97}
    assert examples_separate(apart, rows, thresholds) and not examples_separate(alike, rows, thresholds)
