"""TweetEval (Barbieri et al., Findings of EMNLP 2020): seven tweet classification tasks, their official metrics,
the upstream prediction-folder scorer, and runs of a Myna model on all seven.

Data layout (the upstream `datasets/` folder): TASK/{train,val,test}_{text,labels}.txt (or .txt.gz), TASK/mapping.txt,
stance/TARGET/... for the five stance targets. Upstream's sentiment train text is missing from our copy; its
approximate rebuild sits in sentiment/train_approx/ and every sentiment number trained on it is marked
"approx. train".

Metrics follow upstream's evaluation script, which calls scikit-learn's classification_report on the label strings:
macro averages run over the union of gold and predicted labels, and a class that is never predicted has F1 0.
- emoji, emotion, hate, offensive: macro-F1;  irony: F1 of class "1" (ironic);  sentiment: macro-recall;
- stance: mean of F1("1" = against) and F1("2" = favor) over the five targets' test sets concatenated;
- ALL: the plain mean of the seven.
"""

import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from myna.eval.classify import ClassifySettings, Examples, class_scores, fit, predict_proba
from myna.io import atomic_write, open_binary
from myna.model import pad_right
from myna.progress import Progress, log
from myna.runs import load_model

TASKS = ("emoji", "emotion", "hate", "irony", "offensive", "sentiment", "stance")
STANCE_TARGETS = ("abortion", "atheism", "climate", "feminist", "hillary")
APPROX = {"sentiment": "approx. train"}  # trained on the rebuilt train split (see PROVENANCE.md)

# Leaderboard rows of the upstream README (test set, official metrics, percent).
PUBLISHED: dict[str, dict[str, float]] = {
    "SVM": dict(zip((*TASKS, "ALL"), (29.3, 64.7, 36.7, 61.7, 52.3, 62.9, 67.3, 53.5), strict=True)),
    "LSTM": dict(zip((*TASKS, "ALL"), (24.7, 66.0, 52.6, 62.8, 71.7, 58.3, 59.4, 56.5), strict=True)),
    "FastText": dict(zip((*TASKS, "ALL"), (25.8, 65.2, 50.6, 63.1, 73.4, 62.9, 65.4, 58.1), strict=True)),
    "RoBERTa-base": dict(zip((*TASKS, "ALL"), (30.9, 76.1, 46.6, 59.7, 79.5, 71.3, 68.0, 61.3), strict=True)),
    "TimeLMs-2021": dict(zip((*TASKS, "ALL"), (34.0, 80.2, 55.1, 64.5, 82.2, 73.7, 72.9, 66.2), strict=True)),
    "BERTweet": dict(zip((*TASKS, "ALL"), (33.4, 79.3, 56.4, 82.1, 79.5, 73.4, 71.2, 67.9), strict=True)),
}


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def task_metric(task: str, gold: Sequence, pred: Sequence) -> float:
    """The official metric of `task` in [0, 1] on label ids as upstream compares them (strings or ints)."""
    scores = class_scores([str(g) for g in gold], [str(p) for p in pred])

    def f1(label: str) -> float:
        return scores[label]["f1"] if label in scores else 0.0

    if task in ("emoji", "emotion", "hate", "offensive"):
        return sum(s["f1"] for s in scores.values()) / len(scores)
    if task == "irony":
        return f1("1")
    if task == "sentiment":
        return sum(s["recall"] for s in scores.values()) / len(scores)
    if task == "stance":
        return (f1("1") + f1("2")) / 2
    raise ValueError(f"unknown TweetEval task {task!r}; expected one of {', '.join(TASKS)}")


def with_all(scores: dict[str, float]) -> dict[str, float]:
    """Per-task scores plus ALL, the plain mean of the seven."""
    missing = [t for t in TASKS if t not in scores]
    if missing:
        raise ValueError(f"ALL needs all seven tasks; missing {missing}")
    return {**{t: scores[t] for t in TASKS}, "ALL": sum(scores[t] for t in TASKS) / len(TASKS)}


