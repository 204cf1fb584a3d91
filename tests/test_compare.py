"""`uegr-compare`: a CI-sized suite (tiny random model, few steps) runs end to end, writes per-run results, mean ±
std tables and non-empty plots, skips finished runs when run again, records a failing run and goes on."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import yaml

from tests.conftest import TINY_MODELS
from uegr_dist.cli.compare import main
from uegr_dist.compare import aggregate, load_suite
from uegr_dist.compare.runner import RUNNER_FILE, robustness_values
from uegr_dist.config import ConfigError


def _suite(tmp_path, easy_task, **extra):
    suite = {
        "name": "ci",
        "output_dir": str(tmp_path / "out"),
        "base": {
            "model": {
                "init": "random",
                "architecture": "bert",
                "config": TINY_MODELS["bert"],
                "tokenizer": "word_level",
            },
            "data": {"max_length": 24},
            "train": {"max_steps": 3, "batch_size": 16, "lr": 3e-3, "tracker": "none", "progress": False},
        },
        "methods": {"vanilla": {"method": {"name": "vanilla"}}, "uegr": {"method": {"name": "uegr", "alpha": 0.5}}},
        "tasks": {"easy": {"data": {"train_file": str(easy_task["train"]), "validation_file": "val.jsonl"}}},
        "seeds": [0, 1],
        **extra,
    }
    shutil.copy(easy_task["validation"], tmp_path / "val.jsonl")  # relative paths resolve next to the suite file
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_suite_runs_end_to_end_and_resumes(tmp_path, easy_task):
    path = _suite(tmp_path, easy_task)
    assert main(["--suite", str(path), "--no-progress"]) == 0
    out = tmp_path / "out"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted((r["method"], r["seed"]) for r in rows) == [
        ("uegr", "0"),
        ("uegr", "1"),
        ("vanilla", "0"),
        ("vanilla", "1"),
    ]
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and float(r["wall_seconds"]) > 0 and r["main_metric"] == "accuracy"
    run_cfg = yaml.safe_load((out / "easy" / "uegr" / "seed-1" / "config.yaml").read_text())
    assert run_cfg["train"]["seed"] == 1 and run_cfg["method"]["alpha"] == 0.5
    assert (
        yaml.safe_load((out / "easy" / "vanilla" / "seed-0" / "config.yaml").read_text())["method"]["name"] == "vanilla"
    )

    table = (out / "table.md").read_text()
    accuracies = [float(r["accuracy"]) for r in rows if r["method"] == "uegr"]
    mean = sum(accuracies) / 2
    assert f"| uegr | 2 | {mean:.3f} ± " in table and "| vanilla | 2 |" in table
    for png in ("accuracy_vs_robustness_easy.png", "cost.png"):
        assert (out / png).stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 4 and results["failed"] == []

    # Again: everything is finished, nothing is retrained; a deleted run is the only one trained again.
    stamp = (out / "easy" / "uegr" / "seed-0" / "metrics.json").stat().st_mtime_ns
    shutil.rmtree(out / "easy" / "vanilla" / "seed-1")
    assert main(["--suite", str(path), "--no-progress"]) == 0
    assert (out / "easy" / "uegr" / "seed-0" / "metrics.json").stat().st_mtime_ns == stamp
    assert (out / "easy" / "vanilla" / "seed-1" / "metrics.json").is_file()


def test_failing_run_is_recorded_and_the_suite_goes_on(tmp_path, easy_task):
    path = _suite(tmp_path, easy_task, seeds=[0])
    suite = yaml.safe_load(path.read_text())
    suite["tasks"]["broken"] = {"data": {"train_file": str(tmp_path / "missing.jsonl")}}
    suite["methods"] = {"vanilla": {"method": {"name": "vanilla"}}}
    path.write_text(yaml.safe_dump(suite))
    assert main(["--suite", str(path), "--no-progress"]) == 1
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["task"] for r in results["runs"]] == ["easy"]
    assert len(results["failed"]) == 1 and "broken/vanilla/seed-0" in results["failed"][0]
    assert "missing.jsonl: file not found" in results["failed"][0]
    assert "broken/vanilla/seed-0" in (tmp_path / "out" / "table.md").read_text()


def test_bad_suite_fails_before_any_run_naming_the_run(tmp_path, easy_task):
    path = _suite(tmp_path, easy_task)
    suite = yaml.safe_load(path.read_text())
    suite["methods"]["uegr"]["method"]["dropout"] = {"k": 0}
    path.write_text(yaml.safe_dump(suite))
    with pytest.raises(ConfigError, match=r"run easy/uegr/seed-0: method.dropout.k = 0: must be in \[1, 8\]"):
        load_suite(path)
    assert main(["--suite", str(path)]) == 2 and not (tmp_path / "out").exists()
    path.write_text(yaml.safe_dump({**suite, "sedes": [1]}))
    with pytest.raises(ConfigError, match="unknown key 'sedes'"):
        load_suite(path)


def test_shipped_suites_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs" / "suites"
    small = load_suite(root / "offline-small.yaml")
    assert len(small.runs) == len(small.methods) * len(small.seeds) and small.robustness.attacks
    full = load_suite(root / "uegr13.yaml")
    assert len(full.tasks) == 13 and len(full.runs) == 13 * len(full.methods) * len(full.seeds)


def test_aggregate_is_mean_and_sample_std_and_robustness_columns():
    rows = [
        {"task": "t", "method": "m", "seed": s, "main_metric": "accuracy", "accuracy": a, "char_acc": c}
        for s, a, c in ((0, 0.5, 0.2), (1, 0.7, 0.4), (2, 0.9, 0.3))
    ]
    (entry,) = aggregate(rows)
    assert entry["accuracy"]["mean"] == pytest.approx(0.7) and entry["accuracy"]["std"] == pytest.approx(0.2)
    assert entry["char_acc"] == {"mean": pytest.approx(0.3), "std": pytest.approx(0.1), "n": 3}
    curve = [{"eps": 0.0, "accuracy": 0.9}, {"eps": 0.5, "accuracy": 0.6}, {"eps": 1.0, "accuracy": 0.2}]
    summary = {"clean": {"accuracy": 0.9}, "attacks": {"char": {"attacked_accuracy": 0.4}, "pgd_l2": {"curve": curve}}}
    assert robustness_values(summary, "validation") == {"char_acc": 0.4, "pgd_l2_mean_acc": pytest.approx(0.4)}
    assert robustness_values(summary, "adv_sst2") == {"adv_sst2_acc": 0.9}


@pytest.mark.distributed
def test_suite_launch_prefix_trains_each_run_on_two_processes(tmp_path, easy_task):
    """`launch:` puts every training run under the given launcher: here `accelerate launch` of 2 CPU processes
    (DDP), the same distributed setup for every method of the suite."""
    from tests.test_zero_masking import ACCELERATE, REPO, free_port

    launch = [str(ACCELERATE), "launch", "--config_file", str(REPO / "configs/accelerate/cpu-2proc-ddp.yaml")]
    path = _suite(
        tmp_path,
        easy_task,
        seeds=[0],
        methods={"vanilla": {"method": {"name": "vanilla"}}},
        launch=[*launch, "--main_process_port", str(free_port())],
    )
    assert main(["--suite", str(path), "--no-progress"]) == 0
    out = tmp_path / "out"
    metrics = json.loads((out / "easy" / "vanilla" / "seed-0" / "metrics.json").read_text())
    assert metrics["train"]["num_processes"] == 2
    runner = json.loads((out / "easy" / "vanilla" / "seed-0" / RUNNER_FILE).read_text())
    assert runner["command"][: len(launch)] == launch
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["method"], r["seed"]) for r in rows] == [("vanilla", "0")]
