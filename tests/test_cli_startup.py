"""`uegr-train` answers `--help`, `--list-tasks` and bad input without importing the training stack (torch,
transformers, datasets, DeepSpeed): those take seconds to import, the answers come at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "datasets", "deepspeed", "accelerate")

PROBE = """
import contextlib, io, json, sys
from uegr_dist.cli.train import main
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        code = main(sys.argv[1:])
    except SystemExit as exit:
        code = exit.code
loaded = [name for name in {heavy!r} if name in sys.modules]
print(json.dumps({{"code": code, "out": out.getvalue(), "err": err.getvalue(), "loaded": loaded}}))
"""


def run_cli(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_without_the_training_stack():
    result = run_cli("--help")
    assert result["code"] == 0 and "usage: uegr-train" in result["out"]
    assert result["loaded"] == []


def test_list_tasks_without_the_training_stack():
    result = run_cli("--list-tasks")
    assert result["code"] == 0 and "sst2" in result["out"] and "AdvGLUE" in result["out"]
    assert result["loaded"] == []


def test_a_config_error_without_the_training_stack():
    result = run_cli("--config", "configs/uegr-base.yaml", "--method.dropout.k", "0")
    assert result["code"] == 2 and "method.dropout.k = 0: must be in [1, 8]" in result["err"]
    assert result["loaded"] == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "file not found"),
        ("review,label\nfine,1\n", "missing column 'text' (columns: review, label)"),
        (b"text,label\ncaf\xe9,1\n", "not UTF-8 text (line 2"),
    ],
)
def test_a_data_error_without_the_training_stack(tmp_path, content, message):
    path = tmp_path / "train.csv"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif content is not None:
        path.write_bytes(content)
    result = run_cli(
        "--config", "configs/uegr-base.yaml", "--train-file", str(path), "--train.output_dir", str(tmp_path)
    )
    assert result["code"] == 2 and message in result["err"], result["err"]
    assert result["loaded"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == (["train.csv"] if content is not None else [])


def test_an_unknown_task_without_the_training_stack():
    result = run_cli("--config", "configs/uegr-base.yaml", "--task", "sst3")
    assert result["code"] == 2 and "data.task = 'sst3': not a registered task" in result["err"]
    assert result["loaded"] == []
