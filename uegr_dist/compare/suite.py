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

Every run's config is base_config <- base <- tasks[task] <- methods[method] <- {train: {seed, output_dir}}; file paths
in `data` that are relative are resolved against the suite file. Runs use `train.resume: auto`, so a run cut off
in an earlier invocation continues from its last checkpoint. A method entry replaces the whole `method` section
(it starts from the method defaults), so one method's options cannot leak into another's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uegr_dist.config import ConfigError, load_config
from uegr_dist.config.loading import merge, read_yaml

SUITE_KEYS = ("name", "output_dir", "base_config", "base", "methods", "tasks", "seeds", "launch", "robustness")
ROBUSTNESS_KEYS = ("attacks", "max_examples", "args", "sets")
DATA_PATH_KEYS = ("train_file", "validation_file", "task_path")


@dataclass
class Robustness:
    """What `uegr-eval` runs on every trained model."""

    attacks: list[str] = field(default_factory=list)
    max_examples: int = 200
    args: list[str] = field(default_factory=list)
    sets: bool = True
    """For registry tasks, also score the task's robustness / out-of-distribution sets (AdvGLUE, HANS, PAWS)."""


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
