"""Build a validated `Config` from YAML files and `--section.key value` command-line overrides."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from uegr_dist.config.schema import Config

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or out of range; the message names key, value and what's allowed."""


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp` (ints are accepted for floats); return the typed value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r}: expected a list of {_describe(item_tp)}")
        return [_coerce(f"{key}[{i}]", item, item_tp) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r}: expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-5" (no dot) as a string.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: expected a string")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def _check_constraints(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        allowed = ", ".join(str(c) for c in choices)
        raise ConfigError(f"{key} = {value!r}: must be one of {allowed}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is None and hi is None:
        return
    too_low = lo is not None and (value <= lo if meta.get("lo_open") else value < lo)
    too_high = hi is not None and (value >= hi if meta.get("hi_open") else value > hi)
    if too_low or too_high:
        left = "-inf" if lo is None else f"{'(' if meta.get('lo_open') else '['}{lo}"
        right = "inf" if hi is None else f"{hi}{')' if meta.get('hi_open') else ']'}"
        raise ConfigError(f"{key} = {value!r}: must be in {left}, {right}")


def build_dataclass(cls: type[T], data: typing.Mapping[str, Any] | None, prefix: str = "") -> T:
    """Instantiate dataclass `cls` from a nested mapping, validating keys, types and bounds."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s} ({where} allows: {', '.join(fields)})")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(
                    f"{key} = {value!r}: expected a mapping with keys "
                    + ", ".join(f.name for f in dataclasses.fields(tp))
                )
            kwargs[name] = build_dataclass(tp, value, prefix=f"{key}.")
            continue
        typed = _coerce(key, value, tp)
        _check_constraints(key, typed, fields[name].metadata)
        kwargs[name] = typed
    return cls(**kwargs)


def _check_cross_fields(cfg: Config) -> None:
    drop = cfg.method.dropout
    if drop.p_min > drop.p_max:
        raise ConfigError(
            f"method.dropout.p_min = {drop.p_min} > method.dropout.p_max = {drop.p_max}: need p_min <= p_max"
        )
    if cfg.model.init == "random" and not cfg.model.architecture:
        raise ConfigError(
            "model.architecture = None: model.init = random needs a transformers model_type "
            "(bert, roberta, deberta-v2, ...)"
        )
    data = cfg.data
    if data.task is not None and (data.train_file or data.validation_file):
        raise ConfigError(
            f"data.task = {data.task!r} and data.train_file/validation_file are both set: use one source of data"
        )
    if data.task_path is not None and data.task is None:
        raise ConfigError(f"data.task_path = {data.task_path!r} needs data.task (which registered task it holds)")
    if data.task is not None:
        from uegr_dist.data.tasks import TASKS  # light: the registry is plain data

        if data.task not in TASKS:
            raise ConfigError(f"data.task = {data.task!r}: not a registered task (known: {', '.join(TASKS)})")
    if data.label_names is not None and (data.regression or len(set(data.label_names)) != len(data.label_names)):
        raise ConfigError(f"data.label_names = {data.label_names}: needs distinct names and data.regression false")
    if data.label_names is not None and data.num_labels is not None and data.num_labels != len(data.label_names):
        raise ConfigError(f"data.num_labels = {data.num_labels} differs from the {len(data.label_names)} label_names")
    _check_method_fields(cfg)
    _check_average(cfg)
    if cfg.data.validation_file is None and cfg.data.train_file is not None and cfg.data.validation_ratio >= 1:
        raise ConfigError(f"data.validation_ratio = {cfg.data.validation_ratio}: must be < 1")


# Methods whose step is defined on one whole batch (a weight perturbation, MAT's SGLD): no gradient accumulation.
ONE_UPDATE_PER_BATCH = ("sam", "mat", "delta_sam", "fisher_sam", "awp")


def _check_average(cfg: Config) -> None:
    """train.average's values that depend on each other or on train.lr (the run's length is checked at set-up)."""
    average = cfg.train.average
    if average.kind == "none":
        return
    if average.start >= 1 and not float(average.start).is_integer():
        raise ConfigError(
            f"train.average.start = {average.start}: below 1 a fraction of the run's steps, from 1 on a step number "
            "(a whole number)"
        )
    if average.kind == "swa" and average.lr_schedule == "cyclic":
        top = cfg.train.lr if average.swa_lr is None else average.swa_lr
        if average.swa_lr_min is not None and average.swa_lr_min > top:
            raise ConfigError(
                f"train.average.swa_lr_min = {average.swa_lr_min} > the cycle's top learning rate {top} "
                "(train.average.swa_lr, or train.lr when it is null)"
            )
        if average.every < 2:
            raise ConfigError("train.average.every = 1: a cyclic learning rate needs cycles of at least 2 steps")


def _check_method_fields(cfg: Config) -> None:
    """Options of the gradient-transform methods that depend on other sections."""
    method = cfg.method
    for key, pattern in (("childtuning.include", method.childtuning.include), ("roast.include", method.roast.include)):
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"method.{key} = {pattern!r}: not a valid regular expression ({err})") from err
    if method.name in ONE_UPDATE_PER_BATCH:
        if cfg.train.grad_accum != 1:
            raise ConfigError(
                f"train.grad_accum = {cfg.train.grad_accum}: method {method.name} updates the parameters once per "
                "batch, so it needs grad_accum 1 (raise train.batch_size instead)"
            )
        if method.name == "mat" and cfg.train.mixed_precision == "fp16":
            raise ConfigError(
                "train.mixed_precision = fp16: method mat takes its SGLD gradients without loss scaling, where fp16 "
                "underflows; use bf16 or no"
            )
        if method.name == "sam" and method.sam.m_shards > cfg.train.batch_size:
            raise ConfigError(
                f"method.sam.m_shards = {method.sam.m_shards}: must be <= train.batch_size = {cfg.train.batch_size}"
            )


def parse_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """Turn `--a.b value` / `--a.b=value` pairs into a nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    i = 0
    args = list(argv)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"override {arg!r}: expected --section.key value (e.g. --method.dropout.k 3)")
        if "=" in arg:
            dotted, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg}: missing value")
            dotted, raw = arg[2:], args[i + 1]
            i += 2
        dotted = dotted.replace("-", "_")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{dotted}: {part} is set both as a value and as a section")
        node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], update: typing.Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge `update` into a copy of `base` (mappings merge, everything else replaces)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] | typing.Mapping[str, Any] = ()) -> Config:
    """Load a YAML config (optional), apply overrides, validate everything; raise ConfigError on any problem."""
    raw = read_yaml(path) if path is not None else {}
    update = overrides if isinstance(overrides, typing.Mapping) else parse_overrides(overrides)
    cfg = build_dataclass(Config, merge(raw, update))
    _check_cross_fields(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (what `uegr-train` writes next to the model)."""
    return dataclasses.asdict(cfg)
