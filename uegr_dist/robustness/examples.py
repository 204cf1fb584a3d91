"""The one place examples come from: `load_examples`, from a local file or a registered task's split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from uegr_dist.data import DataError, get_task, load_task_splits, read_table
from uegr_dist.robustness.config import EvalDataConfig


@dataclass(frozen=True)
class Example:
    """One labelled input; `index` is its position in the evaluated set (keys its randomness on every process)."""

    index: int
    text: str
    text_pair: str | None
    label: int


def _label_id(value: Any, label2id: dict[str, int], num_labels: int, where: str) -> int:
    """A file label (int id, or a string mapped through the model's label2id) -> class id, or DataError."""
    if isinstance(value, bool) or value is None:
        raise DataError(f"{where}: label {value!r} is not a class id or a label name")
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        if not 0 <= int(value) < num_labels:
            raise DataError(f"{where}: label id {value!r} is outside the model's {num_labels} classes")
        return int(value)
    if isinstance(value, str) and value in label2id:
        return int(label2id[value])
    known = ", ".join(repr(k) for k in sorted(label2id))
    raise DataError(f"{where}: label {value!r} is not one of the model's labels ({known})")


def prediction_map(cfg: EvalDataConfig, num_labels: int) -> tuple[int, ...] | None:
    """For a task scored with a model of another label space (HANS with an MNLI model): model class -> task class."""
    if cfg.task is None:
        return None
    spec = get_task(cfg.task)
    if spec.prediction_map is None:
        if spec.num_labels != num_labels:
            raise DataError(f"task {spec.name} has {spec.num_labels} labels but the model has {num_labels}")
        return None
    if len(spec.prediction_map) != num_labels:
        raise DataError(
            f"task {spec.name} is scored with a {spec.train_task} model ({len(spec.prediction_map)} labels); "
            f"this model has {num_labels}"
        )
    return spec.prediction_map


def _task_examples(cfg: EvalDataConfig) -> list[Example]:
    spec = get_task(cfg.task)  # type: ignore[arg-type]
    if cfg.split not in spec.splits:
        raise DataError(f"task {spec.name}: no split {cfg.split!r} (has: {', '.join(spec.splits)})")
    table = load_task_splits(spec, cfg.task_path, [cfg.split])[cfg.split]
    where = f"task {spec.name} [{spec.splits[cfg.split]}]"
    if len(table) == 0:
        raise DataError(f"{where}: no rows")
    if spec.regression:
        raise DataError(f"task {spec.name} is a regression task: the attacks need a classifier")
    table = table.select(range(min(cfg.max_examples, len(table))))
    pairs = table[spec.text_pair_column] if spec.text_pair_column else [None] * len(table)
    out = []
    for row, (text, pair, label) in enumerate(zip(table[spec.text_column], pairs, table[spec.label_column])):
        if not 0 <= label < spec.num_labels:  # hidden test labels are -1
            raise DataError(
                f"{where}: row {row}: label {label} is outside 0..{spec.num_labels - 1} (unlabelled split?)"
            )
        out.append(Example(row, text, pair, int(label)))
    return out


def load_examples(cfg: EvalDataConfig, label2id: dict[str, int], num_labels: int) -> list[Example]:
    """The first `cfg.max_examples` rows of `cfg.file` (labels mapped through the model's label2id), or of the
    registered task's split (its label ids)."""
    if cfg.task is not None:
        return _task_examples(cfg)
    if cfg.file is None:
        raise DataError(
            "data.file is not set: give a CSV/TSV/JSON/JSONL/Parquet file (--file) or a registered task (--task)"
        )
    table = read_table(cfg.file)
    wanted = [cfg.text_column, cfg.label_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    for column in wanted:
        if column not in table.column_names:
            raise DataError(f"{cfg.file}: missing column {column!r} (columns: {', '.join(table.column_names)})")
    if len(table) == 0:
        raise DataError(f"{cfg.file}: no rows")
    table = table.select(range(min(cfg.max_examples, len(table))))
    texts = table[cfg.text_column]
    pairs = table[cfg.text_pair_column] if cfg.text_pair_column else [None] * len(table)
    out = []
    for row, (text, pair, label) in enumerate(zip(texts, pairs, table[cfg.label_column])):
        where = f"{cfg.file}: row {row}"
        if not isinstance(text, str) or (cfg.text_pair_column and not isinstance(pair, str)):
            raise DataError(f"{where}: text is not a string")
        out.append(Example(row, text, pair, _label_id(label, label2id, num_labels, where)))
    return out
