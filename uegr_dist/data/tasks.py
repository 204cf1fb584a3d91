"""The task registry: standard NLU datasets on the Hugging Face Hub, how to read them and how to score them.

`--data.task NAME` trains on a registered task; `data.task_path` points at a local copy (a folder written by
`DatasetDict.save_to_disk`, a folder of the Hub repository's data files, or the layouts of the GLUE and AdvGLUE
downloads: uegr_dist.data.layouts) for clusters without Hub access. Every
entry lists the Hub dataset id and config, which split plays which role, the text columns, the label names (their
order is the Hub `ClassLabel` order, so ids match the Hub data) or regression, and the metrics reported.

Evaluation-only entries (AdvGLUE, HANS) carry `train_task`: the task whose fine-tuned model they evaluate, and
`prediction_map` when that model's label space differs (an MNLI model predicts 3 classes, HANS has 2).

The `uegr13` suite (used by `uegr-compare`) is the 13 training datasets below, each with the robustness and
out-of-distribution sets evaluated with its model:
- the 8 GLUE tasks with a reliable dev set (CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE; WNLI is left out as in
  most fine-tuning papers: its dev set is adversarial to the train set and models score at or below majority class);
- ANLI R1, R2, R3 (adversarially collected NLI, the standard robustness training/evaluation sets);
- IMDB and AG News (long-document sentiment and topic classification, for generalization beyond GLUE).
Robustness sets: AdvGLUE for SST-2, QQP, MNLI (matched and mismatched), QNLI and RTE; HANS for MNLI; PAWS for QQP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from uegr_dist.data import layouts
from uegr_dist.data.errors import DataError

if TYPE_CHECKING:
    import datasets

METRICS = ("accuracy", "f1", "mcc", "pearson", "spearman", "mse")
"""Metric names the evaluation computes (uegr_dist.evaluation.metrics)."""


@dataclass(frozen=True)
class TaskSpec:
    """One registered dataset."""

    name: str
    hub_id: str
    hub_config: str | None
    text_column: str
    text_pair_column: str | None
    label_names: tuple[str, ...] | None
    """Label names in id order; None for regression."""
    metrics: tuple[str, ...]
    """Reported metrics; the first is the task's headline metric."""
    splits: dict[str, str] = field(default_factory=dict)
    """Role -> Hub split name. Roles: train, validation, test; other roles are extra evaluation splits (MNLI's
    `mismatched`), reported with the role as prefix."""
    label_column: str = "label"
    group: str = "glue"
    train_task: str | None = None
    """For evaluation-only sets: the task whose fine-tuned model they evaluate."""
    prediction_map: tuple[int, ...] | None = None
    """Model label id -> this task's label id, when the model's label space differs (MNLI model on HANS)."""
    note: str = ""

    @property
    def regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def eval_only(self) -> bool:
        return "train" not in self.splits

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    def extra_eval_roles(self) -> list[str]:
        return [role for role in self.splits if role not in ("train", "validation", "test")]


def _glue(
    name: str, columns: tuple[str, str | None], labels: tuple[str, ...] | None, metrics: tuple[str, ...]
) -> TaskSpec:
    return TaskSpec(
        name=name,
        hub_id="nyu-mll/glue",
        hub_config=name,
        text_column=columns[0],
        text_pair_column=columns[1],
        label_names=labels,
        metrics=metrics,
        splits={"train": "train", "validation": "validation", "test": "test"},
        note="GLUE test labels are hidden (-1): evaluate on validation.",
    )


def _adv(name: str, glue: TaskSpec, config: str | None = None) -> TaskSpec:
    return TaskSpec(
        name=name,
        hub_id="AI-Secure/adv_glue",
        hub_config=config or name,
        text_column=glue.text_column,
        text_pair_column=glue.text_pair_column,
        label_names=glue.label_names,
        metrics=("accuracy",),
        splits={"validation": "validation"},
        group="advglue",
        train_task=glue.name,
        note=f"Validation only: evaluate a model fine-tuned on {glue.name}.",
    )


def _anli(round_: int) -> TaskSpec:
    return TaskSpec(
        name=f"anli_r{round_}",
        hub_id="facebook/anli",
        hub_config=None,
        text_column="premise",
        text_pair_column="hypothesis",
        label_names=("entailment", "neutral", "contradiction"),
        metrics=("accuracy",),
        splits={"train": f"train_r{round_}", "validation": f"dev_r{round_}", "test": f"test_r{round_}"},
        group="anli",
    )


