"""`myna report RUN`: RUN/report.md, the report card of a run, rebuilt from what the run folder holds.

Sections: the run (stage, step, parameters), its config, the data funnel (the data directory's funnel.json),
training curves for the run and every run it was tuned from (PNGs in RUN/report/), the evaluation from
RUN/eval.json when there is one (bits per byte, TweetEval beside the published rows, chat checks, sample replies),
and the hardware and time spent. Runs do not record wall-clock time: training time is rebuilt from each logged
record's tokens/s (steps x tokens per step / tokens/s), which leaves out evaluations and checkpoint writes.
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from myna.eval.run import data_sources, format_eval, hardware, lineage, stage_of  # noqa: E402
from myna.io import atomic_path, atomic_write  # noqa: E402
from myna.runs import read_metrics  # noqa: E402

# (title, train key, val key) of each panel; a panel is drawn when the metrics have either key
PANELS = (
    ("loss (nats/token)", "loss", "val_loss"),
    ("val bits per byte", None, "val_bpb"),
    ("tokens/s", "tokens_per_s", None),
    ("learning rate", "lr", None),
    ("reward margin", "reward_margin", "val_reward_margin"),
    ("pair accuracy", "pair_accuracy", "val_pair_accuracy"),
)


def plot_curves(rows: list[dict], title: str, path: Path) -> bool:
    """One PNG with a panel per metric the rows hold; False (nothing written) when there are no rows."""
    panels = [p for p in PANELS if any(p[1] in r or p[2] in r for r in rows)]
    if not panels:
        return False
    cols = 2
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(10, 3.2 * nrows), squeeze=False)
    for ax, (name, train_key, val_key) in zip(axes.flat, panels, strict=False):
        for key, style in ((train_key, {"lw": 1, "alpha": 0.8}), (val_key, {"marker": "o", "ms": 4})):
            points = [(r["step"], r[key]) for r in rows if key and r.get(key) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label="val" if key == val_key else "train", **style)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if train_key and val_key:
            ax.legend()
        if train_key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return True


def training_time(rows: list[dict], config: dict) -> float | None:
    """Seconds of training steps, rebuilt from tokens/s: each record covers the steps since the previous one."""
    train = config.get("train", {})
    if not rows or not {"batch_size", "seq_len"} <= train.keys():
        return None
    tokens_per_step = train["batch_size"] * train["seq_len"] * train.get("grad_accum", 1)
    tokens_per_step *= config.get("world_size", 1)
    total, prev = 0.0, 0
    for r in rows:
        if r.get("tokens_per_s"):
            total += (r["step"] - prev) * tokens_per_step / r["tokens_per_s"]
        prev = r["step"]
    return total


def _table(pairs: list[tuple[str, object]], head: tuple[str, str] = ("setting", "value")) -> list[str]:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---:|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in pairs]
    return lines


def _cell(v: object) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, list | tuple):
        return ", ".join(map(str, v))
    return str(v).replace("|", "\\|")


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _funnel(chain: list[tuple[Path, dict]]) -> list[str]:
    try:
        data_dir, _ = data_sources(chain)
    except (FileNotFoundError, ValueError) as e:
        return [f"Not available: {e}."]
    path = data_dir / "funnel.json"
    if not path.is_file():
        return [f"Not available: {path} is missing."]
    funnel = json.loads(path.read_text(encoding="utf-8"))
    lines = [f"From `{path}`: posts in, what each filter dropped, and what was kept.", ""]
    lines += _table(_flatten(funnel), ("count", "posts"))
    return lines


def _training(run_dir: Path, chain: list[tuple[Path, dict]], out_dir: Path) -> tuple[list[str], float]:
    """The training section (one block per stage, newest first) and the summed training seconds."""
    lines, total = [], 0.0
    for i, (rdir, config) in enumerate(chain):
        stage = stage_of(config)
        rows = read_metrics(rdir)
        name = "this run" if i == 0 else f"its {stage} run"
        lines += [f"### {stage} ({name}: `{rdir}`)", ""]
        if not rows:
            lines += ["No metrics.jsonl.", ""]
            continue
        png = out_dir / f"{i}_{stage}_curves.png"
        plot_curves(rows, f"{stage} run: {rdir}", png)
        last = rows[-1]
        evals = [r for r in rows if "val_loss" in r]
        secs = training_time(rows, config)
        total += secs or 0.0
        facts: list[tuple[str, object]] = [("steps", last["step"]), ("final train loss", last.get("loss"))]
        if evals:
            facts += [(k, v) for k, v in evals[-1].items() if k.startswith("val_")]
        rates = sorted(r["tokens_per_s"] for r in rows if r.get("tokens_per_s"))
        if rates:
            facts.append(("median tokens/s", rates[len(rates) // 2]))
        if secs is not None:
            facts.append(("training time (from tokens/s)", _minutes(secs)))
        if "data_stats" in config:
            facts += [(f"data: {k}", v) for k, v in config["data_stats"].items()]
        lines += _table(facts, ("", "")) + [
            "",
            f"![{stage} curves]({png.relative_to(run_dir).as_posix()})",
            "",
        ]
    return lines, total


def write_report(run: str | Path) -> Path:
    """Build RUN/report.md (and the PNGs in RUN/report/) from the run folder; returns the report's path."""
    chain = lineage(run)
    run_dir, config = chain[0]
    out_dir = run_dir / "report"
    out_dir.mkdir(exist_ok=True)
    stage = stage_of(config)
    eval_path = run_dir / "eval.json"
    ev = json.loads(eval_path.read_text(encoding="utf-8")) if eval_path.is_file() else None

    lines = [f"# Report card: `{run_dir.name}` ({stage})", ""]
    lines += [f"Run folder `{run_dir}`" + (f", tuned from `{chain[1][0]}`" if len(chain) > 1 else "") + "."]
    if ev is not None:
        lines += [
            f"Evaluated at step {ev['step']:,} ({ev['params'] / 1e6:.2f}M parameters) on {ev['created']}."
        ]
    lines += ["", "## Config", "", "### Model", ""]
    lines += _table(list(config.get("model", {}).items()))
    lines += ["", "### Training", ""]
    lines += _table(list(config.get("train", {}).items()))
    extra = [
        (k, config[k])
        for k in ("preset", "stage", "base", "data", "parallel", "world_size", "beta")
        if k in config
    ]
    lines += ["", "### Run", ""] + _table(extra)

    lines += ["", "## Data funnel", ""] + _funnel(chain)

    training, train_s = _training(run_dir, chain, out_dir)
    lines += ["", "## Training", ""] + training

    lines += ["## Evaluation", ""]
    if ev is None:
        lines += [f"No eval.json yet: run `myna eval {run_dir}`, then `myna report {run_dir}`.", ""]
    else:
        lines += [format_eval(ev)]

    hw = hardware()
    lines += ["## Hardware and time", ""]
    facts: list[tuple[str, object]] = [
        ("CPU", hw["cpu"]),
        ("cores", hw["cores"]),
        ("GPU", ", ".join(hw["gpus"]) or "none"),
        ("torch", hw["torch"]),
        ("training time, all stages (from tokens/s)", _minutes(train_s)),
    ]
    if ev is not None:
        facts += [(f"eval: {k}", _minutes(v)) for k, v in ev["seconds"].items()]
        facts.append(
            ("eval ran on", f"{ev['hardware']['cpu']}, GPU: {', '.join(ev['hardware']['gpus']) or 'none'}")
        )
    lines += _table(facts, ("", ""))
    lines += [
        "",
        "The hardware is this machine's, where the report was written; runs do not record wall-clock time, so "
        "training time is rebuilt from each logged step's tokens/s and leaves out evaluations and checkpoints.",
        "",
    ]
    path = run_dir / "report.md"
    with atomic_write(path, "w") as f:
        f.write("\n".join(lines))
    return path
