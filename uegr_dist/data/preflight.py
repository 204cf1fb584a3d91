"""Checks of a run's data settings that need neither `datasets` nor torch, so that a wrong file, column or task name
is reported at once (before the seconds the training stack takes to import). The loader checks everything again,
and more (labels, empty texts, row by row)."""

from __future__ import annotations

import codecs
import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

from uegr_dist.data.errors import DataError

if TYPE_CHECKING:
    from uegr_dist.config import DataConfig

FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
"""File suffix -> the `datasets` builder that reads it."""
TEXT_FORMATS = (".csv", ".tsv", ".json", ".jsonl")


def check_utf8(path: Path) -> None:
    """Raise a DataError naming the line and byte offset of the first byte sequence that is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = line = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                bad = offset + err.start
                line_no = line + chunk[: err.start].count(b"\n") + 1
                raise DataError(
                    f"{path}: not UTF-8 text (line {line_no}, byte {bad}: {chunk[err.start : err.start + 4]!r}); "
                    "re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`"
                ) from None
            offset += len(chunk)
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text (truncated multi-byte character at the end)") from None


def check_file(path: Path) -> None:
    """A supported, existing file in UTF-8 (text formats)."""
    suffix = path.suffix.lower()
    if suffix not in FILE_BUILDERS:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(sorted(FILE_BUILDERS))})")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if suffix in TEXT_FORMATS:
        check_utf8(path)


def header_columns(path: Path) -> list[str] | None:
    """The columns a CSV / TSV header or the first JSON-lines row names (None: not cheaply known, e.g. Parquet, JSON,
    an empty file, a first line that does not parse: the loader reports those)."""
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", newline="") as handle:
        if suffix in (".csv", ".tsv"):
            row = next(csv.reader(handle, delimiter="\t" if suffix == ".tsv" else ","), None)
            return row if row else None
        if suffix == ".jsonl":
            for line in handle:
                if line.strip():
                    try:
                        first = json.loads(line)
                    except json.JSONDecodeError:
                        return None
                    return list(first) if isinstance(first, dict) else None
    return None


def check_data_inputs(cfg: DataConfig) -> None:
    """What can be checked of `cfg` without reading the data: a registered task name (trainable, and a task_path that
    exists), or training / validation files that exist, are UTF-8 and name the text and label columns."""
    if cfg.task is not None:
        from uegr_dist.data.tasks import trainable_task

        trainable_task(cfg.task)
        if cfg.task_path is not None and not Path(cfg.task_path).exists():
            raise DataError(f"data.task_path = {cfg.task_path!r}: does not exist")
        return
    if cfg.train_file is None:
        raise DataError(
            "no data: set data.task (a registered task, see `uegr-train --list-tasks`) or data.train_file "
            "(a CSV/TSV/JSON/JSONL/Parquet file with text and label columns)"
        )
    columns = [cfg.text_column, cfg.label_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    for name in (cfg.train_file, cfg.validation_file):
        if name is None:
            continue
        path = Path(name)
        check_file(path)
        found = header_columns(path)
        if found is not None:
            for column in columns:
                if column not in found:
                    raise DataError(f"{path}: missing column {column!r} (columns: {', '.join(found)})")
