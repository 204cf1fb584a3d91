"""Disagreement between the K dropout sub-models: generalized Jensen-Shannon divergence, prediction variance."""

from __future__ import annotations

import math

import torch


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or unchanged when it is already float32 or wider (float64): losses and divergences of a bf16 or
    fp16 model are computed in float32, those of a float64 model (parity tests) stay in float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def js_divergence(logits: torch.Tensor) -> torch.Tensor:
    """Generalized JS divergence H(mean_k P_k) - mean_k H(P_k) in nats, P_k = softmax(logits[k]): [K, B, C] -> [B].

    Computed in float32 (float64 for float64 logits) from log-probabilities as the equal form mean_k KL(P_k || M),
    which avoids subtracting two large entropies and stays finite (values and gradients) when probabilities
    underflow to 0.
    """
    if logits.dim() != 3:
        raise ValueError(f"js_divergence: logits must be [K, B, C], got shape {tuple(logits.shape)}")
    log_p = torch.log_softmax(at_least_float32(logits), dim=-1)
    log_m = torch.logsumexp(log_p, dim=0) - math.log(logits.shape[0])
    return (log_p.exp() * (log_p - log_m)).sum(dim=-1).mean(dim=0)


def prediction_variance(preds: torch.Tensor) -> torch.Tensor:
    """Population variance over the K sub-models of regression outputs (float32): [K, B] -> [B]."""
    if preds.dim() != 2:
        raise ValueError(f"prediction_variance: preds must be [K, B], got shape {tuple(preds.shape)}")
    return at_least_float32(preds).var(dim=0, correction=0)


def symmetric_kl(
    logits_a: torch.Tensor, logits_b: torch.Tensor, *, stop_gradient_targets: bool = False
) -> torch.Tensor:
    """KL(P_a || P_b) + KL(P_b || P_a) in nats, P = softmax(logits) (float32): [B, C], [B, C] -> [B].

    stop_gradient_targets: each KL takes its first argument (the target distribution) as a constant, so gradients
    reach each side only through its log-probabilities (SMART's form; the value is unchanged).
    """
    if logits_a.shape != logits_b.shape or logits_a.dim() != 2:
        raise ValueError(
            f"symmetric_kl: logits must both be [B, C], got {tuple(logits_a.shape)} and {tuple(logits_b.shape)}"
        )
    log_a = torch.log_softmax(at_least_float32(logits_a), dim=-1)
    log_b = torch.log_softmax(at_least_float32(logits_b), dim=-1)
    target_a, target_b = (log_a.detach(), log_b.detach()) if stop_gradient_targets else (log_a, log_b)
    kl_ab = (target_a.exp() * (target_a - log_b)).sum(dim=-1)
    kl_ba = (target_b.exp() * (target_b - log_a)).sum(dim=-1)
    return kl_ab + kl_ba
