"""Data: the task registry, local files, tokenization, batching."""

from uegr_dist.data.errors import DataError
from uegr_dist.data.sampling import LengthGroupedSampler
from uegr_dist.data.tasks import ROBUSTNESS_SETS, SUITES, TASKS, TaskSpec, get_task, load_task_splits
from uegr_dist.data.text_classification import (
    PaddingCollator,
    RawTask,
    TaskData,
    load_raw_task,
    load_text_classification,
    prepare_task,
    read_table,
)

__all__ = [
    "DataError",
    "LengthGroupedSampler",
    "PaddingCollator",
    "ROBUSTNESS_SETS",
    "RawTask",
    "SUITES",
    "TASKS",
    "TaskData",
    "TaskSpec",
    "get_task",
    "load_raw_task",
    "load_task_splits",
    "load_text_classification",
    "prepare_task",
    "read_table",
]