# ---------------------------------------------------------------------------------------------------------------
# Files


def _find(path: Path) -> Path:
    """`path` or its gzipped twin `path.gz`."""
    for p in (path, path.with_name(path.name + ".gz")):
        if p.is_file():
            return p
    raise FileNotFoundError(f"{path}: missing (nor {path.name}.gz)")


def read_lines(path: Path) -> list[str]:
    """The lines of a TweetEval file (split on "\\n" only, as upstream does; the final newline ends the last line)."""
    p = _find(path)
    with open_binary(p) as f:
        text = f.read().decode("utf-8")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def mapping(data_dir: str | Path, task: str) -> dict[str, str]:
    """Label id (as a string) -> label name, from TASK/mapping.txt (emoji's has the emoji in column 2)."""
    out = {}
    for line in read_lines(Path(data_dir) / task / "mapping.txt"):
        if line.strip():
            cols = line.split("\t")
            out[cols[0]] = cols[1]
    return out


def _split_dirs(data_dir: Path, task: str) -> list[tuple[str, Path]]:
    if task == "stance":
        return [(t, data_dir / "stance" / t) for t in STANCE_TARGETS]
    return [("", data_dir / task)]


def load_split(data_dir: str | Path, task: str, split: str, cap: int | None = None) -> Examples:
    """Texts and int labels of one split; stance concatenates the five targets in upstream order, each text
    prefixed with its target ("hillary: ...") so one classifier serves all five. `cap` keeps the first rows (per
    stance target). Sentiment train is the approximate rebuild in sentiment/train_approx/."""
    data_dir = Path(data_dir)
    texts: list[str] = []
    labels: list[int] = []
    for target, d in _split_dirs(data_dir, task):
        if task == "sentiment" and split == "train":
            d = d / "train_approx"
        t = read_lines(d / f"{split}_text.txt")[:cap]
        y = read_lines(d / f"{split}_labels.txt")[:cap]
        if len(t) != len(y):
            raise ValueError(f"{d}/{split}: {len(t)} texts but {len(y)} labels")
        texts += [f"{target}: {x}" if target else x for x in t]
        for i, label in enumerate(y, 1):
            if not label.strip().isdigit():
                raise ValueError(f"{d}/{split}_labels.txt:{i}: label {label!r} is not an integer id")
            labels.append(int(label))
    return Examples(texts, labels, f"{data_dir}/{task}/{split}")


def gold_and_predictions(
    data_dir: str | Path, predictions_dir: str | Path, task: str
) -> tuple[list[str], list[str]]:
    """Test gold labels and a predictions folder's labels for one task (upstream layout: TASK.txt and
    stance/TARGET.txt)."""
    data_dir, pred_dir = Path(data_dir), Path(predictions_dir)
    known = set(mapping(data_dir, task))
    gold: list[str] = []
    pred: list[str] = []
    for target, d in _split_dirs(data_dir, task):
        g = read_lines(d / "test_labels.txt")
        pred_path = pred_dir / "stance" / f"{target}.txt" if target else pred_dir / f"{task}.txt"
        p = read_lines(pred_path)
        if len(p) != len(g):
            raise ValueError(f"{pred_path}: {len(p)} predictions but the test set has {len(g)} rows")
        for i, label in enumerate(p, 1):
            if label not in known:
                raise ValueError(
                    f"{pred_path}:{i}: {label!r} is not a label id of {task} ({', '.join(sorted(known))})"
                )
        gold += g
        pred += p
    return gold, pred


def score_predictions(data_dir: str | Path, predictions_dir: str | Path) -> dict[str, float]:
    """`myna tweeteval score`: the official score (percent) of every task and ALL for a predictions folder."""
    scores = {}
    for task in TASKS:
        gold, pred = gold_and_predictions(data_dir, predictions_dir, task)
        scores[task] = 100 * task_metric(task, gold, pred)
    return with_all(scores)


