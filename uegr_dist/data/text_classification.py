"""Local text-classification / regression files -> tokenized `datasets` splits with stable sample ids."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from uegr_dist.config import DataConfig

_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """The training or validation data is unusable; the message names the file and what is wrong."""


@dataclass
class TaskData:
    """Tokenized splits plus what the model needs to know about the labels."""

    train: datasets.Dataset
    validation: datasets.Dataset
    num_labels: int
    id2label: dict[int, str]
    regression: bool


def read_table(path: str | Path) -> datasets.Dataset:
    """Read one CSV/TSV/JSON/JSONL/Parquet file into a Dataset (errors name the file)."""
    path = Path(path)
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(sorted(_BUILDERS))})")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    kwargs: dict[str, Any] = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        return datasets.load_dataset(builder, data_files={"data": str(path)}, split="data", **kwargs)
    except Exception as err:  # datasets wraps parser errors in several exception types
        raise DataError(f"{path}: could not be read as {builder}: {err}") from err


def _check_columns(ds: datasets.Dataset, path: str, cfg: DataConfig) -> None:
    wanted = [cfg.text_column, cfg.label_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    for column in wanted:
        if column not in ds.column_names:
            raise DataError(f"{path}: missing column {column!r} (columns: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise DataError(f"{path}: no rows")


def _label_mapping(train: datasets.Dataset, cfg: DataConfig, path: str) -> dict[Any, int]:
    """Map raw labels to ids: integers keep their value, strings are sorted; mixed types are refused."""
    labels = train.unique(cfg.label_column)
    kinds = {type(v) for v in labels if v is not None}
    if any(v is None for v in labels):
        raise DataError(f"{path}: column {cfg.label_column!r} has empty labels")
    if kinds <= {int}:
        if min(labels) < 0:
            raise DataError(f"{path}: negative label {min(labels)} in column {cfg.label_column!r}")
        return {v: v for v in range(max(labels) + 1)}
    if kinds <= {str}:
        return {v: i for i, v in enumerate(sorted(labels))}
    raise DataError(f"{path}: column {cfg.label_column!r} mixes label types {sorted(k.__name__ for k in kinds)}")


def _encode_labels(
    ds: datasets.Dataset, mapping: dict[Any, int] | None, cfg: DataConfig, path: str
) -> datasets.Dataset:
    column = cfg.label_column
    if mapping is None:
        values = ds[column]
        for row, value in enumerate(values):
            if value is None or not isinstance(value, (int, float)) or math.isnan(float(value)):
                raise DataError(f"{path}: row {row}: regression target {value!r} in column {column!r} is not a number")
        return ds.map(lambda ex: {"labels": float(ex[column])}, desc="labels")
    for row, value in enumerate(ds[column]):
        if value not in mapping:
            raise DataError(f"{path}: row {row}: label {value!r} in column {column!r} is not among the training labels")
    return ds.map(lambda ex: {"labels": mapping[ex[column]]}, desc="labels")


def load_text_classification(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> TaskData:
    """Read, validate, label-encode and tokenize the configured files; every row gets a stable `sample_id`."""
    if cfg.train_file is None:
        raise DataError(
            "data.train_file is not set: give a CSV/TSV/JSON/JSONL/Parquet file with text and label columns"
        )
    train = read_table(cfg.train_file)
    _check_columns(train, cfg.train_file, cfg)
    if cfg.validation_file is not None:
        validation = read_table(cfg.validation_file)
        _check_columns(validation, cfg.validation_file, cfg)
        val_path = cfg.validation_file
    else:
        split = train.train_test_split(test_size=cfg.validation_ratio, seed=seed, shuffle=True)
        train, validation = split["train"], split["test"]
        val_path = f"{cfg.train_file} (validation split)"
        if len(validation) == 0 or len(train) == 0:
            raise DataError(f"{cfg.train_file}: too few rows ({len(train) + len(validation)}) to split off validation")

    mapping = None if cfg.regression else _label_mapping(train, cfg, cfg.train_file)
    train = _encode_labels(train, mapping, cfg, cfg.train_file)
    validation = _encode_labels(validation, mapping, cfg, val_path)
    if cfg.max_train_samples is not None:
        train = train.select(range(min(cfg.max_train_samples, len(train))))
    if cfg.max_eval_samples is not None:
        validation = validation.select(range(min(cfg.max_eval_samples, len(validation))))

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        pair = batch[cfg.text_pair_column] if cfg.text_pair_column else None
        return tokenizer(batch[cfg.text_column], pair, truncation=True, max_length=cfg.max_length)

    def prepare(ds: datasets.Dataset, name: str) -> datasets.Dataset:
        ds = ds.add_column("sample_id", list(range(len(ds))))
        keep = {"labels", "sample_id"}
        ds = ds.map(tokenize, batched=True, desc=f"tokenize {name}")
        return ds.remove_columns([c for c in ds.column_names if c not in keep and c not in tokenizer.model_input_names])

    if mapping is None:
        num_labels, id2label = 1, {0: "score"}
    else:
        num_labels = len(mapping)
        id2label = {i: str(label) for label, i in mapping.items()}
    return TaskData(prepare(train, "train"), prepare(validation, "validation"), num_labels, id2label, cfg.regression)


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
