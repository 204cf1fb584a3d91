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
from uegr_dist.compare.runner import RUNNER_FILE, eval_targets, robustness_values
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
    # Passes the checks made before any run (file, columns): the loader finds the empty text of row 1 at run time.
    (tmp_path / "broken.jsonl").write_text('{"text": "a b c", "label": 0}\n{"text": null, "label": 1}\n')
    suite["tasks"]["broken"] = {"data": {"train_file": str(tmp_path / "broken.jsonl")}}
    suite["methods"] = {"vanilla": {"method": {"name": "vanilla"}}}
    path.write_text(yaml.safe_dump(suite))
    assert main(["--suite", str(path), "--no-progress"]) == 1
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["task"] for r in results["runs"]] == ["easy"]
    assert len(results["failed"]) == 1 and "broken/vanilla/seed-0" in results["failed"][0]
    assert "row 1: empty text in column 'text'" in results["failed"][0]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "broken/vanilla/seed-0" in table
    # One seed: the mean alone, no "± 0.000" claiming a spread that was not measured.
    accuracy = results["runs"][0]["accuracy"]
    row = next(line for line in table.splitlines() if line.startswith("| vanilla | 1 |"))
    assert f"| {accuracy:.3f} |" in row and "±" not in row


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


def test_missing_model_package_or_data_fails_once_before_any_run(tmp_path, easy_task, capsys):
    """What would fail every run the same way is found up front: one error per cause, naming the option and the
    runs, exit 2, nothing trained (not one failed training per run)."""
    path = _suite(tmp_path, easy_task)
    suite = yaml.safe_load(path.read_text())
    suite["base"]["model"] = {"name_or_path": "package:uegr_no_such_package/model"}
    suite["tasks"]["gone"] = {"data": {"train_file": "missing.jsonl", "validation_file": "val.jsonl"}}
    path.write_text(yaml.safe_dump(suite))
    assert main(["--suite", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert "python package 'uegr_no_such_package' is not installed" in err[0] and "(every run)" in err[0]
    assert f"{tmp_path / 'missing.jsonl'}: file not found" in err[1]
    named = err[1].rsplit("(", 1)[1].rstrip(")").split(", ")
    assert sorted(named) == [f"gone/{m}/seed-{s}" for m in ("uegr", "vanilla") for s in (0, 1)]
    assert not any((tmp_path / "out").rglob("config.yaml"))
    # --dry-run and --report-only do not need the model or the data.
    assert main(["--suite", str(path), "--dry-run"]) == 0


def test_shard_and_methods_select_runs(tmp_path, easy_task, capsys):
    path = _suite(tmp_path, easy_task)  # 2 methods x 2 seeds: vanilla/0, vanilla/1, uegr/0, uegr/1
    assert main(["--suite", str(path), "--dry-run", "--shard", "2/2"]) == 0
    out = capsys.readouterr().out
    assert "shard 2/2: 2 of the 4 runs" in out
    assert "easy/vanilla/seed-1" in out and "easy/uegr/seed-1" in out and "seed-0" not in out
    for bad in ("3/2", "0/2", "a/b"):
        with pytest.raises(SystemExit):
            main(["--suite", str(path), "--dry-run", "--shard", bad])
    assert main(["--suite", str(path), "--dry-run", "--methods", "uegr", "--shard", "1/2"]) == 0
    out = capsys.readouterr().out
    assert (
        "shard 1/2: 1 of the 2 runs" in out and "easy/uegr/seed-0" in out and "vanilla" not in out.split("runs ->")[1]
    )
    assert main(["--suite", str(path), "--dry-run", "--methods", "uegr,sam"]) == 2
    assert "'sam' is not a method of the suite" in capsys.readouterr().err


def test_shipped_suites_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs" / "suites"
    small = load_suite(root / "offline-small.yaml")
    assert len(small.runs) == len(small.methods) * len(small.seeds) and small.robustness.attacks
    full = load_suite(root / "uegr13.yaml")
    assert len(full.tasks) == 13 and len(full.runs) == 13 * len(full.methods) * len(full.seeds)
    # The SST-2 / AdvGLUE study (CPU and GPU) reads the public data from data/ under the repository (where
    # docs/results.md says to put it; resolved, as the suite resolves it, in case data/ is a symlink) and scores the
    # labelled test split: every uegr-eval call gets a --task-path.
    shared = (root.parents[1] / "data").resolve()
    for name in ("sst2-advglue-cpu.yaml", "sst2-advglue-gpu.yaml"):
        study = load_suite(root / name)
        assert study.seeds == [0, 1, 2] and {"vanilla", "uegr", "rdrop", "freelb", "smart", "sam"} <= set(study.methods)
        targets = {t.name: t for t in eval_targets(study.runs[0], study)}
        assert sorted(targets) == ["adv_sst2", "test", "test-clean"]
        assert targets["test"].max_examples == 300 and targets["test"].attacks == ["char", "pgd"]
        assert str(shared / "sst2") in targets["test-clean"].data_args
        assert targets["adv_sst2"].data_args[-1] == str(shared / "advglue" / "dev.json")
    assert load_suite(root / "sst2-search-cpu.yaml").robustness.sets is False
    # The study's uegr-relative runs are the shipped preset (the suite repeats its method section inline).
    from uegr_dist.config import load_config

    study = load_suite(root / "sst2-advglue-cpu.yaml")
    run = next(r for r in study.runs if r.method == "uegr-relative")
    preset = load_config(root.parent / "methods" / "uegr-relative.yaml")
    assert load_config(None, run.config).method == preset.method


def _sst2_copies(tmp_path, easy_task):
    """The easy cue-word task as a GLUE SST-2 folder (train.tsv, dev.tsv, labelled test_labeled.tsv) and an AdvGLUE
    dev.json with an sst2 key: the layouts of the real local copies (tests/test_layouts.py checks the readers)."""
    rows = [json.loads(line) for line in easy_task["train"].read_text().splitlines()]
    rows += [json.loads(line) for line in easy_task["validation"].read_text().splitlines()]
    lines = [f"{r['text']}\t{int(r['label'] == 'pos')}" for r in rows]
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    for name, part in (("train.tsv", lines[:200]), ("dev.tsv", lines[200:240]), ("test_labeled.tsv", lines[240:])):
        (folder / name).write_text("sentence\tlabel\n" + "\n".join(part) + "\n", encoding="utf-8")
    items = [{"idx": i, "sentence": r["text"], "label": int(r["label"] == "pos")} for i, r in enumerate(rows[-12:])]
    (tmp_path / "advglue").mkdir()
    (tmp_path / "advglue" / "dev.json").write_text(json.dumps({"sst2": items}), encoding="utf-8")
    return folder


@pytest.mark.slow
def test_suite_on_local_task_copies_scores_test_split_and_advglue_offline(tmp_path, easy_task, monkeypatch):
    """A task given by task_path: uegr-eval reads its splits and the robustness set from the local copies (the Hub
    is off), attacks the first max_examples rows of the labelled test split, scores every test row clean and every
    AdvGLUE row, and the PGD curve's points become columns."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _sst2_copies(tmp_path, easy_task)
    robustness = {
        "attacks": ["char", "pgd"],
        "split": "test",
        "max_examples": 8,
        "clean_splits": ["test"],
        "set_paths": {"adv_sst2": "advglue/dev.json"},  # relative to the suite file
        "args": ["--pgd.norms", "[l2]", "--pgd.steps", "2", "--pgd.eps_l2", "[0.0, 0.5]"],
    }
    path = _suite(
        tmp_path,
        easy_task,
        seeds=[0],
        methods={"vanilla": {"method": {"name": "vanilla"}}},
        tasks={"sst2": {"data": {"task": "sst2", "task_path": "glue/SST-2", "max_train_samples": 64}}},
        robustness=robustness,
    )
    suite = load_suite(path)
    targets = {t.name: t for t in eval_targets(suite.runs[0], suite)}
    local = str((tmp_path / "glue" / "SST-2").resolve())
    assert targets["test"].data_args == ["--task", "sst2", "--task-path", local, "--split", "test"]
    assert targets["test"].max_examples == 8 and targets["test"].attacks == ["char", "pgd"]
    assert targets["test-clean"].data_args == ["--task", "sst2", "--task-path", local, "--split", "test"]
    assert targets["test-clean"].max_examples is None and targets["test-clean"].attacks == []
    adv = str((tmp_path / "advglue" / "dev.json").resolve())
    assert targets["adv_sst2"].data_args == ["--task", "adv_sst2", "--task-path", adv]

    assert main(["--suite", str(path), "--no-progress"]) == 0
    run = tmp_path / "out" / "sst2" / "vanilla" / "seed-0"
    assert json.loads((run / "robustness" / "test" / "summary.json").read_text())["n_examples"] == 8
    assert json.loads((run / "robustness" / "test-clean" / "summary.json").read_text())["n_examples"] == 80
    assert json.loads((run / "robustness" / "adv_sst2" / "summary.json").read_text())["n_examples"] == 12
    (row,) = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert {"test_acc", "adv_sst2_acc", "char_acc", "pgd_l2_mean_acc", "pgd_l2@0", "pgd_l2@0.5"} <= set(row)
    assert row["pgd_l2_mean_acc"] == row["pgd_l2@0.5"]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| method | n | accuracy | test_acc | adv_sst2_acc | char_acc | pgd_l2_mean_acc |" in table
    assert "@" not in table
    for png in ("accuracy_vs_robustness_sst2.png", "pgd_sst2.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000


@pytest.mark.parametrize(
    ("robustness", "message"),
    [
        ({"split": "train"}, r"robustness.split: 'train' is not a split"),
        ({"clean_splits": ["dev"]}, r"robustness.clean_splits: 'dev' is not a split"),
        ({"clean_splits": "test"}, r"robustness.clean_splits must be a list"),
        ({"clean_max_examples": 0}, r"robustness.clean_max_examples = 0: must be an integer >= 1"),
        ({"set_paths": {"advglue": "dev.json"}}, r"robustness.set_paths: 'advglue' is not a registered task"),
    ],
)
def test_bad_robustness_options_are_refused(tmp_path, easy_task, robustness, message):
    with pytest.raises(ConfigError, match=message):
        load_suite(_suite(tmp_path, easy_task, robustness=robustness))


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
    curve_points = {"pgd_l2@0": 0.9, "pgd_l2@0.5": 0.6, "pgd_l2@1": 0.2}
    expected = {"char_acc": 0.4, "pgd_l2_mean_acc": pytest.approx(0.4), **curve_points}
    assert robustness_values(summary, "validation") == expected == robustness_values(summary, "test")
    assert robustness_values(summary, "adv_sst2") == {"adv_sst2_acc": 0.9}
    assert robustness_values(summary, "test-clean") == {"test_acc": 0.9}


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
