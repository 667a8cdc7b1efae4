"""TweetEval: the official metrics against hand computations, the upstream RoB-RT predictions scoring exactly the
published numbers, the predictions-folder layout, and LM label-word scoring with a tiny pre-trained model."""

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, myna

from myna.eval.classify import ClassifySettings
from myna.eval.tweeteval import (
    PUBLISHED,
    STANCE_TARGETS,
    TASKS,
    format_table,
    load_split,
    run_tweeteval,
    score_predictions,
    task_metric,
    with_all,
    write_predictions,
)

DATA = REPO / "data" / "tweeteval"
ROBRT = DATA / "reference_predictions_robrt"


def test_robrt_reference_predictions_score_the_published_numbers():
    scores = score_predictions(DATA, ROBRT)
    expected = [31.55, 79.83, 55.47, 62.48, 81.55, 72.86, 72.44]
    assert [round(scores[t], 2) for t in TASKS] == expected
    assert round(scores["ALL"], 2) == 65.17


@pytest.mark.parametrize(
    ("task", "gold", "pred", "expected"),
    [
        # macro-F1; class 2 never predicted -> F1 0 but still averaged
        ("emotion", [0, 0, 1, 1, 2], [0, 0, 1, 0, 0], (2 * 0.5 / 1.5 + 2 / 3 + 0) / 3),
        # irony: F1 of the ironic class only (P = 1/2, R = 1/3)
        ("irony", [1, 1, 1, 0, 0], [1, 0, 0, 1, 0], 2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3)),
        # sentiment: macro recall (1, 1/2, 0)
        ("sentiment", [0, 1, 1, 2], [0, 1, 0, 1], (1 + 1 / 2 + 0) / 3),
        # stance: mean of F1(against=1) and F1(favor=2); "none" (0) is ignored
        ("stance", [0, 1, 1, 2, 2], [1, 1, 0, 2, 0], (0.5 + 2 / 3) / 2),
        # a predicted label that gold never has joins the macro average with recall 0
        ("sentiment", [0, 0, 1], [0, 2, 1], (1 / 2 + 1 + 0) / 3),
        # favor never predicted nor present: F1 0
        ("stance", [1, 1], [1, 1], (1 + 0) / 2),
    ],
)
def test_task_metrics_by_hand(task, gold, pred, expected):
    assert task_metric(task, gold, pred) == pytest.approx(expected)


def test_all_is_the_plain_mean_and_needs_seven():
    scores = {t: float(i) for i, t in enumerate(TASKS)}
    assert with_all(scores)["ALL"] == pytest.approx(3.0)
    del scores["stance"]
    with pytest.raises(ValueError, match="stance"):
        with_all(scores)
    assert PUBLISHED["SVM"]["ALL"] == 53.5 and PUBLISHED["BERTweet"]["irony"] == 82.1


def test_written_predictions_round_trip_and_bad_files_are_named(tmp_path: Path):
    """Write the gold labels as predictions (stance split per target): every task scores 100."""
    pred = tmp_path / "pred"
    for task in TASKS:
        write_predictions(pred, task, load_split(DATA, task, "test").labels, DATA)
    assert sorted(p.name for p in (pred / "stance").iterdir()) == [
        f"{t}.txt" for t in ("abortion", "atheism", "climate", "feminist", "hillary")
    ]
    assert all(v == pytest.approx(100.0) for v in score_predictions(DATA, pred).values())

    (pred / "irony.txt").write_text("0\n" * 783)
    with pytest.raises(ValueError, match=r"irony.txt: 783 predictions but the test set has 784"):
        score_predictions(DATA, pred)
    (pred / "irony.txt").write_text("0\n" * 10 + "ironic\n" + "0\n" * 773)
    with pytest.raises(ValueError, match=r"irony.txt:11: 'ironic' is not a label id"):
        score_predictions(DATA, pred)


def test_gzipped_and_plain_files_read_alike(tmp_path: Path):
    shutil.copytree(DATA / "irony", tmp_path / "irony")
    with gzip.open(tmp_path / "irony" / "test_labels.txt.gz", "rb") as f:
        (tmp_path / "irony" / "test_labels.txt").write_bytes(f.read())
    (tmp_path / "irony" / "test_labels.txt.gz").unlink()
    assert load_split(tmp_path, "irony", "test").labels == load_split(DATA, "irony", "test").labels


def test_table_marks_sentiment_as_approx_train():
    ours = with_all({t: 50.0 for t in TASKS})
    table = format_table({"ours": ours})
    assert "50.0 (approx. train)" in table and "| SVM |" in table and "**50.0**" in table
    assert len(table.splitlines()) == 2 + len(PUBLISHED) + 1
    # a run of some tasks only (`myna eval --tasks`): their cells, dashes elsewhere, no ALL
    some = format_table({"ours": {"irony": 60.0, "hate": 40.0}}).splitlines()[-1]
    assert some == "| **ours** | - | - | 40.0 | 60.0 | - | - | - | **-** |"


