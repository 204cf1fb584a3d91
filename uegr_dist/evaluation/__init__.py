"""Evaluation: local metrics and the evaluation pass."""

from uegr_dist.evaluation.metrics import classification_metrics, regression_metrics

__all__ = ["classification_metrics", "regression_metrics"]
