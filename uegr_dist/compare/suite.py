"""A comparison suite: methods x tasks x seeds, the config every run shares, and the robustness evaluation.

A suite is a YAML file (see configs/suites/):

    name: offline-small
    output_dir: outputs/compare/offline-small   # relative to the working directory
    base_config: ../../uegr_dist/demo/demo.yaml  # optional, relative to this file; `base:` overrides it
    base: {train: {max_steps: 30}}
    methods: {vanilla: {method: {name: vanilla}}, uegr: {method: {name: uegr}}}
    tasks: {sentiment: {data: {train_file: ..., validation_file: ...}}, sst2: {data: {task: sst2}}}
    seeds: [0, 1, 2]
    launch: [accelerate, launch, --config_file, configs/accelerate/multi-gpu-zero2.yaml]   # optional
    robustness: {attacks: [char, pgd], max_examples: 200, args: [], sets: true}
    # optional: attack the labelled test split instead of validation, also score every test row clean, and take
    # the robustness sets from local copies (paths relative to this file), e.g.
    #   robustness: {attacks: [char, pgd], split: test, clean_splits: [test],
    #                set_paths: {adv_sst2: ../../data/advglue/dev.json}}

Every run's config is base_config <- base <- tasks[task] <- methods[method] <- {train: {seed, output_dir}}; file paths
in `data` (and in `robustness.set_paths`) that are relative are resolved against the suite file. A task's
`data.task_path` is also where `uegr-eval` reads the task's own splits, so a suite on local copies scores offline.
Runs use `train.resume: auto`, so a run cut off in an earlier invocation continues from its last checkpoint. A method
entry replaces the whole `method` section (it starts from the method defaults), so one method's options cannot leak
into another's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uegr_dist.config import ConfigError, load_config
from uegr_dist.config.loading import merge, read_yaml
from uegr_dist.config.model_path import resolve_model_path
from uegr_dist.data.errors import DataError
from uegr_dist.data.preflight import check_data_inputs
from uegr_dist.data.tasks import TASKS

SUITE_KEYS = ("name", "output_dir", "base_config", "base", "methods", "tasks", "seeds", "launch", "robustness")
ROBUSTNESS_KEYS = (
    "attacks",
    "max_examples",
    "args",
    "sets",
    "split",
    "clean_splits",
    "clean_max_examples",
    "set_paths",
)
SPLITS = ("validation", "test", "mismatched")
DATA_PATH_KEYS = ("train_file", "validation_file", "task_path")


@dataclass
class Robustness:
    """What `uegr-eval` runs on every trained model."""

    attacks: list[str] = field(default_factory=list)
    max_examples: int = 200
    args: list[str] = field(default_factory=list)
    sets: bool = True
    """For registry tasks, also score the task's robustness / out-of-distribution sets (AdvGLUE, HANS, PAWS)."""
    split: str = "validation"
    """Registry tasks: the split the attacks run on (`test` needs labelled test data, e.g. GLUE's
    test_labeled.tsv in the task_path folder). Tasks given as files attack their validation file."""
    clean_splits: list[str] = field(default_factory=list)
    """Registry tasks: splits scored without attack (column `<split>_acc`), e.g. [test]."""
    clean_max_examples: int | None = None
    """Rows scored of each clean split and robustness set (None: all of them; `max_examples` bounds the attacks)."""
    set_paths: dict[str, str] = field(default_factory=dict)
    """Local copies of robustness sets (`uegr-eval --task-path`), e.g. {adv_sst2: advglue/dev.json}; a set without
    one is read from the Hub."""


@dataclass
class Run:
    """One training run of the suite."""

    task: str
    method: str
    seed: int
    config: dict[str, Any]
    directory: Path

    @property
    def key(self) -> str:
        return f"{self.task}/{self.method}/seed-{self.seed}"


@dataclass
class Suite:
    name: str
    path: Path
    output_dir: Path
    methods: list[str]
    tasks: list[str]
    seeds: list[int]
    runs: list[Run]
    launch: list[str]
    robustness: Robustness


def _mapping(value: Any, key: str, where: Path) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"suite {where}: {key} must be a mapping, got {type(value).__name__}")
    return value


def _resolve_data_paths(config: dict[str, Any], base: Path) -> dict[str, Any]:
    data = dict(config.get("data") or {})
    for key in DATA_PATH_KEYS:
        value = data.get(key)
        if isinstance(value, str) and not Path(value).is_absolute():
            data[key] = str((base / value).resolve())
    return {**config, "data": data} if data else config


def _check_robustness(rob: Robustness, path: Path) -> None:
    """The split options name known splits, the counts are positive, set_paths maps set names to paths."""
    if not isinstance(rob.clean_splits, list):
        raise ConfigError(f"suite {path}: robustness.clean_splits must be a list, got {rob.clean_splits!r}")
    for key, split in [("split", rob.split)] + [("clean_splits", s) for s in rob.clean_splits]:
        if split not in SPLITS:
            raise ConfigError(
                f"suite {path}: robustness.{key}: {split!r} is not a split (allowed: {', '.join(SPLITS)})"
            )
    for key in ("max_examples", "clean_max_examples"):
        value = getattr(rob, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"suite {path}: robustness.{key} = {value!r}: must be an integer >= 1")
    paths = rob.set_paths
    if not isinstance(paths, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in paths.items()):
        raise ConfigError(f"suite {path}: robustness.set_paths must map set names to paths, got {paths!r}")
    unknown = [name for name in paths if name not in TASKS]
    if unknown:
        raise ConfigError(f"suite {path}: robustness.set_paths: {unknown[0]!r} is not a registered task")


