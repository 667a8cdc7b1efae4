"""The command line derived from the declarations: help from the comments beside fields and parameters, defaults
from the declarations alone, `myna --help` without torch, and a run started from a YAML file writing back a file
that starts the same run."""

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
import yaml
from helpers import ENV

from myna.cli import main, parse_args
from myna.eval.settings import ClassifySettings, EvalConfig
from myna.flags import comments, given, read_config, resolve


@dataclass
class Example:
    plain: int = 1  # beside it
    # above it,
    # on two lines
    above: str = "x"
    wrapped: int | None = None  # inside the parentheses
    silent: bool = False


def documented(
    first: str,  # the first
    second: int = 2,  # the second
) -> None:
    pass


def test_help_comes_from_the_comments_beside_or_above_a_declaration():
    assert comments(Example) == {
        "plain": "beside it",
        "above": "above it, on two lines",
        "wrapped": "inside the parentheses",
    }
    assert comments(documented) == {"first": "the first", "second": "the second"}


def test_a_flag_left_out_keeps_the_declared_default():
    args = parse_args(["eval", "RUN"])
    assert given(args, EvalConfig) == {} and given(args, ClassifySettings) == {}
    args = parse_args(["eval", "RUN", "--tweeteval-mode", "lm", "--mode", "probe", "--tasks", "irony,emoji"])
    assert given(args, EvalConfig) == {"tweeteval_mode": "lm", "tasks": ("irony", "emoji")}
    assert given(args, ClassifySettings) == {"mode": "probe"}


def test_help_does_not_import_torch():
    for verb in ([], ["eval"], ["serve"], ["classify"]):
        code = f"import sys\nfrom myna.cli import main\ntry: main({[*verb, '--help']})\nexcept SystemExit: pass\n"
        done = subprocess.run(
            [sys.executable, "-c", code + "print('torch' in sys.modules)"],
            capture_output=True,
            text=True,
            env=ENV,
        )
        assert done.stdout.splitlines()[-1] == "False", verb


@pytest.mark.slow
def test_a_run_from_a_yaml_file_writes_back_one_that_reproduces_it(sample_data, tmp_path):
    (tmp_path / "run.yaml").write_text(
        yaml.safe_dump({"data": str(sample_data), "preset": "tiny", "steps": 2})
    )
    main(["pretrain", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "a")])
    written = read_config(tmp_path / "a" / "run.yaml")
    assert (
        written["data_dir"] == str(sample_data)
        and written["steps"] == 2
        and written["out"] == str(tmp_path / "a")
    )
    main(["pretrain", "--config", str(tmp_path / "a" / "run.yaml"), "--out", str(tmp_path / "b")])
    assert read_config(tmp_path / "b" / "run.yaml") == {**written, "out": str(tmp_path / "b")}
    a, b = (json.loads((tmp_path / run / "config.json").read_text()) for run in "ab")
    assert (a["model"], a["train"]) == (b["model"], b["train"])


def test_a_config_file_names_only_known_settings(tmp_path):
    (tmp_path / "run.yaml").write_text("stepz: 3\n")
    args = parse_args(["sft", "--config", str(tmp_path / "run.yaml")])
    with pytest.raises(ValueError, match=r"unknown setting\(s\) stepz"):
        resolve(args, args.train, args.names)


def test_an_oversized_config_file_is_refused_before_it_is_read(tmp_path):
    with open(tmp_path / "run.yaml", "wb") as f:
        f.truncate(1 << 30)  # sparse: a gigabyte on paper, nothing on disk
    with pytest.raises(ValueError, match=r"run\.yaml: 1,073,741,824 bytes, over the"):
        read_config(tmp_path / "run.yaml")
