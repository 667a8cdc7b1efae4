"""The report card: RUN/report.md has every section, the curves are real PNGs (the SFT run's and its base's), the
eval tables come from eval.json, and a run without eval.json still gets a report that says how to make one."""

import json
import shutil
import struct
from pathlib import Path

import pytest

from myna.eval.report import training_time, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", path
    assert data[-12:-4] == b"\x00\x00\x00\x00IEND"  # complete, not cut short
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_report_of_an_evaluated_sft_run(eval_runs, sft_eval):
    path = write_report(eval_runs["sft"])
    assert path == eval_runs["sft"] / "report.md"
    text = path.read_text()
    for heading in (
        "# Report card",
        "## Config",
        "### Model",
        "## Data funnel",
        "## Training",
        "## Evaluation",
    ):
        assert heading in text
    assert "## Hardware and time" in text and "| torch |" in text
    funnel = json.loads((eval_runs["data"] / "funnel.json").read_text())
    assert f"| input | {funnel['input']:,} |" in text
    # the SFT run's curves and its base's, each linked from the report
    pngs = sorted((eval_runs["sft"] / "report").glob("*.png"))
    assert [p.name for p in pngs] == ["0_sft_curves.png", "1_base_curves.png"]
    for p in pngs:
        w, h = png_size(p)
        assert w >= 600 and h >= 250
        assert f"](report/{p.name})" in text
    assert "| SVM |" in text and "(approx. train)" in text and "### Sample conversations" in text
    assert f"| steps | {sft_eval['step']} |" in text and "held-out dialogues" in text
    assert "training time (from tokens/s)" in text


def test_report_without_eval_json(eval_runs, tmp_path: Path):
    base = tmp_path / "base"
    shutil.copytree(eval_runs["base"], base, ignore=shutil.ignore_patterns("eval.json", "report*"))
    text = write_report(base).read_text()
    assert f"No eval.json yet: run `myna eval {base}`" in text
    assert "## Data funnel" in text and "## Training" in text and "### Held-out posts" not in text
    assert png_size(base / "report" / "0_base_curves.png")[0] >= 600
    # training time is rebuilt from tokens/s: 100 steps of 8 x 128 tokens
    rows = [json.loads(line) for line in (base / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((base / "config.json").read_text())
    expected = sum(8 * 128 / r["tokens_per_s"] for r in rows)
    assert training_time(rows, config) == expected > 0
