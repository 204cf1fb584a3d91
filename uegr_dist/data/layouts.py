"""Local task copies in the layouts of the public downloads: the GLUE distribution's TSV folders and AdvGLUE's
`dev.json`.

`data.task_path` (uegr-train) and `uegr-eval --task-path` accept, besides a `DatasetDict.save_to_disk` folder or a
folder of the Hub repository's data files (uegr_dist.data.tasks):

- for a GLUE task, the task's folder of the GLUE download (`glue_data/SST-2` with `train.tsv`, `dev.tsv`, `test.tsv`;
  MNLI: `dev_matched.tsv`, `dev_mismatched.tsv`), or the folder holding it (`glue_data`). The files are read as the
  GLUE script writes them: tab-separated, one row a line, quote characters literal (never CSV quoting), CoLA's
  train/dev without a header row (source, label, original judgement, sentence), MRPC's header with its UTF-8
  byte-order mark. Columns are renamed to the registry's (MNLI `sentence1` -> `premise`, QQP `is_duplicate` ->
  `label`, ...) and labels become the registry's ids (the Hub `ClassLabel` order: QNLI/RTE entailment = 0,
  not_entailment = 1; MNLI entailment, neutral, contradiction = 0, 1, 2; the integer labels of CoLA, SST-2, MRPC,
  QQP and WNLI keep their value; STS-B's score stays a float).
  A row without the header's number of fields (the real QQP train.tsv has a few) is skipped with a warning naming
  its line; more than 1% such rows is an error (the file is not in this layout).
  The test role reads a labelled test file (`test_labeled.tsv`, MNLI `test_matched_labeled.tsv`, MRPC also
  `msr_paraphrase_test.txt`, with the columns of the dev file) or a `test.tsv` that has the label column; GLUE's own
  test files have no labels and are refused, never scored.
- for an AdvGLUE task, the official `dev.json` (or a folder holding it): one JSON object keyed by task (`sst2`,
  `qqp`, `mnli`, `mnli-mm`, `qnli`, `rte`), each a list of items with `idx`, `label` (GLUE's label ids) and the
  task's text fields, which are the registry's column names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uegr_dist.data.errors import DataError

if TYPE_CHECKING:
    import datasets

    from uegr_dist.data.tasks import TaskSpec

logger = logging.getLogger(__name__)

MALFORMED_LIMIT = 0.01
"""Largest fraction of rows with the wrong number of fields that is skipped (with a warning) instead of refused."""


@dataclass(frozen=True)
class GlueLayout:
    """Where a GLUE task's files are and which of their columns hold the registry's text, pair and label."""

    folder: str
    """The task's folder in the GLUE download."""
    text: str
    pair: str | None
    label: str
    labels: str
    """ids: integers 0..n-1 (the registry's order); names: the registry's label names; score: a float target."""
    files: dict[str, str] = field(default_factory=lambda: {"train": "train.tsv", "validation": "dev.tsv"})
    """Role -> file (the labelled roles)."""
    test: str = "test.tsv"
    """GLUE's (unlabelled) test file."""
    labelled_test: tuple[str, ...] = ("test_labeled.tsv",)
    """Labelled test files, read with the columns of the dev file; the first one present is used."""
    headerless: tuple[str, ...] | None = None
    """Column names of train/dev/labelled-test files without a header row (CoLA)."""

    def known_files(self) -> list[str]:
        """Every file name of the layout (any of them marks a folder as this task's GLUE folder)."""
        return [*self.files.values(), self.test, *self.labelled_test]


