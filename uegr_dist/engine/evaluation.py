"""Evaluation during and after training: metrics over a whole split, gathered across processes."""

from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from uegr_dist.data import TaskData
from uegr_dist.evaluation import classification_metrics, regression_metrics
from uegr_dist.methods import model_inputs


def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader: DataLoader,
    task: TaskData,
    extra_loaders: dict[str, DataLoader] | None = None,
) -> dict[str, float]:
    """Metrics over the whole validation split (gathered across processes without duplicates); the metrics of an
    extra split (MNLI mismatched) are prefixed with its name."""
    metrics = _evaluate_split(accelerator, model, loader, task)
    for name, extra in (extra_loaders or {}).items():
        metrics.update({f"{name}_{k}": v for k, v in _evaluate_split(accelerator, model, extra, task).items()})
    return metrics


def _evaluate_split(
    accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader, task: TaskData
) -> dict[str, float]:
    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for batch in loader:
            logits = model(**model_inputs(batch)).logits
            out = logits[:, 0] if task.regression else logits.argmax(dim=-1)
            out, lab = accelerator.gather_for_metrics((out, batch["labels"]))
            preds.append(out.float().cpu().numpy())
            labels.append(lab.float().cpu().numpy())
    model.train()
    p, y = np.concatenate(preds), np.concatenate(labels)
    if task.regression:
        return regression_metrics(p, y)
    return classification_metrics(p.astype(np.int64), y.astype(np.int64), task.num_labels)
