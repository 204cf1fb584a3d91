"""Data: local files, tokenization, batching."""

from uegr_dist.data.text_classification import (
    DataError,
    PaddingCollator,
    TaskData,
    load_text_classification,
    read_table,
)

__all__ = ["DataError", "PaddingCollator", "TaskData", "load_text_classification", "read_table"]