def write_predictions(out_dir: str | Path, task: str, pred: Sequence[int], data_dir: str | Path) -> None:
    """Predicted label ids in upstream's layout (stance split back into one file per target)."""
    out_dir = Path(out_dir)
    if task != "stance":
        with atomic_write(out_dir / f"{task}.txt", "w") as f:
            f.writelines(f"{p}\n" for p in pred)
        return
    start = 0
    for target, d in _split_dirs(Path(data_dir), task):
        n = len(read_lines(d / "test_labels.txt"))
        with atomic_write(out_dir / "stance" / f"{target}.txt", "w") as f:
            f.writelines(f"{p}\n" for p in pred[start : start + n])
        start += n


def format_table(ours: dict[str, dict[str, float]], approx: set[str] | None = None) -> str:
    """Markdown table: the published rows, then ours (name -> scores).

    The sentiment cells of the rows named in `approx` (default: all of ours) are marked "approx. train": those
    models learned from the rebuilt sentiment train split. Zero-shot rows and others' predictions are not.
    """
    head = "| Model | " + " | ".join(t.capitalize() for t in TASKS) + " | ALL |"
    rule = "|---|" + "---:|" * (len(TASKS) + 1)
    rows = [head, rule]
    for name, scores in PUBLISHED.items():
        rows.append(f"| {name} | " + " | ".join(f"{scores[k]:.1f}" for k in (*TASKS, "ALL")) + " |")
    for name, scores in ours.items():
        marked = approx is None or name in approx
        cells = [
            f"{scores[k]:.1f}" + (f" ({APPROX[k]})" if k in APPROX and marked else "") if k in scores else "-"
            for k in TASKS
        ]  # a run of some tasks (`myna eval --tasks`) leaves the others' cells empty
        all_cell = f"{scores['ALL']:.1f}" if "ALL" in scores else "-"
        rows.append(f"| **{name}** | " + " | ".join(cells) + f" | **{all_cell}** |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------------
# Zero/few-shot: which label word does the language model find most likely after the tweet?

# Per task: the text after the tweet, and one verbalizer per label id (with its leading space). A base model
# trained on raw tweets has seen no instructions, so the prompts are continuations a tweet could plausibly have.
VERBALIZERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "emoji": (
        "",
        (
            "❤",
            "😍",
            "😂",
            "💕",
            "🔥",
            "😊",
            "😎",
            "✨",
            "💙",
            "😘",
            "📷",
            "🇺🇸",
            "☀",
            "💜",
            "😉",
            "💯",
            "😁",
            "🎄",
            "📸",
            "😜",
        ),
    ),
    "emotion": (" I feel so", (" angry", " happy", " hopeful", " sad")),
    "hate": (" This tweet is", (" fine", " hateful")),
    "irony": (" #", ("serious", "sarcasm")),
    "offensive": (" This tweet is", (" polite", " offensive")),
    "sentiment": (" I feel", (" bad", " okay", " good")),
    "stance": (" I am", (" neutral", " against", " for")),
}


@torch.no_grad()
def lm_label_scores(
    model, tok, contexts: Sequence[str], words: Sequence[str], batch_rows: int = 64
) -> torch.Tensor:
    """[N, K]: sum of log p(word_k tokens | bos + context_n) under the language model."""
    device = model.tok_emb.weight.device
    max_len = model.cfg.max_seq_len
    word_ids = [tok.encode(w) for w in words]
    ctx_ids = tok.encode_batch(list(contexts))
    rows = []  # (example, label, ids, first word position)
    for n, c in enumerate(ctx_ids):
        for k, w in enumerate(word_ids):
            keep = max_len - 1 - len(w)
            ids = [tok.bos_id, *c[-keep:], *w]  # a too-long context loses its start, never the tweet's end
            rows.append((n, k, ids, len(ids) - len(w)))
    out = torch.zeros(len(contexts), len(words))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][2]))
    with Progress("lm-score", total=len(rows), unit="rows") as bar:
        for s in range(0, len(order), batch_rows):
            chunk = [rows[i] for i in order[s : s + batch_rows]]
            idx, _ = pad_right([r[2] for r in chunk], tok.pad_id)
            hidden = model.hidden(idx.to(device))
            for j, (n, k, ids, first) in enumerate(chunk):
                # position t predicts token t+1: the word's tokens are predicted from positions first-1 .. end-2
                logp = F.log_softmax(model.lm_head(hidden[j, first - 1 : len(ids) - 1]).float(), -1)
                target = torch.tensor(ids[first:], device=logp.device)
                out[n, k] = logp.gather(1, target[:, None]).sum().cpu()
            bar.advance(len(chunk))
    return out