def load_suite(path: str | Path, output_dir: str | Path | None = None) -> Suite:
    """Read and check a suite file: every run's config is built and validated now, so a bad method or task option
    fails before the first run starts."""
    path = Path(path)
    raw = read_yaml(path)
    unknown = [k for k in raw if k not in SUITE_KEYS]
    if unknown:
        raise ConfigError(f"suite {path}: unknown key {unknown[0]!r} (allowed: {', '.join(SUITE_KEYS)})")
    here = path.parent
    base: dict[str, Any] = {}
    if raw.get("base_config"):
        base_path = here / raw["base_config"]
        base = _resolve_data_paths(read_yaml(base_path), base_path.parent)
    base = merge(base, _resolve_data_paths(_mapping(raw.get("base"), "base", path), here))
    methods = _mapping(raw.get("methods"), "methods", path)
    tasks = _mapping(raw.get("tasks"), "tasks", path)
    seeds = raw.get("seeds", [0])
    if not methods or not tasks:
        raise ConfigError(f"suite {path}: needs at least one entry under methods and under tasks")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"suite {path}: seeds must be a non-empty list of integers, got {seeds!r}")
    launch = raw.get("launch") or []
    if not isinstance(launch, list) or not all(isinstance(a, str) for a in launch):
        raise ConfigError(f"suite {path}: launch must be a list of strings (a command prefix), got {launch!r}")
    rob = _mapping(raw.get("robustness"), "robustness", path)
    bad = [k for k in rob if k not in ROBUSTNESS_KEYS]
    if bad:
        raise ConfigError(f"suite {path}: unknown key robustness.{bad[0]} (allowed: {', '.join(ROBUSTNESS_KEYS)})")
    robustness = Robustness(**rob)
    if not isinstance(robustness.attacks, list) or not isinstance(robustness.args, list):
        raise ConfigError(f"suite {path}: robustness.attacks and robustness.args must be lists")
    _check_robustness(robustness, path)
    robustness.set_paths = {
        name: value if Path(value).is_absolute() else str((here / value).resolve())
        for name, value in robustness.set_paths.items()
    }
    name = str(raw.get("name") or path.stem)
    out = Path(output_dir or raw.get("output_dir") or f"outputs/compare/{name}")

    runs = []
    for task, task_cfg in tasks.items():
        task_cfg = _resolve_data_paths(_mapping(task_cfg, f"tasks.{task}", path), here)
        for method, method_cfg in methods.items():
            method_cfg = _mapping(method_cfg, f"methods.{method}", path)
            for seed in seeds:
                directory = out / task / method / f"seed-{seed}"
                config = merge(merge(base, task_cfg), {k: v for k, v in method_cfg.items() if k != "method"})
                config["method"] = dict(method_cfg.get("method", base.get("method", {})))
                # resume auto: a run interrupted in an earlier invocation continues from its last checkpoint.
                config = merge(config, {"train": {"seed": seed, "output_dir": str(directory), "resume": "auto"}})
                try:
                    load_config(None, config)
                except ConfigError as err:
                    raise ConfigError(f"suite {path}: run {task}/{method}/seed-{seed}: {err}") from None
                runs.append(Run(task, method, seed, config, directory))
    return Suite(name, path, out, list(methods), list(tasks), list(seeds), runs, launch, robustness)


def preflight(suite: Suite, runs: list[Run]) -> list[str]:
    """What would make runs fail the same way, found before the first starts (seconds, not one failed training per
    run): a `package:` model whose package is not installed, what `uegr-train` checks of the data before it trains
    (`check_data_inputs`: files, columns, task names, task_path), or a robustness set path that does not exist. Each
    problem once, naming the runs it affects; every distinct model name and data section is checked once."""
    problems: dict[str, list[str]] = {}
    found: dict[str, str | None] = {}  # check and its input -> its error (None: passed)
    for run in runs:
        name, data = (run.config.get("model") or {}).get("name_or_path"), run.config.get("data") or {}
        checks = ([(resolve_model_path, name)] if isinstance(name, str) else []) + [(_check_data, data)]
        for test, value in checks:
            memo = f"{test.__name__}:{json.dumps(value, sort_keys=True, default=str)}"
            if memo not in found:
                found[memo] = _error_of(test, value)
            if found[memo] is not None:
                problems.setdefault(found[memo], []).append(run.key)
    if runs:
        for set_name, value in suite.robustness.set_paths.items():
            if not Path(value).exists():
                problems[f"robustness.set_paths.{set_name} = {value}: does not exist"] = [r.key for r in runs]
    every = len(runs)
    return [f"{issue} ({'every run' if len(keys) == every else ', '.join(keys)})" for issue, keys in problems.items()]


def _check_data(data: dict[str, Any]) -> None:
    check_data_inputs(load_config(None, {"data": data}).data)


def _error_of(test: Callable[[Any], object], value: Any) -> str | None:
    try:
        test(value)
    except (ConfigError, DataError) as err:
        return str(err)
    return None
