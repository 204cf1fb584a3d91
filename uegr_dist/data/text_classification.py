"""Text-classification / regression data -> tokenized `datasets` splits with stable sample ids.

Two sources share one path: a registered task (`data.task`, from the Hub or a local copy: uegr_dist.data.tasks) and
local files (`data.train_file` / `data.validation_file`: CSV, TSV, JSON, JSONL, Parquet). `load_raw_task` reads and
checks the splits, `prepare_task` maps labels to ids and tokenizes with `datasets.map` (cached and fingerprinted: the
same files, tokenizer and max length reuse the cache; a changed one re-tokenizes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from uegr_dist.config import DataConfig
from uegr_dist.data.errors import DataError
from uegr_dist.data.preflight import FILE_BUILDERS, check_file
from uegr_dist.data.tasks import TaskSpec, load_task_splits, trainable_task

ROW = "_source_row"


@dataclass
class TaskData:
    """Tokenized splits plus what the model needs to know about the labels."""

    train: datasets.Dataset
    validation: datasets.Dataset
    num_labels: int
    id2label: dict[int, str]
    regression: bool
    extra_validation: dict[str, datasets.Dataset] = field(default_factory=dict)
    """Further evaluation splits (MNLI mismatched), reported as `<name>_<metric>`."""
    main_metric: str = "accuracy"
    task: TaskSpec | None = None


@dataclass
class RawTask:
    """Untokenized, checked splits and the roles of their columns."""

    train: datasets.Dataset
    validation: datasets.Dataset
    extra: dict[str, datasets.Dataset]
    sources: dict[str, str]
    """Split name -> where it came from (file, or task[split]), for error messages."""
    text_column: str
    text_pair_column: str | None
    label_column: str
    regression: bool
    label_names: list[str] | None
    """Fixed label order (registry or data.label_names); None: derived from the training labels."""
    num_labels: int | None = None
    task: TaskSpec | None = None

    def texts(self) -> list[str]:
        """Every training text (both columns of a pair), e.g. to build a word-level vocabulary."""
        columns = [c for c in (self.text_column, self.text_pair_column) if c]
        return [str(t) for c in columns for t in self.train[c]]


def read_table(path: str | Path) -> datasets.Dataset:
    """Read one CSV/TSV/JSON/JSONL/Parquet file into a Dataset (errors name the file)."""
    path = Path(path)
    check_file(path)
    builder = FILE_BUILDERS[path.suffix.lower()]
    kwargs: dict[str, Any] = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        return datasets.load_dataset(builder, data_files={"data": str(path)}, split="data", **kwargs)
    except Exception as err:  # datasets wraps parser errors in several exception types
        if "corresponds to no data" in str(err):  # a header-only CSV or an empty JSONL file
            raise DataError(f"{path}: no rows") from None
        raise DataError(f"{path}: could not be read as {builder}: {err}") from err


def _number_rows(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
    return {ROW: indices}


def _rows(ds: datasets.Dataset) -> list[int]:
    """Each row's index in its file or Hub split (error messages name it, also after a validation split)."""
    return ds[ROW] if ROW in ds.column_names else list(range(len(ds)))


