"""Disagreement between the K dropout sub-models: generalized Jensen-Shannon divergence, prediction variance."""

from __future__ import annotations

import math

import torch


def js_divergence(logits: torch.Tensor) -> torch.Tensor:
    """Generalized JS divergence H(mean_k P_k) - mean_k H(P_k) in nats, P_k = softmax(logits[k]): [K, B, C] -> [B].

    Computed in float32 from log-probabilities as the equal form mean_k KL(P_k || M), which avoids subtracting two
    large entropies and stays finite (values and gradients) when probabilities underflow to 0.
    """
    if logits.dim() != 3:
        raise ValueError(f"js_divergence: logits must be [K, B, C], got shape {tuple(logits.shape)}")
    log_p = torch.log_softmax(logits.float(), dim=-1)
    log_m = torch.logsumexp(log_p, dim=0) - math.log(logits.shape[0])
    return (log_p.exp() * (log_p - log_m)).sum(dim=-1).mean(dim=0)


def prediction_variance(preds: torch.Tensor) -> torch.Tensor:
    """Population variance over the K sub-models of regression outputs (float32): [K, B] -> [B]."""
    if preds.dim() != 2:
        raise ValueError(f"prediction_variance: preds must be [K, B], got shape {tuple(preds.shape)}")
    return preds.float().var(dim=0, correction=0)
