"""Every run writes a model card (README.md) that `huggingface_hub.ModelCard` loads: base model, method and every
hyper-parameter, data, clean metrics, and robustness numbers once `uegr-eval` scored the model; a push to the Hub
that fails (offline here) says so and loses nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from tests.conftest import tiny_run_overrides
from uegr_dist.config import load_config
from uegr_dist.engine.model_card import ROBUSTNESS_RESULTS, record_robustness
from uegr_dist.engine.train_loop import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, easy_task) -> Path:
    out = tmp_path_factory.mktemp("card") / "run"
    cfg = tiny_run_overrides("bert", easy_task, out, train__max_steps=3, method__mask__ratio=0.25)
    train(load_config(None, cfg))
    return out


def results(card: ModelCard) -> dict[str, float]:
    return {(r.metric_name or r.metric_type): r.metric_value for r in card.data.eval_results or []}


def test_a_run_writes_a_card_the_hub_client_loads(trained):
    card = ModelCard.load(trained / "README.md")
    metrics = json.loads((trained / "metrics.json").read_text())["final"]
    got = results(card)
    assert got["Accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert got["F1"] == pytest.approx(metrics["f1"], abs=1e-6)
    assert card.data.library_name == "transformers" and "uegr" in card.data.tags
    text = card.text
    # every hyper-parameter of the method section and the training settings, and where the data came from
    config = yaml.safe_load((trained / "config.yaml").read_text())
    assert "| `method.mask.ratio` | `0.25` |" in text and f"| `train.lr` | `{config['train']['lr']}` |" in text
    for key in config["method"]["adversary"]:
        assert f"`method.adversary.{key}`" in text
    assert "`train.output_dir`" not in text  # where the run was written is not a property of the model
    assert str(config["data"]["train_file"]) in text
    assert "Robustness" not in text  # nothing scored yet


def test_uegr_eval_results_join_the_card(trained):
    summary = {
        "model": str(trained),
        "data": "dev.jsonl",
        "n_examples": 40,
        "clean": {"accuracy": 0.9},
        "attacks": {
            "char": {"clean_accuracy": 0.9, "attacked_accuracy": 0.35, "attack_success_rate": 0.61},
            "pgd_l2": {"curve": [{"eps": 0.0, "accuracy": 0.9}, {"eps": 0.1, "accuracy": 0.6}], "steps": 5},
        },
    }
    record_robustness(trained, summary)
    card = ModelCard.load(trained / "README.md")
    assert results(card)["Accuracy under char attack"] == pytest.approx(0.35)
    assert "| `dev.jsonl` | char | 40 | 0.9000 | 0.3500 | 0.6100 |" in card.text
    assert "| 0.1 | 0.6000 |" in card.text
    # scoring the same data with the same attack again replaces the entry instead of adding a second one
    summary["attacks"]["char"]["attacked_accuracy"] = 0.4
    record_robustness(trained, summary)
    entries = json.loads((trained / ROBUSTNESS_RESULTS).read_text())
    assert [e["attack"] for e in entries] == ["char", "pgd_l2"]
    assert results(ModelCard.load(trained / "README.md"))["Accuracy under char attack"] == pytest.approx(0.4)


@pytest.mark.slow
def test_a_failed_push_says_so_and_loses_nothing(easy_task, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_run_overrides("bert", easy_task, out, train__max_steps=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "uegr_dist.train", "--config", str(path), "--train.push_to_hub", "someone/tiny"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 4, done.stderr[-2000:]
    assert "train.push_to_hub = 'someone/tiny': the upload failed" in done.stderr
    assert f"saved in {out}" in done.stderr and "hf upload someone/tiny" in done.stderr
    for name in ("model.safetensors", "README.md", "metrics.json", "config.json"):
        assert (out / name).is_file(), name
    assert not math.isnan(json.loads((out / "metrics.json").read_text())["final"]["accuracy"])
