"""JS divergence and prediction variance agree with a float64 reference and behave at the edges."""

from __future__ import annotations

import math

import pytest
import torch

from uegr_dist.forward import js_divergence, prediction_variance


def reference_js(logits: torch.Tensor) -> torch.Tensor:
    """H(mean_k P_k) - mean_k H(P_k) in float64, written out directly (0 log 0 = 0)."""
    probs = torch.softmax(logits.double(), dim=-1)

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(dim=-1)

    return entropy(probs.mean(dim=0)) - entropy(probs).mean(dim=0)


def test_matches_float64_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    for k in (2, 3, 4):
        logits = 3.0 * torch.randn(k, 16, 5, generator=generator)
        torch.testing.assert_close(js_divergence(logits).double(), reference_js(logits), atol=1e-6, rtol=1e-5)


def test_zero_for_identical_and_for_one_model() -> None:
    logits = torch.randn(1, 6, 4)
    assert (js_divergence(logits) == 0).all()
    torch.testing.assert_close(js_divergence(logits.repeat(3, 1, 1)), torch.zeros(6), atol=1e-6, rtol=0)


def test_symmetric_under_permutation_and_bounded_by_log_k() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = 5.0 * torch.randn(4, 10, 3, generator=generator)
    js = js_divergence(logits)
    torch.testing.assert_close(js_divergence(logits[[2, 0, 3, 1]]), js, atol=1e-6, rtol=0)
    assert (js >= -1e-6).all() and (js <= math.log(4) + 1e-6).all()
    # K one-hot predictions on K different classes reach the bound log K.
    one_hot = torch.full((4, 1, 4), -1e4)
    one_hot[torch.arange(4), 0, torch.arange(4)] = 1e4
    torch.testing.assert_close(js_divergence(one_hot), torch.tensor([math.log(4)]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_gradients_finite_even_for_saturated_logits(scale: float) -> None:
    logits = (scale * torch.tensor([[[1.0, -1.0, 0.0]], [[-1.0, 1.0, 0.0]], [[1.0, 1.0, -1.0]]])).requires_grad_(True)
    js = js_divergence(logits)
    js.sum().backward()
    assert torch.isfinite(js).all() and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(js.double(), reference_js(logits.detach()), atol=1e-5, rtol=1e-5)


def test_half_precision_is_upcast() -> None:
    logits = torch.randn(2, 5, 3)
    js = js_divergence(logits.half())
    assert js.dtype == torch.float32
    torch.testing.assert_close(js.double(), reference_js(logits.half().float()), atol=1e-6, rtol=1e-5)


def test_prediction_variance_is_population_variance() -> None:
    preds = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 0.0]])
    torch.testing.assert_close(prediction_variance(preds), torch.tensor([1.0, 0.0, 0.0]))
    assert (prediction_variance(preds[:1]) == 0).all()
    with pytest.raises(ValueError, match="\\[K, B\\]"):
        prediction_variance(torch.zeros(3))
    with pytest.raises(ValueError, match="\\[K, B, C\\]"):
        js_divergence(torch.zeros(3, 4))
