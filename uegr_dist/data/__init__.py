"""Data: the task registry, local files, tokenization, batching.

Names are imported on first use: `uegr_dist.data.errors` and the registry (`uegr_dist.data.tasks`) load without
`datasets` or torch, so the command-line tools answer `--help`, `--list-tasks` and bad input at once."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "uegr_dist.data.errors",
    "LengthGroupedSampler": "uegr_dist.data.sampling",
    "ROBUSTNESS_SETS": "uegr_dist.data.tasks",
    "SUITES": "uegr_dist.data.tasks",
    "TASKS": "uegr_dist.data.tasks",
    "TaskSpec": "uegr_dist.data.tasks",
    "get_task": "uegr_dist.data.tasks",
    "load_task_splits": "uegr_dist.data.tasks",
    "PaddingCollator": "uegr_dist.data.text_classification",
    "RawTask": "uegr_dist.data.text_classification",
    "TaskData": "uegr_dist.data.text_classification",
    "load_raw_task": "uegr_dist.data.text_classification",
    "load_text_classification": "uegr_dist.data.text_classification",
    "prepare_task": "uegr_dist.data.text_classification",
    "read_table": "uegr_dist.data.text_classification",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'uegr_dist.data' has no attribute {name!r}")