NLI3 = ("entailment", "neutral", "contradiction")
COLA = _glue("cola", ("sentence", None), ("unacceptable", "acceptable"), ("mcc", "accuracy"))
SST2 = _glue("sst2", ("sentence", None), ("negative", "positive"), ("accuracy",))
MRPC = _glue("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy"))
STSB = _glue("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearman"))
QQP = _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"))
MNLI = TaskSpec(
    name="mnli",
    hub_id="nyu-mll/glue",
    hub_config="mnli",
    text_column="premise",
    text_pair_column="hypothesis",
    label_names=NLI3,
    metrics=("accuracy",),
    splits={
        "train": "train",
        "validation": "validation_matched",
        "mismatched": "validation_mismatched",
        "test": "test_matched",
    },
    note="validation = matched; the mismatched dev set is reported as mismatched_<metric>.",
)
QNLI = _glue("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",))
RTE = _glue("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",))
WNLI = _glue("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",))

_TASKS: list[TaskSpec] = [
    COLA,
    SST2,
    MRPC,
    STSB,
    QQP,
    MNLI,
    QNLI,
    RTE,
    WNLI,
    _adv("adv_sst2", SST2),
    _adv("adv_qqp", QQP),
    _adv("adv_mnli", MNLI),
    _adv("adv_mnli_mismatched", MNLI),
    _adv("adv_qnli", QNLI),
    _adv("adv_rte", RTE),
    _anli(1),
    _anli(2),
    _anli(3),
    TaskSpec(
        name="imdb",
        hub_id="stanfordnlp/imdb",
        hub_config=None,
        text_column="text",
        text_pair_column=None,
        label_names=("neg", "pos"),
        metrics=("accuracy", "f1"),
        splits={"train": "train", "test": "test"},
        group="generalization",
        note="No validation split on the Hub: data.validation_ratio of train is held out (seeded); test is kept apart.",
    ),
    TaskSpec(
        name="ag_news",
        hub_id="fancyzhx/ag_news",
        hub_config=None,
        text_column="text",
        text_pair_column=None,
        label_names=("World", "Sports", "Business", "Sci/Tech"),
        metrics=("accuracy", "f1"),
        splits={"train": "train", "test": "test"},
        group="generalization",
        note="No validation split on the Hub: data.validation_ratio of train is held out (seeded); test is kept apart.",
    ),
    TaskSpec(
        name="paws",
        hub_id="google-research-datasets/paws",
        hub_config="labeled_final",
        text_column="sentence1",
        text_pair_column="sentence2",
        label_names=("0", "1"),
        metrics=("accuracy", "f1"),
        splits={"train": "train", "validation": "validation", "test": "test"},
        group="generalization",
        note="Label 1 = paraphrase; used in uegr13 as an out-of-distribution set for QQP models (QQP's duplicate = 1).",
    ),
    TaskSpec(
        name="hans",
        hub_id="jhu-cogsci/hans",
        hub_config=None,
        text_column="premise",
        text_pair_column="hypothesis",
        label_names=("entailment", "non-entailment"),
        metrics=("accuracy",),
        splits={"validation": "validation"},
        group="robustness",
        train_task="mnli",
        prediction_map=(0, 1, 1),
        note="Evaluation only, with an MNLI model: neutral and contradiction both count as non-entailment.",
    ),
]

TASKS: dict[str, TaskSpec] = {t.name: t for t in _TASKS}

UEGR13 = (
    *("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"),
    *("anli_r1", "anli_r2", "anli_r3"),
    *("imdb", "ag_news"),
)
ROBUSTNESS_SETS: dict[str, tuple[str, ...]] = {
    "sst2": ("adv_sst2",),
    "qqp": ("adv_qqp", "paws"),
    "mnli": ("adv_mnli", "adv_mnli_mismatched", "hans"),
    "qnli": ("adv_qnli",),
    "rte": ("adv_rte",),
}
"""Training task -> evaluation-only / out-of-distribution sets scored with its model."""
SUITES: dict[str, tuple[str, ...]] = {"uegr13": UEGR13, "glue": tuple(t.name for t in _TASKS[:9])}


