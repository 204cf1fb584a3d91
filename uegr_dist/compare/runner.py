"""Run a suite: each run trains in its own process (optionally under `accelerate launch`), then `uegr-eval` scores
it; finished work is skipped, so an interrupted suite continues where it stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from uegr_dist.compare.suite import SPLITS, Run, Suite
from uegr_dist.data.tasks import ROBUSTNESS_SETS, TASKS

RUNNER_FILE = "compare_run.json"
"""Written into a run directory by the runner once training finished: wall time and the command."""


@dataclass
class EvalTarget:
    """One `uegr-eval` call on a trained model: attacks on its validation (or test) data, a split of its task scored
    clean, or a robustness set."""

    name: str
    """Directory under the run's `robustness/`: `validation` / `test` (attacks), `<split>-clean`, or the set name."""
    data_args: list[str]
    attacks: list[str]
    max_examples: int | None = None
    """Rows scored (None: all of them)."""


ALL_ROWS = 1_000_000_000
"""`--max-examples` for a target scored on all its rows."""


@dataclass
class RunOutcome:
    run: Run
    status: str
    """done | skipped (already finished) | failed"""
    message: str = ""
    eval_failures: list[str] = field(default_factory=list)


def eval_targets(run: Run, suite: Suite) -> list[EvalTarget]:
    """What to score a trained model on: the attacks on its validation data (registry tasks: `robustness.split`),
    the `robustness.clean_splits` of its task, and (registry tasks) its robustness sets. A task's `data.task_path`
    and the suite's `robustness.set_paths` are passed on as `--task-path`, so local copies are scored offline."""
    rob, data = suite.robustness, run.config.get("data", {})
    task = data.get("task")
    task_args = ["--task", task, *(["--task-path", data["task_path"]] if data.get("task_path") else [])]
    targets = []
    if rob.attacks:
        if data.get("validation_file"):
            columns = []
            for key, flag in (("text_column", "--text-column"), ("text_pair_column", "--text-pair-column")):
                if data.get(key):
                    columns += [flag, data[key]]
            if data.get("label_column"):
                columns += ["--label-column", data["label_column"]]
            targets.append(
                EvalTarget("validation", ["--file", data["validation_file"], *columns], rob.attacks, rob.max_examples)
            )
        elif task:
            targets.append(EvalTarget(rob.split, [*task_args, "--split", rob.split], rob.attacks, rob.max_examples))
    if task and not data.get("validation_file"):
        for split in rob.clean_splits:
            targets.append(EvalTarget(f"{split}-clean", [*task_args, "--split", split], [], rob.clean_max_examples))
    if rob.sets and task in ROBUSTNESS_SETS:
        for name in ROBUSTNESS_SETS[task]:
            if TASKS[name].train_task in (None, task):
                local = ["--task-path", rob.set_paths[name]] if name in rob.set_paths else []
                targets.append(EvalTarget(name, ["--task", name, *local], [], rob.clean_max_examples))
    return targets


def _train_command(run: Run, suite: Suite, config_path: Path) -> list[str]:
    prefix = suite.launch or [sys.executable]
    return [*prefix, "-m", "uegr_dist.train", "--config", str(config_path)]


def _eval_command(run: Run, suite: Suite, target: EvalTarget, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "uegr_dist.cli.eval", "--model", str(run.directory), *target.data_args]
    rows = target.max_examples or ALL_ROWS
    cmd += ["--output-dir", str(out), "--max-examples", str(rows), "--seed", str(run.seed)]
    cmd += ["--attack", ",".join(target.attacks) or "none"]
    return [*cmd, *suite.robustness.args]