GLUE_LAYOUTS: dict[str, GlueLayout] = {
    "cola": GlueLayout(
        "CoLA", "sentence", None, "label", "ids", headerless=("source", "label", "original_judgement", "sentence")
    ),
    "sst2": GlueLayout("SST-2", "sentence", None, "label", "ids"),
    "mrpc": GlueLayout(
        "MRPC",
        "#1 String",
        "#2 String",
        "Quality",
        "ids",
        labelled_test=("test_labeled.tsv", "msr_paraphrase_test.txt"),
    ),  # msr_paraphrase_test.txt: the labelled MSR file GLUE's test.tsv is made from
    "stsb": GlueLayout("STS-B", "sentence1", "sentence2", "score", "score"),
    "qqp": GlueLayout("QQP", "question1", "question2", "is_duplicate", "ids"),
    "mnli": GlueLayout(
        "MNLI",
        "sentence1",
        "sentence2",
        "gold_label",
        "names",
        files={"train": "train.tsv", "validation": "dev_matched.tsv", "mismatched": "dev_mismatched.tsv"},
        test="test_matched.tsv",
        labelled_test=("test_matched_labeled.tsv",),
    ),
    "qnli": GlueLayout("QNLI", "question", "sentence", "label", "names"),
    "rte": GlueLayout("RTE", "sentence1", "sentence2", "label", "names"),
    "wnli": GlueLayout("WNLI", "sentence1", "sentence2", "label", "ids"),
}
"""Registry task -> its layout in the GLUE download (https://gluebenchmark.com/tasks)."""

ADVGLUE_KEYS: dict[str, str] = {
    "adv_sst2": "sst2",
    "adv_qqp": "qqp",
    "adv_mnli": "mnli",
    "adv_mnli_mismatched": "mnli-mm",
    "adv_qnli": "qnli",
    "adv_rte": "rte",
}
"""Registry task -> its key in AdvGLUE's dev.json (https://adversarialglue.github.io/)."""


def accepted_layouts(spec: TaskSpec) -> str:
    """The local layouts `task_path` accepts for `spec`, for error messages."""
    options = ["a DatasetDict.save_to_disk folder", f"a folder of the Hub repository's data files ({spec.hub_id})"]
    if spec.name in GLUE_LAYOUTS:
        layout = GLUE_LAYOUTS[spec.name]
        files = ", ".join(layout.files.values())
        options.append(f"the GLUE download's {layout.folder} folder ({files}) or the folder holding it")
    if spec.name in ADVGLUE_KEYS:
        options.append("AdvGLUE's dev.json or a folder holding it")
    return "; ".join(options)


# --- GLUE TSV folders ----------------------------------------------------------------------------------------------


def glue_folder(path: Path, spec: TaskSpec) -> Path | None:
    """The folder holding `spec`'s GLUE files: `path` itself, or its subfolder named as in the GLUE download (or as
    the task); None when neither holds any of the layout's files."""
    layout = GLUE_LAYOUTS.get(spec.name)
    if layout is None:
        return None
    for folder in (path, path / layout.folder, path / spec.name):
        if folder.is_dir() and any((folder / name).is_file() for name in layout.known_files()):
            return folder
    return None


def read_glue_folder(folder: Path, spec: TaskSpec, roles: list[str]) -> dict[str, datasets.Dataset]:
    """Hub split name -> Dataset (the registry's columns and label ids, plus `idx`) for each of `roles`, from the
    task's GLUE folder."""
    layout = GLUE_LAYOUTS[spec.name]
    out = {}
    for role in roles:
        out[spec.splits[role]] = _read_role(folder, spec, layout, role)
    return out


def _read_role(folder: Path, spec: TaskSpec, layout: GlueLayout, role: str) -> datasets.Dataset:
    if role == "test":
        for name in layout.labelled_test:
            if (folder / name).is_file():
                return _read_glue_file(folder / name, spec, layout, layout.headerless)
        test = folder / layout.test
        if test.is_file() and layout.headerless is None and layout.label in _header(test):
            return _read_glue_file(test, spec, layout, None)
        hidden = f"{test} has no labels (GLUE hides its test labels; it is never scored)" if test.is_file() else ""
        raise DataError(
            f"task {spec.name}: {hidden or f'{folder} has no test file'}: put a labelled test file next to it as "
            f"{' or '.join(layout.labelled_test)} (the columns of {layout.files['validation']}), or evaluate a "
            "labelled split (--split validation)"
        )
    name = layout.files.get(role)
    if name is None:
        raise DataError(f"task {spec.name}: the GLUE {layout.folder} layout has no file for split {role!r}")
    path = folder / name
    if not path.is_file():
        present = sorted(p.name for p in folder.iterdir() if p.is_file())
        raise DataError(
            f"task {spec.name}: {folder} has no {name} (the {role} split of the GLUE {layout.folder} layout: "
            f"{', '.join(layout.files.values())}; the folder has: {', '.join(present) or 'no files'})"
        )
    return _read_glue_file(path, spec, layout, layout.headerless)


