"""Text classifiers on a pre-trained Myna model: a pooled linear head on the GPT body.

Two modes:
- finetune: body and head trained together with AdamW, the body at a lower learning rate than the fresh head, with
  an auxiliary next-token loss on the same texts (lm_weight) that keeps the body a language model of them;
- probe: the body stays frozen, its pooled features are computed once and a logistic-regression head is trained
  on them (fast; tells how much the pre-trained features alone carry).
Pooling is the mean of the final-normed hidden states over the real (non-pad) tokens, or the last token's state.
Training stops early on the validation metric (macro-F1 unless the caller gives another); the best epoch's weights
are kept. A temperature fitted on val (Guo et al. 2017) makes the softmax probabilities calibrated; the expected
calibration error before and after is reported. The label is the most probable class.

A trained classifier is a folder: classifier.json (labels, settings, metrics, base checkpoint, model shape),
head.safetensors, body.safetensors (finetune only; a probe reads its frozen body from the base checkpoint) and the
tokenizer.json it was trained with.
"""

import json
import math
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from myna.eval.settings import ClassifySettings
from myna.io import atomic_dir, atomic_write, open_binary, read_json, remove_stale_temps
from myna.model import GPT, lm_loss, mean_pool, pad_right
from myna.progress import Progress, log
from myna.runs import Loaded, build_model, load_model, model_config
from myna.tokenizer import Tokenizer
from myna.train.checkpoint import read_tensors, specs

Label = str | int
_INT = re.compile(r"-?\d+")


# ---------------------------------------------------------------------------------------------------------------
# Reading labelled text


@dataclass
class Examples:
    texts: list[str]
    labels: list[Label | None]  # None for unlabelled rows (prediction input)
    source: str = "<memory>"
    lines: list[int] = field(default_factory=list)  # 1-based line of each row in `source`


def _file_format(path: Path, first_line: str) -> str:
    name = path.name.removesuffix(".gz").removesuffix(".zst")
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".tsv"):
        return "tsv"
    return "jsonl" if first_line.lstrip().startswith("{") else "tsv"


def read_examples(path: str | Path, require_labels: bool = True) -> Examples:
    """Rows of a JSONL file ({"text": str, "label": str|int}) or a TSV file (text<TAB>label); gzip/zstd ok.

    TSV labels that spell an integer become ints. With require_labels=False (prediction input) the label is
    optional: a JSONL row may omit it and a TSV line without a tab is all text. A bad row raises ValueError
    naming the file and line.
    """
    path = Path(path)
    with open_binary(path) as f:
        raw = f.read()
    texts: list[str] = []
    labels: list[Label | None] = []
    lines: list[int] = []
    fmt = None
    rows = raw.split(b"\n")
    for lineno, line_bytes in enumerate(rows, 1):
        where = f"{path}:{lineno}"
        try:
            line = line_bytes.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if not line.strip():
            if lineno == len(rows):
                break  # the empty tail after the final newline
            raise ValueError(f"{where}: empty line; expected a row")
        fmt = fmt or _file_format(path, line)
        text, label = _parse_jsonl(line, where, require_labels) if fmt == "jsonl" else _parse_tsv(line)
        if not text.strip():
            raise ValueError(f"{where}: empty text")
        if require_labels and label is None:
            raise ValueError(
                f"{where}: no label; expected text<TAB>label" if fmt == "tsv" else f"{where}: no label"
            )
        texts.append(text)
        labels.append(label)
        lines.append(lineno)
    if not texts:
        raise ValueError(f"{path}: no rows")
    return Examples(texts, labels, str(path), lines)


def _parse_jsonl(line: str, where: str, require_labels: bool) -> tuple[str, Label | None]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with 'text' and 'label', got {type(row).__name__}")
    text = row.get("text")
    if not isinstance(text, str):
        raise ValueError(f"{where}: field 'text' must be a string, got {type(text).__name__}")
    label = row.get("label")
    if label is None and not require_labels:
        return text, None
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise ValueError(f"{where}: field 'label' must be a string or an integer, got {json.dumps(label)}")
    if isinstance(label, str) and not label.strip():
        raise ValueError(f"{where}: field 'label' is empty")
    return text, label


