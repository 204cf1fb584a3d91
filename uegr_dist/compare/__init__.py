"""`uegr-compare`: methods x tasks x seeds on the same engine, with tables and plots."""

from uegr_dist.compare.report import aggregate, markdown_table, write_results
from uegr_dist.compare.runner import collect, eval_targets, execute
from uegr_dist.compare.suite import Robustness, Run, Suite, load_suite

__all__ = [
    "Robustness",
    "Run",
    "Suite",
    "aggregate",
    "collect",
    "eval_targets",
    "execute",
    "load_suite",
    "markdown_table",
    "write_results",
]