def _lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, tab-separated fields) of each non-blank line; quote characters are literal; a byte-order mark
    on the first line is dropped."""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}: not UTF-8 text (line {number}: {raw[err.start : err.start + 4]!r}); re-encode the file "
                    "as UTF-8, e.g. `iconv -f latin1 -t utf-8`"
                ) from None
            if number == 1:
                line = line.removeprefix("\ufeff")
            line = line.removesuffix("\n").removesuffix("\r")
            if line:
                yield number, line.split("\t")


def _header(path: Path) -> list[str]:
    """The first line's fields (a header row)."""
    return next(_lines(path), (0, []))[1]


def _label_parser(spec: TaskSpec, layout: GlueLayout) -> Callable[[str], float]:
    """A function: the file's label string -> the registry's label id (or float score); ValueError says why not."""
    names = spec.label_names or ()
    if layout.labels == "score":

        def parse(value: str) -> float:
            try:
                score = float(value)
            except ValueError:
                score = math.nan
            if not math.isfinite(score):
                raise ValueError("is not a finite number (STS-B's score column)")
            return score

    elif layout.labels == "names":
        ids = {name: i for i, name in enumerate(names)}

        def parse(value: str) -> int:
            if value not in ids:
                raise ValueError(f"is not one of {', '.join(names)}")
            return ids[value]

    else:
        allowed = ", ".join(f"{i} ({name})" for i, name in enumerate(names))
        id_of = {str(i): i for i in range(len(names))}

        def parse(value: str) -> int:
            if value.strip() not in id_of:
                raise ValueError(f"is not one of {allowed}")
            return id_of[value.strip()]

    return parse


def _read_glue_file(
    path: Path, spec: TaskSpec, layout: GlueLayout, headerless: tuple[str, ...] | None
) -> datasets.Dataset:
    """One GLUE TSV -> Dataset with the registry's text columns, `label` (ids or a float score) and `idx`."""
    import datasets

    lines = _lines(path)
    if headerless is not None:
        header = list(headerless)
    else:
        first = next(lines, None)
        if first is None:
            raise DataError(f"{path}: empty file (expected the GLUE {layout.folder} header row)")
        header = first[1]
    source = [layout.text] + ([layout.pair] if layout.pair else []) + [layout.label]
    missing = [c for c in source if c not in header]
    if missing:
        raise DataError(
            f"{path}: no column {missing[0]!r} in the header ({', '.join(header)}); the GLUE {layout.folder} layout "
            f"needs the columns {', '.join(source)}"
        )
    target = [spec.text_column] + ([spec.text_pair_column] if spec.text_pair_column else []) + ["label"]
    positions = [header.index(c) for c in source]
    columns: dict[str, list[Any]] = {name: [] for name in target}
    parse = _label_parser(spec, layout)
    malformed: list[int] = []
    for number, fields in lines:
        if len(fields) != len(header):
            malformed.append(number)
            continue
        values = [fields[p] for p in positions]
        try:
            values[-1] = parse(values[-1])
        except ValueError as err:
            hint = ""
            if headerless is not None and number == 1:
                hint = f" ({layout.folder}'s {path.name} has no header row: columns {', '.join(headerless)})"
            label = f"label {values[-1]!r} in column {layout.label!r}"
            raise DataError(f"{path}: line {number}: {label} {err}{hint}") from None
        for name, value in zip(target, values):
            columns[name].append(value)
    rows = len(columns["label"])
    if malformed:
        lines_ = ", ".join(map(str, malformed[:10])) + (", ..." if len(malformed) > 10 else "")
        what = (
            f"{len(malformed)} of {rows + len(malformed)} rows of {path} do not have the header's {len(header)} "
            "tab-separated fields"
        )
        if len(malformed) > MALFORMED_LIMIT * (rows + len(malformed)):
            raise DataError(f"{what} (lines {lines_}): not the GLUE {layout.folder} layout")
        logger.warning("%s: skipped (lines %s)", what, lines_)
    if rows == 0:
        raise DataError(f"{path}: no rows")
    columns["idx"] = list(range(rows))
    text = datasets.Value("string")
    label = datasets.Value("float32") if spec.label_names is None else datasets.ClassLabel(names=list(spec.label_names))
    features = datasets.Features(
        {**{name: text for name in target[:-1]}, "label": label, "idx": datasets.Value("int32")}
    )
    digest = hashlib.sha256(repr(features).encode())
    for values in zip(*columns.values()):
        digest.update(repr(values).encode())
    # Written once to the datasets cache, keyed by the parsed table itself (a changed file or parser gives a new
    # key), so tokenization is cached, and shared by the processes of a run, as for the other sources.
    return datasets.Dataset.from_generator(
        _generate, features=features, gen_kwargs={"columns": columns}, fingerprint=digest.hexdigest()
    )