def _parse_tsv(line: str) -> tuple[str, Label | None]:
    if "\t" not in line:
        return line, None
    text, label = line.rsplit("\t", 1)
    label = label.strip()
    if not label:
        return text, None
    return text, int(label) if _INT.fullmatch(label) else label


def label_vocab(examples: Examples) -> list[Label]:
    """The classes of a training set: ints in increasing order, strings in order of first appearance."""
    kinds = {type(x) for x in examples.labels}
    if kinds == {int}:
        return sorted(set(examples.labels))  # type: ignore[type-var]
    if kinds == {str}:
        return list(dict.fromkeys(examples.labels))  # type: ignore[arg-type]
    raise ValueError(f"{examples.source}: labels mix strings and integers; use one kind")


def label_ids(examples: Examples, labels: Sequence[Label]) -> list[int]:
    """Class index of every row; a label the classifier does not know is an error naming its line."""
    index = {x: i for i, x in enumerate(labels)}
    out = []
    for k, x in enumerate(examples.labels):
        if x not in index:
            line = examples.lines[k] if examples.lines else k + 1
            raise ValueError(
                f"{examples.source}:{line}: label {x!r} is not one of the training labels {list(labels)}"
            )
        out.append(index[x])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Metrics and calibration


def class_scores(gold: Sequence, pred: Sequence) -> dict:
    """Per-class precision, recall, F1 and support over the union of gold and predicted labels.

    Undefined ratios (a class never predicted, or never present) count as 0, as scikit-learn's
    classification_report does by default; macro averages run over the same union.
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    hits = Counter(g for g, p in zip(gold, pred, strict=True) if g == p)
    n_golds, n_preds = Counter(gold), Counter(pred)
    out = {}
    for c in sorted(n_golds.keys() | n_preds.keys(), key=str):
        tp, n_pred, n_gold = hits[c], n_preds[c], n_golds[c]
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_gold if n_gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[c] = {"precision": precision, "recall": recall, "f1": f1, "support": n_gold}
    return out


def macro_f1(gold: Sequence, pred: Sequence) -> float:
    scores = class_scores(gold, pred)
    return sum(s["f1"] for s in scores.values()) / len(scores)


def ece(probs: np.ndarray, gold: Sequence[int], bins: int = 15) -> float:
    """Expected calibration error: |accuracy - confidence| per confidence bin, weighted by the bin's share."""
    conf = probs.max(1)
    correct = probs.argmax(1) == np.asarray(gold)
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(total)


def fit_temperature(logits: torch.Tensor, gold: Sequence[int]) -> float:
    """The T > 0 that minimises the NLL of softmax(logits / T) on held-out data (optimised in log T)."""
    logits, target = logits.detach().float().cpu(), torch.tensor(list(gold))
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return t if math.isfinite(t) else 1.0


# ---------------------------------------------------------------------------------------------------------------
# The model


def pool(hidden: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, C] -> [B, C]: mean over each row's first `lengths` positions, or the state at the last of them."""
    if how == "last":
        return hidden[torch.arange(hidden.size(0), device=hidden.device), lengths - 1]
    return mean_pool(hidden, lengths)