def get_task(name: str) -> TaskSpec:
    """The registered task `name`; a DataError lists the known names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def trainable_task(name: str) -> TaskSpec:
    """The registered task `name`, refused (DataError) when it has no training split (AdvGLUE, HANS)."""
    spec = get_task(name)
    if spec.eval_only:
        raise DataError(
            f"task {spec.name} is evaluation-only (splits: {', '.join(spec.splits)}): fine-tune on "
            f"{spec.train_task} and evaluate with `uegr-eval --task {spec.name}`"
        )
    return spec


def _read_local(path: Path, spec: TaskSpec, roles: list[str]) -> Mapping[str, datasets.Dataset]:
    """A local copy (Hub split name -> Dataset): a `save_to_disk` folder, a GLUE TSV folder, AdvGLUE's dev.json
    (uegr_dist.data.layouts), or a folder of data files named after the Hub splits."""
    import datasets

    if not path.exists():
        raise DataError(f"data.task_path = {str(path)!r}: does not exist")
    if spec.name in layouts.ADVGLUE_KEYS and (file := layouts.advglue_file(path)) is not None:
        return layouts.read_advglue(file, spec)
    if path.is_file():
        raise DataError(
            f"data.task_path = {str(path)!r}: a file; task {spec.name} takes {layouts.accepted_layouts(spec)}"
        )
    if (path / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(path))
    if (folder := layouts.glue_folder(path, spec)) is not None:
        return layouts.read_glue_folder(folder, spec, roles)
    try:
        return datasets.load_dataset(str(path))
    except Exception as err:  # datasets raises several types for an unreadable folder
        raise DataError(
            f"data.task_path = {str(path)!r}: not a readable copy of {spec.hub_id}: {err}. Task {spec.name} takes "
            f"{layouts.accepted_layouts(spec)}"
        ) from err


def load_task_splits(
    spec: TaskSpec, path: str | None = None, roles: list[str] | None = None
) -> dict[str, datasets.Dataset]:
    """Role -> Dataset for the task's splits (all roles by default), from `path` or else from the Hub.

    The features are checked against the registry (text columns present; ClassLabel names equal to `label_names`),
    so a local copy shaped differently from the Hub dataset fails here, naming the difference."""
    import datasets

    roles = roles or list(spec.splits)
    if path is not None:
        data = _read_local(Path(path), spec, roles)
    else:
        try:
            data = datasets.load_dataset(spec.hub_id, spec.hub_config)
        except Exception as err:  # offline, unknown id, ...: name the dataset and the way out
            raise DataError(
                f"task {spec.name}: could not load {spec.hub_id}"
                f"{f' ({spec.hub_config})' if spec.hub_config else ''} from the Hub: {err}. Without Hub access, save "
                "the dataset elsewhere (DatasetDict.save_to_disk) and pass --data.task_path DIR (it takes "
                f"{layouts.accepted_layouts(spec)})"
            ) from err
    where = path or spec.hub_id
    out = {}
    for role in roles:
        split = spec.splits[role]
        if split not in data:
            hint = f"; task_path takes {layouts.accepted_layouts(spec)}" if path is not None else ""
            raise DataError(f"task {spec.name}: {where} has no split {split!r} (has: {', '.join(data)}){hint}")
        out[role] = data[split]
        try:
            check_features(spec, out[role], f"{where}[{split}]")
        except DataError as err:
            if path is None:
                raise
            raise DataError(f"{err}; task_path takes {layouts.accepted_layouts(spec)}") from None
    return out


def check_features(spec: TaskSpec, ds: datasets.Dataset, where: str) -> None:
    """Columns present, and the label names of a ClassLabel column equal to the registry's."""
    import datasets

    for column in (spec.text_column, spec.text_pair_column, spec.label_column):
        if column and column not in ds.column_names:
            columns = ", ".join(ds.column_names)
            raise DataError(f"task {spec.name}: {where} has no column {column!r} (columns: {columns})")
    feature = ds.features[spec.label_column]
    if isinstance(feature, datasets.ClassLabel) and spec.label_names is not None:
        if tuple(feature.names) != spec.label_names:
            raise DataError(
                f"task {spec.name}: {where} labels {feature.names} differ from the registry's {list(spec.label_names)}"
            )


def describe_tasks() -> str:
    """A plain-text table of the registry (for `uegr-train --list-tasks`)."""
    rows = [f"{'task':22} {'hub dataset':44} {'labels':8} {'metrics':18} splits"]
    for t in _TASKS:
        hub = t.hub_id + (f"/{t.hub_config}" if t.hub_config else "")
        labels = "regr." if t.regression else str(t.num_labels)
        rows.append(f"{t.name:22} {hub:44} {labels:8} {','.join(t.metrics):18} {','.join(t.splits)}")
    folders = ", ".join(layout.folder for layout in layouts.GLUE_LAYOUTS.values())
    rows += [
        "",
        "Without Hub access, --data.task_path (uegr-eval --task-path) takes a local copy:",
        "  any task     a DatasetDict.save_to_disk folder, or a folder of the Hub repository's data files",
        "  GLUE tasks   the task's folder of the GLUE download (https://gluebenchmark.com/tasks) or the folder holding",
        f"               it: {folders}",
        "               (train.tsv, dev.tsv; MNLI dev_matched.tsv, dev_mismatched.tsv); the test split is a labelled",
        "               test_labeled.tsv (GLUE's own test.tsv has no labels and is never scored)",
        "  adv_* tasks  AdvGLUE's dev.json (https://adversarialglue.github.io/) or a folder holding it",
    ]
    return "\n".join(rows)
