"""Classification and regression metrics computed locally (scikit-learn / scipy; no metric downloads)."""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn import metrics as skm


def classification_metrics(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """predictions, labels: int [N] -> accuracy, F1 (binary for 2 classes, else macro) and Matthews correlation."""
    average = "binary" if num_labels == 2 else "macro"
    return {
        "accuracy": float(skm.accuracy_score(labels, predictions)),
        "f1": float(skm.f1_score(labels, predictions, average=average, zero_division=0)),
        "mcc": float(skm.matthews_corrcoef(labels, predictions)),
    }


def regression_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """predictions, labels: float [N] -> Pearson and Spearman correlation and MSE."""
    constant = np.ptp(predictions) == 0 or np.ptp(labels) == 0
    return {
        "pearson": 0.0 if constant else float(stats.pearsonr(predictions, labels)[0]),
        "spearman": 0.0 if constant else float(stats.spearmanr(predictions, labels)[0]),
        "mse": float(np.mean((predictions - labels) ** 2)),
    }