def _few_shot_prefix(train: Examples, task: str, shots: int, rng: random.Random) -> str:
    """`shots` training examples with their label words, cycling over the labels so every class shows up."""
    suffix, words = VERBALIZERS[task]
    by_label: dict[int, list[str]] = {}
    for text, label in zip(train.texts, train.labels, strict=True):
        by_label.setdefault(label, []).append(text)  # type: ignore[arg-type]
    labels = sorted(by_label)
    picks = [(rng.choice(by_label[labels[i % len(labels)]]), labels[i % len(labels)]) for i in range(shots)]
    rng.shuffle(picks)
    return "".join(f"{text}{suffix}{words[label]}\n" for text, label in picks)


# ---------------------------------------------------------------------------------------------------------------
# Runs on all seven tasks


def _seeds_phrase(seeds: int, seed_choice: str) -> str:
    if seeds == 1:
        return ""
    return f", best of {seeds} seeds on val" if seed_choice == "best" else f", {seeds} seeds"


def run_tweeteval(
    run: str | Path,
    data_dir: str | Path,
    out: str | Path,
    mode: str = "classifier",
    shots: int = 0,
    train_cap: int | None = None,
    test_cap: int | None = None,
    settings: ClassifySettings | None = None,
    tasks: Sequence[str] = TASKS,
    device: str = "cpu",
    seeds: int = 1,
    seed_choice: str = "average",
) -> dict:
    """Score a run (or checkpoint) on TweetEval; returns {"scores": {task: %, "ALL": %}, "notes", "tasks": ...}.

    mode "classifier": a classifier per task (classify.fit with `settings`, fine-tuned or a probe: trained on train
    capped at `train_cap` rows, early-stopped on the task metric on val, scored on test), each fine-tuned from
    the run's model. `seeds` > 1 trains that many from seeds settings.seed, settings.seed + 1, ... and averages
    their calibrated probabilities, or with seed_choice "best" keeps the one whose val metric is highest (random
    restarts, as BERT did on its small tasks). Val and test probabilities go to OUT/probabilities/TASK.npz.
    mode "lm": zero-shot (shots=0) or few-shot label-word scoring by LM likelihood.
    `test_cap` scores the first rows of each test set only (a quick look; not comparable to published rows).
    Predictions go to OUT/predictions in upstream's layout and the result to OUT/result.json.
    """
    if mode not in ("classifier", "lm"):
        raise ValueError(f"mode={mode!r}: expected 'classifier' or 'lm'")
    if seed_choice not in ("average", "best"):
        raise ValueError(f"seed_choice={seed_choice!r}: expected 'average' or 'best'")
    out = Path(out)
    per_task: dict[str, dict] = {}
    scores: dict[str, float] = {}
    s = settings or ClassifySettings()
    for task in tasks:
        start = time.time()
        test = load_split(data_dir, task, "test", test_cap)
        if mode == "classifier":
            pred, detail = _classifier_task(
                run, data_dir, task, test, out, s, train_cap, seeds, seed_choice, device
            )
        else:
            pred, detail = _lm_task(run, data_dir, task, test, shots, device)
        scores[task] = 100 * task_metric(task, test.labels, pred)
        if test_cap is None:
            write_predictions(out / "predictions", task, pred, data_dir)
        per_task[task] = {**detail, "test_rows": len(test.texts), "seconds": round(time.time() - start, 1)}
        log(f"[bold]{task}[/]: {scores[task]:.2f} ({per_task[task]['seconds']:.0f} s)")
    classifier = mode == "classifier"
    result = {
        "scores": with_all(scores) if set(tasks) == set(TASKS) else scores,
        "notes": {t: n for t, n in APPROX.items() if t in scores} if classifier else {},
        "run": str(run),
        "mode": f"classifier ({s.mode}{_seeds_phrase(seeds, seed_choice)})"
        if classifier
        else f"lm, {shots}-shot",
        "train_cap": train_cap,
        "test_cap": test_cap,
        "seeds": seeds if classifier else None,
        "seed_choice": seed_choice if classifier else None,
        "settings": asdict(s) if classifier else None,
        "tasks": per_task,
    }
    with atomic_write(out / "result.json", "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    return result


def _classifier_task(
    run,
    data_dir,
    task: str,
    test: Examples,
    out: Path,
    s: ClassifySettings,
    train_cap,
    seeds: int,
    seed_choice,
    device,
) -> tuple[list, dict]:
    """Test predictions of one task's classifier(s), and what to report of their training; the val and test
    probabilities go to OUT/probabilities/TASK.npz."""
    train = load_split(data_dir, task, "train", train_cap)
    val = load_split(data_dir, task, "val")
    # early stopping on the task's own metric: macro-F1 can rise while irony's F1(ironic) falls
    classes = sorted(int(k) for k in mapping(data_dir, task))  # all, even one the cap left out
    members = [
        fit(
            load_model(run, device),  # fine-tuning changes the model: a fresh copy per classifier
            train,
            val,
            replace(s, seed=s.seed + i),
            metric=lambda g, p: task_metric(task, g, p),
            labels=classes,
        )
        for i in range(seeds)
    ]
    reports = [m.report for m in members]
    chosen = members
    # restarts: the one val scores highest (the first among equals)
    if seeds > 1 and seed_choice == "best":
        best = max(range(seeds), key=lambda i: reports[i]["val_metric"])
        chosen = [members[best]]
    probs = sum(predict_proba(m, test.texts) for m in chosen) / len(chosen)
    val_probs = sum(m.val_probs for m in chosen) / len(chosen)
    detail = {"train_rows": len(train.texts)}
    detail["train_seconds"] = round(sum(r["train_seconds"] for r in reports), 1)
    detail |= {k: chosen[0].report[k] for k in ("val_ece_before", "val_ece_after")}
    if seeds > 1:
        detail["val_metric_members"] = [r["val_metric"] for r in reports]
        if seed_choice == "best":
            detail["chosen_seed"] = s.seed + best
    y_val = [classes.index(y) for y in val.labels]
    detail["val_metric"] = task_metric(task, val.labels, [classes[i] for i in val_probs.argmax(1)])
    # the probabilities stay with the predictions: other decision rules need no retraining
    with atomic_write(out / "probabilities" / f"{task}.npz", "wb") as f:
        np.savez(f, classes=np.array(classes), val=val_probs, val_gold=np.array(y_val), test=probs)
    return [classes[i] for i in probs.argmax(1)], detail


def _lm_task(run, data_dir, task: str, test: Examples, shots: int, device) -> tuple[list, dict]:
    """Test predictions by label-word likelihood, after `shots` examples from train."""
    base = load_model(run, device)
    suffix, words = VERBALIZERS[task]
    prefix = ""
    if shots:
        prefix = _few_shot_prefix(load_split(data_dir, task, "train"), task, shots, random.Random(0))
    contexts = [prefix + t + suffix for t in test.texts]
    return lm_label_scores(base.model, base.tokenizer, contexts, words).argmax(1).tolist(), {"shots": shots}
