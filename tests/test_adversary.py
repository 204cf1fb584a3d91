"""Adversarial embedding perturbation: inside the eps-ball, raises the loss, zero on pads, no parameter gradients."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig

from uegr_dist.forward import perturb_embeddings
from uegr_dist.forward.adversary import embedding_scale
from uegr_dist.rng import keyed_uniform

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_task() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seeded random tiny BERT in eval mode, clean embeddings [8, 12, 32], a padded mask and labels."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
        initializer_range=0.2,  # larger than default so the loss surface is not flat around a random init
    )
    model = AutoModelForSequenceClassification.from_config(config).eval()
    ids = torch.randint(5, 100, (8, 12))
    mask = torch.ones(8, 12, dtype=torch.long)
    mask[2, 9:] = 0
    mask[5, 4:] = 0
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    labels = torch.randint(0, 3, (8,))
    return model, embeds, mask, labels


def per_example_loss(
    model: nn.Module, mask: torch.Tensor, labels: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda e: F.cross_entropy(model(inputs_embeds=e, attention_mask=mask).logits, labels, reduction="none")


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_delta_stays_in_ball_and_increases_loss(norm: str) -> None:
    model, embeds, mask, labels = tiny_task()
    losses = per_example_loss(model, mask, labels)
    eps = 1.0 if norm == "l2" else 0.05
    delta = perturb_embeddings(
        lambda e: losses(e).sum(), embeds, mask, eps=eps, step_size=eps, steps=3, norm=norm, row_keys=torch.arange(8)
    )
    assert delta.shape == embeds.shape and not delta.requires_grad
    size = delta.flatten(1).norm(dim=1) if norm == "l2" else delta.flatten(1).abs().amax(dim=1)
    assert (size <= eps * (1 + 1e-5)).all()
    assert (size > 0.5 * eps).all()  # the ascent steps reach the boundary region, not stuck at the tiny init
    with torch.no_grad():
        increase = losses(embeds + delta) - losses(embeds)
    assert increase.mean() > 0.05
    assert (increase > 0).float().mean() >= 0.75


def test_pad_positions_are_exactly_zero_and_no_parameter_grad() -> None:
    model, embeds, mask, labels = tiny_task()
    losses = per_example_loss(model, mask, labels)
    for norm in ("l2", "linf"):
        delta = perturb_embeddings(lambda e: losses(e).mean(), embeds, mask, eps=0.5, step_size=0.5, steps=2, norm=norm)
        assert (delta[mask == 0] == 0).all()
        assert (delta[mask == 1] != 0).any(dim=-1).all()
    assert all(p.grad is None for p in model.parameters())


def test_keyed_init_is_deterministic_and_steps_zero_returns_projected_init() -> None:
    model, embeds, mask, labels = tiny_task()
    losses = per_example_loss(model, mask, labels)
    keys = torch.arange(8) + 40
    kwargs = {"eps": 0.3, "step_size": 0.1, "steps": 2, "row_keys": keys, "key": 11}
    first = perturb_embeddings(lambda e: losses(e).sum(), embeds, mask, **kwargs)
    torch.manual_seed(99)  # the global RNG must not matter when row keys are given
    torch.testing.assert_close(perturb_embeddings(lambda e: losses(e).sum(), embeds, mask, **kwargs), first)

    init = perturb_embeddings(lambda e: losses(e).sum(), embeds, mask, eps=10.0, step_size=0.1, steps=0, row_keys=keys)
    assert init.abs().max() <= 1e-3
    assert init.abs().max() > 5e-4
    assert (init[mask == 0] == 0).all()
    # Row r's start depends only on its own key: a batch with one row's key changed differs only in that row.
    other_keys = keys.clone()
    other_keys[3] = 7
    other = perturb_embeddings(
        lambda e: losses(e).sum(), embeds, mask, eps=10.0, step_size=0.1, steps=0, row_keys=other_keys
    )
    changed = (other != init).flatten(1).any(dim=1)
    assert changed.tolist() == [i == 3 for i in range(8)]
    # A start bigger than the ball is projected into it.
    big = perturb_embeddings(
        lambda e: losses(e).sum(), embeds, mask, eps=0.01, step_size=0.1, steps=0, init_scale=1.0, row_keys=keys
    )
    assert (big.flatten(1).norm(dim=1) <= 0.01 * (1 + 1e-5)).all()


def relative_reference(losses, embeds, mask, *, eps, step_size, steps, norm, init_scale, keys, key):
    """Slow reference of relative=True: one example at a time, its own radius, step and start size from its token
    embeddings (l2: their norm; linf and the start: their root mean square coordinate), plain loops in float64."""
    deltas = []
    for i in range(embeds.shape[0]):
        tokens = embeds[i][mask[i] == 1].double()  # [n_i, D]
        size = tokens.norm().item()
        rms = (tokens.pow(2).mean()).sqrt().item()
        unit = size if norm == "l2" else rms
        radius, stride = eps * unit, step_size * unit
        token = mask[i].double().view(-1, 1)
        uniform = keyed_uniform(key, keys[i : i + 1], tuple(embeds.shape[1:]))[0].double()

        def project(d, radius=radius):
            if norm == "linf":
                return d.clamp(-radius, radius)
            length = d.norm().item()
            return d * min(1.0, radius / (length + 1e-12))

        delta = project((2.0 * uniform - 1.0) * init_scale * rms * token)
        for _ in range(steps):
            d = delta.float().requires_grad_(True)
            perturbed = embeds.clone()
            perturbed[i] = embeds[i] + d
            (grad,) = torch.autograd.grad(losses(perturbed)[i], d)
            grad = grad.double() * token
            scale = grad.norm() if norm == "l2" else grad.abs().max()
            delta = project(delta + stride * grad / (scale + 1e-12))
        deltas.append(delta.float())
    return torch.stack(deltas)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_relative_eps_equals_per_example_reference_and_scales_with_the_embeddings(norm: str) -> None:
    model, embeds, mask, labels = tiny_task()
    losses = per_example_loss(model, mask, labels)
    keys = torch.arange(8) + 3
    kwargs = {"eps": 0.3 if norm == "l2" else 0.5, "step_size": 0.2, "steps": 2, "norm": norm, "init_scale": 0.1}
    fast = perturb_embeddings(lambda e: losses(e).sum(), embeds, mask, row_keys=keys, key=5, relative=True, **kwargs)
    slow = relative_reference(losses, embeds, mask, keys=keys, key=5, **kwargs)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6)
    token = mask.unsqueeze(-1).float()
    size, rms = embedding_scale(embeds, token)
    bound = kwargs["eps"] * (size if norm == "l2" else rms)
    reached = fast.flatten(1).norm(dim=1) if norm == "l2" else fast.flatten(1).abs().amax(dim=1)
    assert (reached <= bound * (1 + 1e-5)).all() and (reached > 0.5 * bound).all()
    assert (fast[mask == 0] == 0).all()
    # The ball follows the embeddings' scale: twice the embeddings (a loss of e / 2, so the same landscape), twice
    # the perturbation. An absolute eps does not move.
    doubled = perturb_embeddings(
        lambda e: losses(e / 2).sum(), 2 * embeds, mask, row_keys=keys, key=5, relative=True, **kwargs
    )
    torch.testing.assert_close(doubled, 2 * fast, rtol=1e-4, atol=1e-6)


def test_zero_gradient_gives_finite_delta() -> None:
    _, embeds, mask, _ = tiny_task()
    for norm in ("l2", "linf"):
        delta = perturb_embeddings(lambda e: (e * 0.0).sum(), embeds, mask, eps=1.0, step_size=1.0, steps=2, norm=norm)
        assert torch.isfinite(delta).all()
        assert delta.abs().max() <= 1e-3


def test_bad_arguments_raise() -> None:
    _, embeds, mask, _ = tiny_task()

    def call(**overrides: object) -> None:
        kwargs = {"eps": 1.0, "step_size": 0.1, "steps": 1, **overrides}
        perturb_embeddings(lambda e: e.sum(), embeds, mask, **kwargs)

    with pytest.raises(ValueError, match="norm must be one of"):
        call(norm="l1")
    with pytest.raises(ValueError, match="eps must be >= 0"):
        call(eps=-1.0)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        call(steps=-1)
    with pytest.raises(ValueError, match="row_keys must be int64 \\[B\\]"):
        call(row_keys=torch.arange(3))
    with pytest.raises(ValueError, match="attention_mask must be"):
        perturb_embeddings(lambda e: e.sum(), embeds, mask[:, :5], eps=1.0, step_size=0.1, steps=1)
