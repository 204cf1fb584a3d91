"""End to end: `uegr-train` on tiny random BERT / RoBERTa / DeBERTa-v2 models learns an easy task and writes a model
that reloads; bad config fails with one message, a non-zero exit and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import tiny_run_overrides
from uegr_dist.config import load_config
from uegr_dist.engine.train_loop import train


@pytest.mark.parametrize("arch", ["bert", "roberta", "deberta-v2"])
def test_uegr_learns_easy_task_and_model_reloads(arch, easy_task, tmp_path):
    out = tmp_path / arch
    cfg = load_config(None, tiny_run_overrides(arch, easy_task, out))
    result = train(cfg)

    losses = [entry["loss"] for entry in result.metrics["train_loss"]]
    assert len(losses) >= 4
    assert losses[-1] < 0.8 * losses[0], losses
    assert result.metrics["final"]["accuracy"] >= 0.75
    assert result.metrics["train"]["samples_per_second"] > 0
    assert 0.0 < result.metrics["train_loss"][-1]["mask_kept_fraction"] <= 0.31

    # The saved model is a plain transformers model: chunk dropout removed, original attention implementation.
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert not any(type(m).__name__ == "ChunkedDropout" for m in model.modules())
    batch = tokenizer(["p1 p2 n3", "n4 n5 n6"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["architecture"] == arch and saved["method"]["name"] == "uegr"
    assert json.loads((out / "metrics.json").read_text())["final"] == result.metrics["final"]


def _cli(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "uegr_dist.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_trains_vanilla_and_refuses_to_overwrite(easy_task, tmp_path):
    cfg_path = tmp_path / "run.yaml"
    out = tmp_path / "run"
    cfg = tiny_run_overrides("bert", easy_task, out)
    cfg["train"]["epochs"] = 1
    cfg_path.write_text(yaml.safe_dump(cfg))
    done = _cli(["--config", str(cfg_path), "--method.name", "vanilla"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "done:" in done.stdout and "accuracy=" in done.stdout
    assert (out / "metrics.json").is_file() and (out / "model.safetensors").is_file()
    before = (out / "metrics.json").read_bytes()

    again = _cli(["--config", str(cfg_path)], tmp_path)
    assert again.returncode == 2
    assert "already holds a run" in again.stderr and "--train.overwrite true" in again.stderr
    assert (out / "metrics.json").read_bytes() == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--method.dropout.k", "0"], "method.dropout.k = 0: must be in [1, 8]"),
        (["--method.mask.sparsity", "0.3"], "unknown key method.mask.sparsity"),
        (["--data.train_file", "missing.csv"], "missing.csv: file not found"),
    ],
)
def test_cli_bad_input_exits_nonzero_and_writes_nothing(override, message, easy_task, tmp_path):
    cfg_path = tmp_path / "run.yaml"
    out = tmp_path / "never"
    cfg_path.write_text(yaml.safe_dump(tiny_run_overrides("bert", easy_task, out)))
    done = _cli(["--config", str(cfg_path), *override], tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stderr.count("error:") == 1 and "Traceback" not in done.stderr
    assert not out.exists()


def test_uegr_demo_runs_both_methods_and_rejects_a_bad_override(tmp_path):
    """The README's main command, `uegr-demo` (shipped MiniLM, shipped corpus), in a few steps: both methods train,
    save a model and print the table; a wrong override fails at start-up (exit 2) with the key named."""
    demo = [sys.executable, "-m", "uegr_dist.demo"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "demo"
    args = ["--train.max_steps", "2", "--train.eval_batch_size", "200", "--train.output_dir", str(out)]
    done = subprocess.run(
        [*demo, *args, "--train.progress", "false"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| method | accuracy | F1 |" in done.stdout
    for method in ("vanilla", "uegr"):
        assert f"| {method} |" in done.stdout
        metrics = json.loads((out / method / "metrics.json").read_text())
        assert metrics["method"] == method and metrics["train"]["steps"] == 2
        assert (out / method / "model.safetensors").is_file()
    bad_out = tmp_path / "bad"
    bad = subprocess.run(
        [*demo, "--train.lr", "fast", "--train.output_dir", str(bad_out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "train.lr" in bad.stderr, bad.stderr[-2000:]
    assert not bad_out.exists()