def _check_split(ds: datasets.Dataset, where: str, columns: list[str]) -> None:
    for column in columns:
        if column not in ds.column_names:
            raise DataError(f"{where}: missing column {column!r} (columns: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise DataError(f"{where}: no rows")


def _check_texts(ds: datasets.Dataset, where: str, columns: list[str]) -> None:
    for column in columns:
        for row, value in zip(_rows(ds), ds[column]):
            if not isinstance(value, str):
                what = "empty" if value is None else f"{type(value).__name__} {value!r}, not"
                raise DataError(f"{where}: row {row}: {what} text in column {column!r}")


def train_slice(rows: Sequence[int], n: int, seed: int, source_rows: int) -> list[int]:
    """Positions in `rows` (source row numbers of the training split) of the `n` rows that come first in one seeded
    order of all `source_rows` rows, in source order. The order depends on `seed` and `source_rows` only (numpy's
    frozen RandomState stream), not on the training seed: every seed and method gets the same slice; a smaller `n` is a
    subset of a larger one."""
    order = np.random.RandomState(seed).permutation(source_rows)
    rank = np.empty(source_rows, dtype=np.int64)
    rank[order] = np.arange(source_rows)
    chosen = np.argsort(rank[np.asarray(rows, dtype=np.int64)], kind="stable")[:n]
    return sorted(chosen.tolist())


def load_raw_task(cfg: DataConfig, seed: int) -> RawTask:
    """Read the configured task or files; check columns, rows and texts; split off validation if there is none; then
    keep the `data.max_train_samples` slice of train (`train_slice`, seeded by `data.max_train_samples_seed`, not by
    the run's `seed`, which seeds only the held-out validation split)."""
    if cfg.task is not None:
        spec = trainable_task(cfg.task)
        roles = [r for r in spec.splits if r != "test"]
        splits = load_task_splits(spec, cfg.task_path, roles)
        where = cfg.task_path or spec.hub_id
        sources = {role: f"task {spec.name}: {where}[{spec.splits[role]}]" for role in splits}
        text, pair, label = spec.text_column, spec.text_pair_column, spec.label_column
        label_names = None if spec.regression else list(spec.label_names or ())
        regression = spec.regression
    else:
        if cfg.train_file is None:
            raise DataError(
                "no data: set data.task (a registered task, see `uegr-train --list-tasks`) or data.train_file "
                "(a CSV/TSV/JSON/JSONL/Parquet file with text and label columns)"
            )
        spec = None
        splits = {"train": read_table(cfg.train_file)}
        sources = {"train": cfg.train_file}
        if cfg.validation_file is not None:
            splits["validation"] = read_table(cfg.validation_file)
            sources["validation"] = cfg.validation_file
        text, pair, label = cfg.text_column, cfg.text_pair_column, cfg.label_column
        label_names = list(cfg.label_names) if cfg.label_names else None
        regression = cfg.regression

    columns = [text, label] + ([pair] if pair else [])
    for role, ds in splits.items():
        _check_split(ds, sources[role], columns)
    splits = {r: ds.map(_number_rows, with_indices=True, batched=True, desc="rows") for r, ds in splits.items()}
    text_columns = [text] + ([pair] if pair else [])
    for role, ds in splits.items():
        _check_texts(ds, sources[role], text_columns)
    train = splits.pop("train")
    source_rows = len(train)
    if "validation" in splits:
        validation = splits.pop("validation")
    else:
        held_out = train.train_test_split(test_size=cfg.validation_ratio, seed=seed, shuffle=True)
        train, validation = held_out["train"], held_out["test"]
        sources["validation"] = f"{sources['train']} (validation split)"
        if len(validation) == 0 or len(train) == 0:
            n = len(train) + len(validation)
            raise DataError(f"{sources['train']}: too few rows ({n}) to split off validation")
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(train):
        train = train.select(train_slice(_rows(train), cfg.max_train_samples, cfg.max_train_samples_seed, source_rows))
    if cfg.max_eval_samples is not None:
        validation = validation.select(range(min(cfg.max_eval_samples, len(validation))))
        splits = {r: ds.select(range(min(cfg.max_eval_samples, len(ds)))) for r, ds in splits.items()}
    return RawTask(
        train=train,
        validation=validation,
        extra=splits,
        sources=sources,
        text_column=text,
        text_pair_column=pair,
        label_column=label,
        regression=regression,
        label_names=label_names,
        num_labels=cfg.num_labels,
        task=spec,
    )


def _label_mapping(raw: RawTask) -> dict[Any, int]:
    """Raw label -> id. Fixed names: a name or its index; otherwise integers keep their value and strings are
    sorted (both taken from the training split). Empty, non-integral or mixed-type labels in any split are refused,
    naming the file and row."""
    column = raw.label_column
    kinds: set[type] = set()
    labels: set[Any] = set()
    splits = {"train": raw.train, "validation": raw.validation, **raw.extra}
    for name, ds in splits.items():
        where = raw.sources[name]
        for row, value in zip(_rows(ds), ds[column]):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                raise DataError(f"{where}: row {row}: empty label in column {column!r}")
            if isinstance(value, float) and not value.is_integer():
                raise DataError(
                    f"{where}: row {row}: label {value!r} in column {column!r} is not a class (an integer or "
                    "a name); for a numeric target set data.regression true"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                kind = type(value).__name__
                raise DataError(f"{where}: row {row}: label {value!r} in column {column!r} has type {kind}")
            kinds.add(str if isinstance(value, str) else int)
            if len(kinds) > 1:
                raise DataError(
                    f"{where}: column {column!r} mixes label types (row {row}: {value!r}): use all names or all "
                    "integers"
                )
            if name == "train":
                labels.add(value)
    if raw.label_names is not None:
        mapping: dict[Any, int] = {name: i for i, name in enumerate(raw.label_names)}
        mapping.update({i: i for i in range(len(raw.label_names))})
        return mapping
    if kinds == {str}:
        if raw.num_labels is not None and len(labels) > raw.num_labels:
            raise DataError(
                f"{raw.sources['train']}: {len(labels)} distinct labels in column {column!r} but data.num_labels = "
                f"{raw.num_labels}"
            )
        return {v: i for i, v in enumerate(sorted(labels))}
    n = raw.num_labels if raw.num_labels is not None else int(max(labels)) + 1
    return {i: i for i in range(n)}  # 1.0 == 1: float labels from a CSV column look up the same ids


def _encode_labels(ds: datasets.Dataset, mapping: dict[Any, int] | None, column: str, where: str) -> datasets.Dataset:
    if mapping is None:
        for row, value in zip(_rows(ds), ds[column]):
            if value is None or isinstance(value, (str, bool)) or math.isnan(float(value)):
                raise DataError(f"{where}: row {row}: regression target {value!r} in column {column!r} is not a number")
        return ds.map(_float_labels, fn_kwargs={"column": column}, desc="labels")
    ids = sorted({v for v in mapping.values()})
    for row, value in zip(_rows(ds), ds[column]):
        if value not in mapping or isinstance(value, bool):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                raise DataError(
                    f"{where}: row {row}: label {value!r} in column {column!r} is outside 0..{ids[-1]} "
                    f"(num_labels = {len(ids)})"
                )
            raise DataError(
                f"{where}: row {row}: label {value!r} in column {column!r} is not among the labels "
                f"({', '.join(repr(k) for k in mapping if isinstance(k, str)) or f'0..{ids[-1]}'})"
            )
    return ds.map(_mapped_labels, fn_kwargs={"column": column, "mapping": mapping}, desc="labels")


def _float_labels(example: dict[str, Any], column: str) -> dict[str, float]:
    return {"labels": float(example[column])}


def _mapped_labels(example: dict[str, Any], column: str, mapping: dict[Any, int]) -> dict[str, int]:
    return {"labels": mapping[example[column]]}


def _tokenize(
    batch: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    pair: str | None,
    max_length: int,
    truncation: str,
) -> dict[str, list]:
    return tokenizer(batch[text], batch[pair] if pair else None, truncation=truncation, max_length=max_length)


def _add_sample_id(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
    return {"sample_id": indices}


def prepare_task(raw: RawTask, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> TaskData:
    """Map labels to ids, tokenize (cached by datasets' fingerprint of data + tokenizer + options) and give every row
    a stable `sample_id` (its index in the split)."""
    mapping = None if raw.regression else _label_mapping(raw)
    kwargs = {
        "tokenizer": tokenizer,
        "text": raw.text_column,
        "pair": raw.text_pair_column,
        "max_length": cfg.max_length,
        "truncation": cfg.truncation if raw.text_pair_column else True,
    }

    def prepare(ds: datasets.Dataset, name: str) -> datasets.Dataset:
        ds = _encode_labels(ds, mapping, raw.label_column, raw.sources[name])
        ds = ds.map(_add_sample_id, with_indices=True, batched=True, desc=f"ids {name}")
        ds = ds.map(_tokenize, batched=True, fn_kwargs=kwargs, desc=f"tokenize {name}")
        keep = {"labels", "sample_id", *tokenizer.model_input_names}
        return ds.remove_columns([c for c in ds.column_names if c not in keep])

    if mapping is None:
        num_labels, id2label = 1, {0: "score"}
    elif raw.label_names is not None:
        num_labels, id2label = len(raw.label_names), dict(enumerate(raw.label_names))
    else:
        num_labels = len(set(mapping.values()))
        names: dict[int, str] = {}
        for label, i in mapping.items():
            names.setdefault(i, str(label))
        id2label = dict(sorted(names.items()))
    metric = raw.task.main_metric if raw.task else ("pearson" if raw.regression else "accuracy")
    return TaskData(
        train=prepare(raw.train, "train"),
        validation=prepare(raw.validation, "validation"),
        num_labels=num_labels,
        id2label=id2label,
        regression=raw.regression,
        extra_validation={role: prepare(ds, role) for role, ds in raw.extra.items()},
        main_metric=metric,
        task=raw.task,
    )


def load_text_classification(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> TaskData:
    """Read, check, label-encode and tokenize the configured task or files."""
    return prepare_task(load_raw_task(cfg, seed), cfg, tokenizer)


class PaddingCollator:
    """Pads model inputs (to the longest row, or to a fixed max_length) and keeps `labels` and `sample_id`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, regression: bool, max_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.label_dtype = torch.float32 if regression else torch.long
        self.max_length = max_length

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """features: list of tokenized rows -> dict of [B, S] inputs (S = longest row, or max_length if set), [B]
        labels, [B] sample_id."""
        inputs = [{k: v for k, v in f.items() if k not in ("labels", "sample_id")} for f in features]
        padding = "max_length" if self.max_length else "longest"
        batch = dict(self.tokenizer.pad(inputs, padding=padding, max_length=self.max_length, return_tensors="pt"))
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=self.label_dtype)
        batch["sample_id"] = torch.tensor([f["sample_id"] for f in features], dtype=torch.long)
        return batch