class Classifier(nn.Module):
    def __init__(self, body: GPT, n_classes: int, pooling: str):
        super().__init__()
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling={pooling!r}: expected 'mean' or 'last'")
        self.body = body
        self.pooling = pooling
        self.head = nn.Linear(body.cfg.n_embd, n_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def features(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return pool(self.body.hidden(idx), lengths, self.pooling)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(idx, lengths))

    def forward_with_lm(self, idx: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits and the model's own next-token loss on the same texts (one pass through the body)."""
        # position t predicts token t+1; a row's last real token and its padding predict nothing (-1)
        targets = torch.full_like(idx, -1)
        targets[:, :-1] = idx[:, 1:]
        targets[torch.arange(idx.size(1), device=idx.device)[None, :] >= lengths[:, None] - 1] = -1
        hidden = self.body.hidden(idx)
        return self.head(pool(hidden, lengths, self.pooling)), lm_loss(self.body.lm_head(hidden), targets)


def encode(tok: Tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Each text as a document (Tokenizer.document), cut to max_len tokens; encoded in one batch."""
    return [[tok.bos_id, *ids[: max_len - 1]] for ids in tok.encode_batch(texts)]


def length_batches(
    seqs: Sequence[Sequence[int]], batch_tokens: int, shuffle: random.Random | None
) -> list[list[int]]:
    """Indices grouped so each batch holds texts of similar length (little padding) and <= batch_tokens slots."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    batches, cur, longest = [], [], 0
    for i in order:
        n = max(longest, len(seqs[i]))
        if cur and n * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, n = [], len(seqs[i])
        cur.append(i)
        longest = n
    if cur:
        batches.append(cur)
    if shuffle is not None:
        shuffle.shuffle(batches)
    return batches


def collate(
    seqs: Sequence[Sequence[int]], idx: Sequence[int], pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, lengths = pad_right([seqs[i] for i in idx], pad_id)
    return batch.to(device), lengths.to(device)


# ---------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class Trained:
    model: Classifier
    tokenizer: Tokenizer
    labels: list[Label]
    settings: ClassifySettings
    temperature: float
    base: str  # the checkpoint the body came from
    report: dict
    # fit's calibrated val probabilities (rows in val order), for ensembles; None once loaded
    val_probs: np.ndarray | None = None


@torch.no_grad()
def _logits(
    model: Classifier, seqs: list[list[int]], pad_id: int, batch_tokens: int, name: str = ""
) -> torch.Tensor:
    """Logits [N, K] in input order."""
    model.eval()
    device = model.head.weight.device
    out = torch.empty(len(seqs), model.head.out_features)
    batches = length_batches(seqs, batch_tokens, None)
    with Progress(name or "predict", total=len(seqs), unit="texts") as bar:
        for b in batches:
            idx, lengths = collate(seqs, b, pad_id, device)
            out[b] = model(idx, lengths).float().cpu()
            bar.advance(len(b))
    return out


@torch.no_grad()
def _features(
    model: Classifier, seqs: list[list[int]], pad_id: int, batch_tokens: int, name: str
) -> torch.Tensor:
    model.eval()
    device = model.head.weight.device
    out = torch.empty(len(seqs), model.body.cfg.n_embd)
    with Progress(name, total=len(seqs), unit="texts") as bar:
        for b in length_batches(seqs, batch_tokens, None):
            idx, lengths = collate(seqs, b, pad_id, device)
            out[b] = model.features(idx, lengths).float().cpu()
            bar.advance(len(b))
    return out


def _class_weights(y: list[int], k: int) -> torch.Tensor:
    counts = torch.bincount(torch.tensor(y), minlength=k).float().clamp(min=1)
    return len(y) / (k * counts)


def fit(
    base: Loaded,
    train: Examples,
    val: Examples,
    settings: ClassifySettings | None = None,
    metric: Callable[[list[Label], list[Label]], float] = macro_f1,
    labels: Sequence[Label] | None = None,
) -> Trained:
    """Train a classifier on `train`, choose its checkpoint and temperature on `val`.

    `metric(gold, pred)` (on label values, higher is better) picks the checkpoint and drives early stopping.
    `labels`: the task's classes when known (a capped train set may lack a rare one that val has); by default
    those of `train`.
    base.model becomes the classifier's body (fine-tuning changes it in place): load a fresh one per classifier.
    """
    s = settings or ClassifySettings()
    if s.mode not in ("finetune", "probe"):
        raise ValueError(f"mode={s.mode!r}: expected 'finetune' or 'probe'")
    labels = list(labels) if labels is not None else label_vocab(train)
    if len(labels) < 2:
        raise ValueError(f"{train.source}: only one label ({labels[0]!r}); a classifier needs two or more")
    y_train, y_val = label_ids(train, labels), label_ids(val, labels)
    max_len = min(s.max_len, base.config.max_seq_len)
    tok, pad = base.tokenizer, base.tokenizer.pad_id
    x_train, x_val = encode(tok, train.texts, max_len), encode(tok, val.texts, max_len)

    torch.manual_seed(s.seed)
    device = base.model.tok_emb.weight.device
    model = Classifier(base.model, len(labels), s.pooling).to(device)
    weights = _class_weights(y_train, len(labels)).to(device) if s.class_weight else None

    def on_labels(gold: list[int], pred: list[int]) -> float:  # the metric sees label values, not indices
        return metric([labels[i] for i in gold], [labels[i] for i in pred])

    start = time.time()
    if s.mode == "probe":
        for p in model.body.parameters():
            p.requires_grad_(False)
        history, f_val = _train_probe(model, x_train, y_train, x_val, y_val, pad, s, weights, on_labels)
        with torch.no_grad():
            val_logits = model.head(f_val).cpu()  # the frozen features are already computed
    else:
        history = _train_finetune(model, x_train, y_train, x_val, y_val, pad, s, weights, on_labels)
        val_logits = _logits(model, x_val, pad, s.batch_tokens, "val")
    train_s = time.time() - start

    temperature = fit_temperature(val_logits, y_val)
    val_probs = (val_logits / temperature).softmax(-1).numpy()
    before = ece(val_logits.softmax(-1).numpy(), y_val)
    after = ece(val_probs, y_val)
    best = max(history, key=lambda h: h["val_metric"])
    report = {
        "val_metric": best["val_metric"],
        "best_check": best["check"],
        "history": history,
        "temperature": temperature,
        "val_ece_before": before,
        "val_ece_after": after,
        "train_rows": len(y_train),
        "val_rows": len(y_val),
        "train_seconds": round(train_s, 1),
    }
    log(
        f"classifier ({s.mode}, {s.pooling} pooling): val metric {best['val_metric']:.4f} at check "
        f"{best['check']}; T={temperature:.3f}, val ECE {before:.4f} -> {after:.4f}; {train_s:.0f} s"
    )
    base_ckpt = str(Path(base.checkpoint).resolve())
    return Trained(model.eval(), tok, labels, s, temperature, base_ckpt, report, val_probs)


def _train_finetune(
    model, x_train, y_train, x_val, y_val, pad, s: ClassifySettings, weights, metric
) -> list[dict]:
    """Fine-tune body and head; returns the checks' history. Not train/loop.py's loop: that one streams tokens for a
    fixed number of steps with checkpoints, this one runs epochs over a small labelled set, stops early on a
    metric and keeps the best weights in memory."""
    device = model.head.weight.device
    body_params = [p for p in model.body.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": body_params, "lr": s.lr_body},
            {"params": model.head.parameters(), "lr": s.lr_head},
        ],
        weight_decay=s.weight_decay,
    )
    rng = random.Random(s.seed)
    y = torch.tensor(y_train)
    history: list[dict] = []
    best_metric, best_state, stale = -1.0, None, 0
    n_batches = len(length_batches(x_train, s.batch_tokens, None))
    total_steps = s.epochs * n_batches
    check_every = max(1, n_batches // s.evals_per_epoch)
    step = 0
    with Progress("finetune", total=total_steps, unit="batches") as bar:
        for _epoch in range(s.epochs):
            for b in length_batches(x_train, s.batch_tokens, rng):
                model.train()
                # linear decay to 10% over the planned run: steadier late checks
                frac = 1.0 - 0.9 * step / total_steps
                for group, lr in zip(opt.param_groups, (s.lr_body, s.lr_head), strict=True):
                    group["lr"] = lr * frac
                idx, lengths = collate(x_train, b, pad, device)
                if s.lm_weight:
                    logits, aux = model.forward_with_lm(idx, lengths)
                    loss = F.cross_entropy(logits, y[b].to(device), weight=weights) + s.lm_weight * aux
                else:
                    loss = F.cross_entropy(model(idx, lengths), y[b].to(device), weight=weights)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step += 1
                bar.advance(1, note=f"loss {loss.item():.3f}")
                if step % check_every and step != total_steps:
                    continue
                pred = _logits(model, x_val, pad, s.batch_tokens, "val").argmax(-1).tolist()
                score = metric(y_val, pred)
                history.append({"check": len(history) + 1, "step": step, "val_metric": score})
                bar.advance(0, note=f"val {score:.3f}")
                if score > best_metric:
                    best_metric, stale = score, 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    stale += 1
                if stale >= s.patience:
                    break
            if stale >= s.patience:
                break
    model.load_state_dict(best_state)
    return history


def _train_probe(
    model, x_train, y_train, x_val, y_val, pad, s: ClassifySettings, weights, metric
) -> tuple[list[dict], torch.Tensor]:
    """The head's training history and the validation features."""
    f_train = _features(model, x_train, pad, s.batch_tokens, "features").to(model.head.weight.device)
    f_val = _features(model, x_val, pad, s.batch_tokens, "features").to(model.head.weight.device)
    y = torch.tensor(y_train, device=f_train.device)
    opt = torch.optim.Adam(model.head.parameters(), lr=s.probe_lr)
    history: list[dict] = []
    best_metric, best_state, stale = -1.0, None, 0
    checks = 30
    every = max(1, s.probe_epochs // checks)
    for epoch in range(1, s.probe_epochs + 1):
        logits = model.head(f_train)
        loss = F.cross_entropy(logits, y, weight=weights)
        loss = loss + s.weight_decay * model.head.weight.pow(2).sum() / 2  # L2, as logistic regression's C
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if epoch % every and epoch != s.probe_epochs:
            continue
        with torch.no_grad():
            score = metric(y_val, model.head(f_val).argmax(-1).tolist())
        history.append({"check": len(history) + 1, "step": epoch, "val_metric": score})
        if score > best_metric:
            best_metric, stale = score, 0
            best_state = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
        else:
            stale += 1
        if stale >= s.patience * 5:  # checks are cheap and the probe's curve is noisy early on
            break
    model.head.load_state_dict(best_state)
    return history, f_val


# ---------------------------------------------------------------------------------------------------------------
# Saving, loading, predicting


def save(trained: Trained, out: str | Path) -> None:
    """Write the classifier folder atomically (a crash leaves the old folder or none)."""
    m = trained.model
    config = {
        "mode": trained.settings.mode,
        "labels": trained.labels,
        "temperature": trained.temperature,
        "base": trained.base,
        "settings": asdict(trained.settings),
        "model": asdict(m.body.cfg),
        "report": trained.report,
    }
    remove_stale_temps(out)  # what a killed save of this folder left beside it
    with atomic_dir(out) as tmp:
        head = {k: v.detach().contiguous().cpu() for k, v in m.head.state_dict().items()}
        save_file(head, str(tmp / "head.safetensors"))
        if trained.settings.mode == "finetune":
            # lm_head is unused (and tied to tok_emb: safetensors refuses shared storage)
            body = {
                k: v.detach().contiguous().cpu()
                for k, v in m.body.state_dict().items()
                if not k.startswith("lm_head.")
            }
            save_file(body, str(tmp / "body.safetensors"))
        (tmp / "classifier.json").write_text(
            json.dumps(config, indent=1, ensure_ascii=False), encoding="utf-8"
        )
        trained.tokenizer.save(tmp / "tokenizer.json")


def _read_config(model_dir: Path) -> dict:
    cfg_path = model_dir / "classifier.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{model_dir}: not a classifier folder (no classifier.json)")
    config = read_json(cfg_path)
    missing = [k for k in ("labels", "temperature", "base", "settings", "report") if k not in config]
    if missing:
        raise ValueError(f"{cfg_path}: missing {missing}")
    labels, temperature = config["labels"], config["temperature"]
    if not isinstance(labels, list) or len(labels) < 2 or len(set(map(str, labels))) != len(labels):
        raise ValueError(f"{cfg_path}: 'labels' must be a list of at least two distinct labels")
    if not isinstance(temperature, int | float) or not 0 < temperature < math.inf:
        raise ValueError(f"{cfg_path}: 'temperature' must be a positive number, got {temperature!r}")
    settings = dict(config["settings"]) if isinstance(config["settings"], dict) else {}
    if settings.pop("decision", "argmax") != "argmax":  # a setting that lost every measurement, then removed
        raise ValueError(
            f"{cfg_path}: trained with decision 'tuned', which Myna no longer applies; retrain it"
        )
    try:
        config["settings"] = ClassifySettings(**settings)
    except TypeError as e:
        raise ValueError(f"{cfg_path}: 'settings': {e}") from None
    return config


def load(model_dir: str | Path, device: str | torch.device = "cpu") -> Trained:
    """A classifier folder written by `save`, ready to predict; every file is checked before it is used."""
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    settings = config["settings"]
    if settings.mode == "probe":
        base = load_model(config["base"], device)
        body, tok = base.model, base.tokenizer
    else:
        where = f"{model_dir}/classifier.json"
        body = build_model(model_config(config.get("model"), f"{where}: 'model'"), device, where)
        _read_body(model_dir, body)
        tok = Tokenizer.from_file(model_dir / "tokenizer.json")
    model = Classifier(body, len(config["labels"]), settings.pooling).to(device)
    model.head.load_state_dict(read_tensors(model_dir / "head.safetensors", specs(model.head.state_dict())))
    return Trained(
        model.eval(),
        tok,
        config["labels"],
        settings,
        config["temperature"],
        config["base"],
        config["report"],
    )


def _read_body(model_dir: Path, body: GPT) -> None:
    # lm_head is not stored: tied to tok_emb, or unused by a classifier
    expected = {k: v for k, v in body.state_dict().items() if not k.startswith("lm_head.")}
    body.load_state_dict(read_tensors(model_dir / "body.safetensors", specs(expected)), strict=False)


def predict_proba(trained: Trained, texts: Sequence[str]) -> np.ndarray:
    """Calibrated class probabilities [N, K] (columns in trained.labels order)."""
    seqs = encode(trained.tokenizer, texts, min(trained.settings.max_len, trained.model.body.cfg.max_seq_len))
    logits = _logits(trained.model, seqs, trained.tokenizer.pad_id, trained.settings.batch_tokens)
    return (logits / trained.temperature).softmax(-1).numpy()


def train_classifier(
    ckpt: str | Path,
    train: str | Path,
    val: str | Path,
    out: str | Path,
    settings: ClassifySettings | None = None,
    device: str = "cpu",
) -> dict:
    """`myna classify train`: files in, classifier folder out; returns the training report."""
    train_ex, val_ex = read_examples(train), read_examples(val)
    trained = fit(load_model(ckpt, device), train_ex, val_ex, settings)
    save(trained, out)
    return trained.report


def predict_file(
    model_dir: str | Path, input: str | Path, out: str | Path | None = None, device: str = "cpu"
) -> int:
    """`myna classify predict`: one JSON line per input row ({"label", "probabilities": {label: p}}, plus the
    gold "gold" when the input has labels), to `out` (atomically) or stdout; returns the row count."""
    trained = load(model_dir, device)
    ex = read_examples(input, require_labels=False)
    probs = predict_proba(trained, ex.texts)
    names = [str(x) for x in trained.labels]
    rows = []
    for p, k, gold in zip(probs, probs.argmax(1), ex.labels, strict=True):
        row = {
            "label": trained.labels[int(k)],
            "probabilities": dict(zip(names, map(float, p), strict=True)),
        }
        if gold is not None:
            row["gold"] = gold
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    if out is None:
        sys.stdout.writelines(rows)
    else:
        with atomic_write(out, "w") as f:
            f.writelines(rows)
    return len(rows)
