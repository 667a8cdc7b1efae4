"""Classifiers on a Myna model: reading labelled files (bad rows name their line), fine-tuning and probing the
shared tiny base pre-trained on real tweets, calibration, saving and predicting."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, myna

from myna.eval.classify import (
    ClassifySettings,
    Examples,
    class_scores,
    ece,
    fit,
    fit_temperature,
    label_vocab,
    load,
    macro_f1,
    predict_file,
    read_examples,
    train_classifier,
)
from myna.eval.tweeteval import load_split
from myna.runs import load_model

TWEETEVAL = REPO / "data" / "tweeteval"


@pytest.fixture(scope="module")
def sentiment() -> tuple[Examples, Examples]:
    """Real TweetEval sentiment (3 classes): 1,500 rows of the rebuilt train split, 600 of the official val."""
    return load_split(TWEETEVAL, "sentiment", "train", 1500), _first(
        load_split(TWEETEVAL, "sentiment", "val"), 600
    )


def _first(ex: Examples, n: int) -> Examples:
    return Examples(ex.texts[:n], ex.labels[:n], ex.source)


def _majority_macro_f1(labels: list) -> float:
    majority = max(set(labels), key=labels.count)
    return macro_f1(labels, [majority] * len(labels))


def _write_jsonl(path: Path, ex: Examples, names: list[str]) -> None:
    rows = [json.dumps({"text": t, "label": names[y]}) for t, y in zip(ex.texts, ex.labels, strict=True)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


# --- reading -----------------------------------------------------------------------------------------------------


def test_reads_jsonl_and_tsv_with_label_kinds_in_order(tmp_path: Path):
    j = tmp_path / "a.jsonl"
    j.write_text(
        '{"text": "good day", "label": "pos"}\n{"text": "bad day", "label": "neg"}\n{"text": "ok", "label": "pos"}\n'
    )
    ex = read_examples(j)
    assert ex.texts == ["good day", "bad day", "ok"] and ex.labels == ["pos", "neg", "pos"]
    assert label_vocab(ex) == ["pos", "neg"]  # strings: order of first appearance
    t = tmp_path / "b.tsv"
    t.write_text("a tab\tinside\t2\nsecond\t10\nthird\t1\n")
    ex = read_examples(t)
    assert ex.texts == ["a tab\tinside", "second", "third"] and ex.labels == [2, 10, 1]
    assert label_vocab(ex) == [1, 2, 10]  # ints: numeric order, not "10" < "2"
    unlabelled = tmp_path / "c.tsv"
    unlabelled.write_text("just text\nmore text\n")
    assert read_examples(unlabelled, require_labels=False).labels == [None, None]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("x.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0\n', "x.jsonl:2: not valid JSON"),
        ("x.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', "x.jsonl:2: field 'label'"),
        ("x.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n', "x.jsonl:2: empty line"),
        ("x.jsonl", '{"text": 5, "label": 1}\n', "x.jsonl:1: field 'text' must be a string"),
        (
            "x.jsonl",
            '{"text": "a", "label": [1]}\n',
            "x.jsonl:1: field 'label' must be a string or an integer",
        ),
        ("x.jsonl", '{"text": "a", "label": true}\n', "x.jsonl:1: field 'label'"),
        ("x.tsv", "fine\t1\nno label here\n", "x.tsv:2: no label"),
        ("x.tsv", "fine\t1\n\t0\n", "x.tsv:2: empty text"),
    ],
)
def test_bad_rows_name_their_line(tmp_path: Path, name: str, content: str, message: str):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_examples(path)


def test_bad_utf8_and_mixed_label_kinds(tmp_path: Path):
    path = tmp_path / "x.tsv"
    path.write_bytes(b"ok\t1\nbad \xff byte\t0\n")
    with pytest.raises(ValueError, match=r"x.tsv:2: not valid UTF-8"):
        read_examples(path)
    path = tmp_path / "y.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "one"}\n')
    with pytest.raises(ValueError, match="mix strings and integers"):
        label_vocab(read_examples(path))


# --- metrics and calibration -------------------------------------------------------------------------------------


def test_class_scores_by_hand():
    gold = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 1, 1]  # class 2 is never predicted
    s = class_scores(gold, pred)
    assert s[0] == {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    assert s[1]["precision"] == 0.5 and s[1]["recall"] == 1.0 and s[1]["f1"] == pytest.approx(2 / 3)
    assert s[2] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert macro_f1(gold, pred) == pytest.approx((0.8 + 2 / 3 + 0) / 3)
    # a predicted label absent from gold joins the average (as scikit-learn's report does)
    assert macro_f1([0, 0], [0, 3]) == pytest.approx((2 / 3 + 0) / 2)


def test_ece_and_temperature_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    gold = [0, 1, 1, 0]
    # bins (0.6,0.667]: conf 0.6 right; (0.667,0.733]: 0.7 right; (0.733,0.8]: 0.8 wrong; (0.867,0.933]: 0.9 right
    assert ece(probs, gold) == pytest.approx((0.4 + 0.3 + 0.8 + 0.1) / 4)
    # overconfident logits: the fitted temperature softens them and lowers the NLL
    logits = torch.tensor([[4.0, -4.0], [4.0, -4.0], [-4.0, 4.0], [4.0, -4.0]])
    t = fit_temperature(logits, gold)
    assert t > 1.5
    nll = torch.nn.functional.cross_entropy
    assert nll(logits / t, torch.tensor(gold)) < nll(logits, torch.tensor(gold))


# --- training on real data -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_finetune_beats_majority_then_saves_and_predicts(base_run: Path, sentiment, tmp_path: Path):
    train, val = sentiment
    names = ["negative", "neutral", "positive"]
    _write_jsonl(tmp_path / "train.jsonl", train, names)
    _write_jsonl(tmp_path / "val.jsonl", val, names)
    settings = ClassifySettings(
        mode="finetune", epochs=2, evals_per_epoch=1, lr_body=1e-3, lr_head=3e-3, max_len=64
    )
    killed = tmp_path / ".clf.k1ll3d00.tmp"  # what a save killed midway leaves beside the folder
    killed.mkdir()
    report = train_classifier(
        base_run, tmp_path / "train.jsonl", tmp_path / "val.jsonl", tmp_path / "clf", settings
    )
    baseline = _majority_macro_f1(val.labels)
    assert report["val_metric"] > baseline + 0.1, (report["val_metric"], baseline)
    assert report["val_ece_after"] <= report["val_ece_before"] + 0.02
    saved = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert saved["labels"] == list(dict.fromkeys(names[y] for y in train.labels))  # first appearance
    assert {p.name for p in (tmp_path / "clf").iterdir()} == {
        "classifier.json",
        "head.safetensors",
        "body.safetensors",
        "tokenizer.json",
    }
    assert not killed.exists()

    # predict from the saved folder: one row per input, probabilities over the labels summing to 1, and the
    # reloaded model agrees with the validation score it was chosen by
    n = predict_file(tmp_path / "clf", tmp_path / "val.jsonl", tmp_path / "pred.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert n == len(rows) == len(val.texts)
    for row in rows:
        assert set(row["probabilities"]) == set(names) and row["label"] in names
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
    score = macro_f1([r["gold"] for r in rows], [r["label"] for r in rows])
    assert score == pytest.approx(report["val_metric"], abs=1e-9)

    # a folder saved before the `decision` setting was removed: argmax loads as before, tuned offsets are refused
    for decision, loads in (("argmax", True), ("tuned", False)):
        saved["settings"]["decision"] = decision
        (tmp_path / "clf" / "classifier.json").write_text(json.dumps(saved))
        if loads:
            assert load(tmp_path / "clf").labels == saved["labels"]
        else:
            with pytest.raises(ValueError, match="decision 'tuned', which Myna no longer applies"):
                load(tmp_path / "clf")


def test_the_auxiliary_lm_loss_is_the_models_own_loss_on_the_unpadded_texts(base_run: Path, sentiment):
    from myna.eval.classify import Classifier, collate, encode

    base = load_model(base_run)
    seqs = encode(base.tokenizer, sentiment[0].texts[:3], 64)
    idx, lengths = collate(seqs, [0, 1, 2], base.tokenizer.pad_id, "cpu")
    assert len(set(lengths.tolist())) > 1  # right padding is really there
    model = Classifier(base.model, 3, "mean").eval()
    with torch.no_grad():
        _, lm_loss = model.forward_with_lm(idx, lengths)
        # the same texts one at a time, no padding: token-weighted mean of the model's own next-token losses
        total = sum(base.model(torch.tensor([s[:-1]]), torch.tensor([s[1:]]))[1] * (len(s) - 1) for s in seqs)
    assert lm_loss.item() == pytest.approx((total / sum(len(s) - 1 for s in seqs)).item(), rel=1e-5)


def test_probe_keeps_the_body_frozen_and_beats_majority(base_run: Path, sentiment, tmp_path: Path):
    train, val = sentiment
    base = load_model(base_run)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    trained = fit(base, train, val, ClassifySettings(mode="probe", probe_epochs=200, max_len=64))
    assert all(torch.equal(before[k], v) for k, v in trained.model.body.state_dict().items())
    assert trained.report["val_metric"] > _majority_macro_f1(val.labels) + 0.1
    assert trained.report["val_ece_after"] <= trained.report["val_ece_before"] + 0.02


@pytest.mark.slow
def test_the_cli_trains_a_probe_and_predicts_as_a_user_would(base_run: Path, sentiment, tmp_path: Path):
    train, val = sentiment
    names = ["negative", "neutral", "positive"]
    _write_jsonl(tmp_path / "train.jsonl", _first(train, 300), names)
    _write_jsonl(tmp_path / "val.jsonl", _first(val, 100), names)
    trained = myna("classify", "train", "--ckpt", str(base_run), "--train", str(tmp_path / "train.jsonl"),
                   "--val", str(tmp_path / "val.jsonl"), "--out", str(tmp_path / "clf"), "--mode", "probe")  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    predicted = myna("classify", "predict", "--model", str(tmp_path / "clf"), "--input",
                     str(tmp_path / "val.jsonl"), "--out", str(tmp_path / "pred.jsonl"))  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert len(rows) == 100 and all(r["label"] in names for r in rows)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)
    # the labels are the most probable classes
    order = json.loads((tmp_path / "clf" / "classifier.json").read_text())["labels"]  # the classifier's order
    probs = np.array([[r["probabilities"][n] for n in order] for r in rows])
    assert [r["label"] for r in rows] == [order[k] for k in probs.argmax(1)]
    missing = myna("classify", "train", "--ckpt", str(base_run))
    assert missing.returncode != 0 and "--train, --val and --out are required" in missing.stderr


def test_the_finetune_flags_of_classify_train_and_eval_reach_the_settings():
    from myna.cli import parse_args
    from myna.flags import given

    args = parse_args(["classify", "train", "--lr-body", "1e-3", "--lm-weight", "0.25"])
    s = ClassifySettings(**given(args, ClassifySettings))
    assert (s.lr_body, s.lm_weight, s.lr_head) == (1e-3, 0.25, ClassifySettings.lr_head)
    args = parse_args(["eval", "RUN", "--lr-head", "1e-2", "--lm-weight", "0"])
    s = ClassifySettings(**given(args, ClassifySettings))
    assert (s.lr_head, s.lm_weight, s.lr_body) == (1e-2, 0.0, ClassifySettings.lr_body)
