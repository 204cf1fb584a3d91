"""Local metrics agree with scikit-learn / scipy on random predictions."""

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from uegr_dist.evaluation import classification_metrics, regression_metrics


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    for num_labels in (2, 3):
        labels = rng.integers(0, num_labels, 200)
        preds = np.where(rng.random(200) < 0.7, labels, rng.integers(0, num_labels, 200))
        got = classification_metrics(preds, labels, num_labels)
        average = "binary" if num_labels == 2 else "macro"
        assert got["accuracy"] == skm.accuracy_score(labels, preds)
        assert got["f1"] == skm.f1_score(labels, preds, average=average)
        assert got["mcc"] == skm.matthews_corrcoef(labels, preds)
        assert 0.6 < got["accuracy"] < 0.95


def test_regression_metrics_match_scipy_and_handle_constant_predictions():
    rng = np.random.default_rng(1)
    labels = rng.normal(size=100)
    preds = labels + rng.normal(scale=0.5, size=100)
    got = regression_metrics(preds, labels)
    assert np.isclose(got["pearson"], stats.pearsonr(preds, labels)[0])
    assert np.isclose(got["spearman"], stats.spearmanr(preds, labels)[0])
    assert np.isclose(got["mse"], np.mean((preds - labels) ** 2))
    assert regression_metrics(np.zeros(100), labels)["pearson"] == 0.0
