"""Random draws of the perturbation methods: keyed by (key, sample id) for reproducibility across process counts, or
from torch's global generator (cheaper)."""

from __future__ import annotations

import math

import torch

from uegr_dist.methods.base import model_inputs
from uegr_dist.rng import keyed_uniform


def uniform_noise(
    shape: tuple[int, ...], row_keys: torch.Tensor | None, key: int, device: torch.device | str
) -> torch.Tensor:
    """U[0, 1) float32 of `shape` = [B, ...]; row b depends only on (key, row_keys[b]) when row_keys [B] is given."""
    if row_keys is None:
        return torch.rand(shape, device=device)
    return keyed_uniform(key, row_keys.to(device), tuple(shape[1:]))


def normal_noise(
    shape: tuple[int, ...], row_keys: torch.Tensor | None, key: int, device: torch.device | str
) -> torch.Tensor:
    """N(0, 1) float32 of `shape` = [B, ...]; keyed draws use Box-Muller on two keyed uniforms per entry."""
    if row_keys is None:
        return torch.randn(shape, device=device)
    pair = keyed_uniform(key, row_keys.to(device), (2, *shape[1:]))
    radius = torch.sqrt(-2.0 * torch.log1p(-pair[:, 0]))  # 1 - u in (0, 1]: log is finite
    return radius * torch.cos(2.0 * math.pi * pair[:, 1])


def noise_row_keys(batch: dict[str, torch.Tensor], keyed: bool) -> torch.Tensor | None:
    """Sample ids [B] as row keys when keyed (method.rng = keyed), else None (global generator)."""
    return batch["sample_id"] if keyed else None


def embedding_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model keyword inputs other than input_ids (attention mask, token types) for an `inputs_embeds` forward."""
    return {name: value for name, value in model_inputs(batch).items() if name != "input_ids"}
