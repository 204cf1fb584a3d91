"""Adversarial embedding perturbation (docs/design.md §1.1): normalized gradient ascent on delta, projected onto an
eps-ball."""

from __future__ import annotations

from collections.abc import Callable

import torch

from uegr_dist.rng import keyed_uniform

NORMS = ("l2", "linf")
# Keeps g / ||g|| and eps / ||delta|| finite when a gradient or a perturbation is exactly zero.
_TINY = 1e-12


def perturb_embeddings(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "l2",
    init_scale: float = 1e-3,
    row_keys: torch.Tensor | None = None,
    key: int = 0,
    relative: bool = False,
) -> torch.Tensor:
    """Perturbation delta [B, S, D] (detached, zero on pads) that increases loss_fn(embeds [B, S, D] + delta).

    attention_mask [B, S] (1 = token, 0 = pad); loss_fn maps perturbed embeddings to a scalar. Only delta gets a
    gradient (torch.autograd.grad): parameter `.grad` fields are never touched. row_keys int64 [B] make the random
    start reproducible per sample (keyed_uniform(key, row_keys, (S, D))); None draws it from the global torch RNG.

    relative: eps, step_size and init_scale are fractions of each example's own embedding size instead of absolute
    embedding units (`embedding_scale`): for l2, eps and step_size are multiplied by the L2 norm of the example's
    embeddings over its tokens, ||e_i||; for linf, and init_scale in both norms, by their root mean square
    coordinate, ||e_i|| / sqrt(n_tokens_i * D). So the ball keeps the same size relative to the text whatever its
    length and the model's embedding scale.
    """
    _check_arguments(embeds, attention_mask, eps, step_size, steps, norm, init_scale, row_keys)
    clean = embeds.detach()
    # Work in float32 so the norms and the tiny guard are exact enough under half-precision embeddings.
    token = attention_mask.to(device=clean.device, dtype=torch.float32).unsqueeze(-1)
    if row_keys is None:
        uniform = torch.rand(clean.shape, device=clean.device)
    else:
        uniform = keyed_uniform(key, row_keys.to(clean.device), tuple(clean.shape[1:]))
    radius: float | torch.Tensor = eps
    stride: float | torch.Tensor = step_size
    start: float | torch.Tensor = init_scale
    if relative:
        size, rms = embedding_scale(clean, token)
        radius, stride = (eps * size, step_size * size) if norm == "l2" else (eps * rms, step_size * rms)
        start = init_scale * rms
    delta = _project((2.0 * uniform - 1.0) * _per_example(start) * token, radius, norm)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(clean + delta.to(clean.dtype))
        (grad,) = torch.autograd.grad(loss, delta)
        delta = _project(delta.detach() + _per_example(stride) * _normalize(grad * token, norm), radius, norm)
    return delta.detach().to(clean.dtype)


def embedding_scale(embeds: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example of embeds [B, S, D] with token [B, S, 1] (1 = token, 0 = pad): the L2 norm of its token
    embeddings [B] and their root mean square coordinate [B] (float32; norm / sqrt(n_tokens * D))."""
    masked = embeds.to(torch.float32) * token
    size = masked.flatten(1).norm(dim=1)
    count = token.flatten(1).sum(dim=1).clamp(min=1.0) * embeds.shape[-1]
    return size, size / count.sqrt()


def _per_example(value: float | torch.Tensor) -> float | torch.Tensor:
    """A per-example tensor [B] as [B, 1, 1] (broadcasts over [B, S, D]); a float unchanged."""
    return value.view(-1, 1, 1) if isinstance(value, torch.Tensor) else value


def _normalize(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """grad [B, S, D] divided per example by its L2 norm ("l2") or its max |entry| ("linf")."""
    flat = grad.flatten(1)
    scale = flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)
    return grad / (scale + _TINY).view(-1, 1, 1)


def _project(delta: torch.Tensor, eps: float | torch.Tensor, norm: str) -> torch.Tensor:
    """delta [B, S, D] projected per example onto the eps-ball of `norm` (eps a float, or a tensor [B] of radii)."""
    if norm == "linf":
        if isinstance(eps, torch.Tensor):
            bound = eps.view(-1, 1, 1)
            return torch.maximum(torch.minimum(delta, bound), -bound)
        return delta.clamp(-eps, eps)
    length = delta.flatten(1).norm(dim=1)
    return delta * (eps / (length + _TINY)).clamp(max=1.0).view(-1, 1, 1)


def _check_arguments(
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    norm: str,
    init_scale: float,
    row_keys: torch.Tensor | None,
) -> None:
    """Fail early with the bad argument, its value and what is allowed."""
    if norm not in NORMS:
        raise ValueError(f"perturb_embeddings: norm must be one of {NORMS}, got {norm!r}")
    if embeds.dim() != 3:
        raise ValueError(f"perturb_embeddings: embeds must be [B, S, D], got shape {tuple(embeds.shape)}")
    if tuple(attention_mask.shape) != tuple(embeds.shape[:2]):
        raise ValueError(
            f"perturb_embeddings: attention_mask must be [B, S] = {tuple(embeds.shape[:2])}, "
            f"got {tuple(attention_mask.shape)}"
        )
    for name, value in (("eps", eps), ("step_size", step_size), ("init_scale", init_scale)):
        if not value >= 0.0:
            raise ValueError(f"perturb_embeddings: {name} must be >= 0, got {value!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"perturb_embeddings: steps must be an int >= 0, got {steps!r}")
    if row_keys is not None and tuple(row_keys.shape) != (embeds.shape[0],):
        raise ValueError(
            f"perturb_embeddings: row_keys must be int64 [B] = [{embeds.shape[0]}], got {tuple(row_keys.shape)}"
        )