def _generate(columns: dict[str, list[Any]]) -> Iterator[dict[str, Any]]:
    names = list(columns)
    for values in zip(*columns.values()):
        yield dict(zip(names, values))


# --- AdvGLUE dev.json ----------------------------------------------------------------------------------------------


def advglue_file(path: Path) -> Path | None:
    """AdvGLUE's JSON: `path` itself when it is a file, or the `dev.json` it holds; None otherwise."""
    if path.is_file():
        return path
    return path / "dev.json" if (path / "dev.json").is_file() else None


def read_advglue(file: Path, spec: TaskSpec) -> dict[str, datasets.Dataset]:
    """Hub split name -> Dataset (the registry's columns, label ids and `idx`) for an AdvGLUE task, from dev.json."""
    import datasets

    key = ADVGLUE_KEYS[spec.name]
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{file}: not AdvGLUE's dev.json (not a UTF-8 JSON document: {err})") from None
    if not isinstance(data, dict):
        raise DataError(
            f"{file}: not AdvGLUE's dev.json (expected one JSON object keyed by task: "
            f"{', '.join(ADVGLUE_KEYS.values())}; found a {type(data).__name__})"
        )
    if key not in data:
        raise DataError(f"{file}: no key {key!r} for task {spec.name} (keys: {', '.join(map(str, data)) or 'none'})")
    items = data[key]
    where = f"{file}[{key!r}]"
    if not isinstance(items, list):
        raise DataError(f"{where}: expected a list of items, found a {type(items).__name__}")
    if not items:
        raise DataError(f"{where}: no rows")
    fields = [spec.text_column] + ([spec.text_pair_column] if spec.text_pair_column else [])
    names = spec.label_names or ()
    columns: dict[str, list[Any]] = {name: [] for name in [*fields, "label", "idx"]}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{where}[{i}]: expected an object with idx, label, {', '.join(fields)}")
        for name in [*fields, "label"]:
            if name not in item:
                raise DataError(
                    f"{where}[{i}]: no field {name!r} (fields: {', '.join(item)}; task {spec.name} expects "
                    f"{', '.join(fields)}, label)"
                )
        for name in fields:
            if not isinstance(item[name], str):
                raise DataError(f"{where}[{i}]: {name} {item[name]!r} is not a string")
        label = item["label"]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(names):
            allowed = ", ".join(f"{j} ({name})" for j, name in enumerate(names))
            raise DataError(f"{where}[{i}]: label {label!r} is not one of GLUE's label ids for {key}: {allowed}")
        for name in fields:
            columns[name].append(item[name])
        columns["label"].append(label)
        idx = item.get("idx", i)
        columns["idx"].append(idx if isinstance(idx, int) and not isinstance(idx, bool) else i)
    features = datasets.Features(
        {
            **{name: datasets.Value("string") for name in fields},
            "label": datasets.ClassLabel(names=list(names)),
            "idx": datasets.Value("int64"),
        }
    )
    return {spec.splits["validation"]: datasets.Dataset.from_dict(columns, features=features)}