def _run_logged(cmd: list[str], log: Path) -> int:
    """Run `cmd` with stdout and stderr appended to `log`; returns the exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode


def _tail(log: Path, lines: int = 6) -> str:
    text = log.read_text(encoding="utf-8", errors="replace").strip().splitlines() if log.exists() else []
    return " | ".join(text[-lines:])


def train_finished(run: Run) -> bool:
    return (run.directory / "metrics.json").is_file() and (run.directory / RUNNER_FILE).is_file()


def execute(suite: Suite, progress: bool = True, runs: list[Run] | None = None) -> list[RunOutcome]:
    """Train and evaluate every run (of `runs`, default all of the suite's) that is not finished yet; a failed run is
    recorded and the suite goes on."""
    outcomes = []
    bar = tqdm(suite.runs if runs is None else runs, desc=f"suite {suite.name}", unit="run", disable=not progress)
    for run in bar:
        bar.set_postfix_str(run.key)
        log = suite.output_dir / "logs" / f"{run.task}__{run.method}__seed-{run.seed}.log"
        skipped = train_finished(run)
        if not skipped:
            config_path = suite.output_dir / "configs" / f"{run.task}__{run.method}__seed-{run.seed}.yaml"
            config_path.parent.mkdir(parents=True, exist_ok=True)
            config_path.write_text(yaml.safe_dump(run.config, sort_keys=False), encoding="utf-8")
            cmd = _train_command(run, suite, config_path)
            tic = time.perf_counter()
            code = _run_logged(cmd, log)
            wall = time.perf_counter() - tic
            if code != 0 or not (run.directory / "metrics.json").is_file():
                outcomes.append(RunOutcome(run, "failed", f"training exit code {code}: {_tail(log)} (log: {log})"))
                continue
            record = {"wall_seconds": wall, "command": cmd, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (run.directory / RUNNER_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
        failures, evaluated = [], False
        for target in eval_targets(run, suite):
            out = run.directory / "robustness" / target.name
            if (out / "summary.json").is_file():
                continue
            evaluated = True
            code = _run_logged(_eval_command(run, suite, target, out), log)
            if code != 0 or not (out / "summary.json").is_file():
                failures.append(f"{target.name}: exit code {code}: {_tail(log)}")
        status = "failed" if failures else ("skipped" if skipped and not evaluated else "done")
        outcomes.append(RunOutcome(run, status, "; ".join(failures), failures))
    bar.close()
    return outcomes


def robustness_values(summary: dict[str, Any], target: str) -> dict[str, float]:
    """Columns from one `uegr-eval` summary (`target` is the EvalTarget's name). Attack targets (`validation`,
    `test`): accuracy under each text attack (`<attack>_acc`); for a PGD curve, the mean accuracy over its eps > 0
    points (`pgd_<norm>_mean_acc`) and every point (`pgd_<norm>@<eps>`). Clean targets: `<split>_acc`; robustness
    sets: `<set>_acc`."""
    values: dict[str, float] = {}
    if target not in SPLITS:
        clean = summary.get("clean", {})
        if "accuracy" in clean:
            values[f"{target.removesuffix('-clean')}_acc"] = float(clean["accuracy"])
        return values
    for attack, result in summary.get("attacks", {}).items():
        if "attacked_accuracy" in result:
            values[f"{attack}_acc"] = float(result["attacked_accuracy"])
        elif result.get("curve"):
            # One number per curve: the mean accuracy over its eps > 0 points (the largest eps alone is often 0
            # for every method, which ranks nothing).
            points = [float(p["accuracy"]) for p in result["curve"] if p["eps"] > 0]
            if points:
                values[f"{attack}_mean_acc"] = sum(points) / len(points)
            values.update({f"{attack}@{float(p['eps']):g}": float(p["accuracy"]) for p in result["curve"]})
    return values


def collect(suite: Suite) -> list[dict[str, Any]]:
    """One row per finished run: final metrics, the headline metric, cost and robustness columns."""
    rows = []
    for run in suite.runs:
        if not train_finished(run):
            continue
        metrics = json.loads((run.directory / "metrics.json").read_text(encoding="utf-8"))
        runner = json.loads((run.directory / RUNNER_FILE).read_text(encoding="utf-8"))
        row: dict[str, Any] = {"task": run.task, "method": run.method, "seed": run.seed}
        row["main_metric"] = metrics.get("main_metric", "accuracy")
        row.update({k: float(v) for k, v in metrics["final"].items()})
        row["wall_seconds"] = float(runner["wall_seconds"])
        row["train_seconds"] = float(metrics["train"]["seconds"])
        row["samples_per_second"] = float(metrics["train"]["samples_per_second"])
        for target in eval_targets(run, suite):
            summary_path = run.directory / "robustness" / target.name / "summary.json"
            if summary_path.is_file():
                row.update(robustness_values(json.loads(summary_path.read_text(encoding="utf-8")), target.name))
        rows.append(row)
    return rows
