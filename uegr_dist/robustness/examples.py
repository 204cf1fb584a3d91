"""The one place examples come from: `load_examples` (local files today; registry tasks are one more branch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from uegr_dist.data.text_classification import DataError, read_table
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


def load_examples(cfg: EvalDataConfig, label2id: dict[str, int], num_labels: int) -> list[Example]:
    """The first `cfg.max_examples` rows of `cfg.file` as Examples (labels mapped through the model's label2id)."""
    if cfg.file is None:
        raise DataError("data.file is not set: give a CSV/TSV/JSON/JSONL/Parquet file (--file)")
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