@pytest.mark.parametrize("shots", [0, 2])
def test_lm_label_scoring_on_a_subset(base_run: Path, tmp_path: Path, shots: int):
    result = run_tweeteval(
        base_run, DATA, tmp_path, mode="lm", shots=shots, test_cap=40, tasks=("irony", "sentiment")
    )
    assert set(result["scores"]) == {"irony", "sentiment"}
    assert all(0.0 <= v <= 100.0 for v in result["scores"].values())
    assert result["notes"] == {} and result["tasks"]["irony"]["test_rows"] == 40  # zero-shot: no train data
    assert (tmp_path / "result.json").is_file()


def test_a_capped_train_set_missing_a_class_still_trains_on_all_of_them(base_run: Path, tmp_path: Path):
    # emoji's first 60 train rows lack some of its 20 classes, which its val set has
    assert len(set(load_split(DATA, "emoji", "train", 60).labels)) < 20
    settings = ClassifySettings(mode="probe", probe_epochs=20)
    result = run_tweeteval(
        base_run, DATA, tmp_path, train_cap=60, test_cap=40, settings=settings, tasks=("emoji",)
    )
    assert 0.0 <= result["scores"]["emoji"] <= 100.0


def test_the_cli_scores_a_predictions_folder_without_marking_it():
    done = myna("tweeteval", "score", "--predictions", str(DATA / "reference_predictions_robrt"))
    assert done.returncode == 0, done.stderr
    row = done.stdout.splitlines()[-1]
    assert row.startswith("| **reference_predictions_robrt** |") and row.endswith("| **65.2** |")
    assert "approx. train" not in row  # upstream's model trained on the real sentiment train split


@pytest.mark.slow
def test_seeds_average_the_probabilities_of_classifiers_trained_apart(base_run: Path, tmp_path: Path):
    from dataclasses import replace

    from myna.eval.classify import fit, predict_proba
    from myna.runs import load_model

    s = ClassifySettings(epochs=1, max_len=48)
    result = run_tweeteval(base_run, DATA, tmp_path, train_cap=80, settings=s, tasks=("irony",), seeds=2)
    train, val = load_split(DATA, "irony", "train", 80), load_split(DATA, "irony", "val")
    test = load_split(DATA, "irony", "test")
    metric = lambda g, p: task_metric("irony", g, p)  # noqa: E731
    members = [
        fit(load_model(base_run), train, val, replace(s, seed=seed), metric, [0, 1]) for seed in (0, 1)
    ]
    probs = [predict_proba(m, test.texts) for m in members]
    val_probs = [predict_proba(m, val.texts) for m in members]
    # each member is the classifier its seed trains alone; the written predictions are their averaged
    # probabilities' argmax, and the averaged probabilities are saved beside them
    average = (probs[0] + probs[1]) / 2
    expected = average.argmax(1)
    written = (tmp_path / "predictions" / "irony.txt").read_text().split()
    assert [int(p) for p in written] == expected.tolist()
    saved = np.load(tmp_path / "probabilities" / "irony.npz")
    np.testing.assert_allclose(saved["test"], average, rtol=1e-5)
    np.testing.assert_allclose(saved["val"], (val_probs[0] + val_probs[1]) / 2, rtol=1e-5)
    assert saved["val"].shape == (len(val.texts), 2) and saved["val_gold"].tolist() == val.labels
    assert not (probs[0].argmax(1) == probs[1].argmax(1)).all()  # the seeds differ, so the average matters
    assert len(result["tasks"]["irony"]["val_metric_members"]) == 2 and "2 seeds" in result["mode"]


@pytest.mark.slow
def test_seed_choice_best_keeps_the_classifier_val_scores_highest(base_run: Path, tmp_path: Path):
    from dataclasses import replace

    from myna.eval.classify import fit, predict_proba
    from myna.runs import load_model

    s = ClassifySettings(epochs=1, max_len=48)
    result = run_tweeteval(
        base_run, DATA, tmp_path, train_cap=80, settings=s, tasks=("stance",), seeds=2, seed_choice="best"
    )
    train, val = load_split(DATA, "stance", "train", 80), load_split(DATA, "stance", "val")
    metric = lambda g, p: task_metric("stance", g, p)  # noqa: E731
    members = [fit(load_model(base_run), train, val, replace(s, seed=k), metric, [0, 1, 2]) for k in (0, 1)]
    test = load_split(DATA, "stance", "test")
    preds = [predict_proba(m, test.texts).argmax(1).tolist() for m in members]
    scores = [m.report["val_metric"] for m in members]
    assert scores[0] != scores[1] and preds[0] != preds[1]  # the choice matters
    best = scores.index(max(scores))
    detail = result["tasks"]["stance"]
    assert detail["chosen_seed"] == best and detail["val_metric"] == pytest.approx(scores[best])
    written = [
        int(p)
        for target in STANCE_TARGETS
        for p in (tmp_path / "predictions" / "stance" / f"{target}.txt").read_text().split()
    ]
    assert written == preds[best] and "best of 2 seeds on val" in result["mode"]
    with pytest.raises(ValueError, match="seed_choice"):
        run_tweeteval(base_run, DATA, tmp_path, tasks=("stance",), seed_choice="median")
