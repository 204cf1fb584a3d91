"""ChildTuning-F (Xu et al., "Raise a Child in Large Language Model: Towards Effective and Generalizable
Fine-tuning", EMNLP 2021), task-free variant.

Every step each gradient coordinate is kept with probability p_F: g <- g * m / p_F, m ~ Bernoulli(p_F), before
AdamW (as the official ChildTuningAdamW, over every trainable parameter). The Bernoulli draws are keyed by (seed,
step, canonical coordinate position) (`uegr_dist.rng`), so all ranks and ZeRO shards draw the same mask for the same
coordinate and a multi-process run equals the one-process run. Deviation: clipping sees the masked gradient.
"""

from __future__ import annotations

import torch

from uegr_dist.backward.masking import MaskLayout
from uegr_dist.backward.radix_select import AllReduceSum
from uegr_dist.config import MethodConfig
from uegr_dist.methods.coordinate_mask import CoordinateMaskMethod
from uegr_dist.rng import keyed_uniform_flat, mix_key

CHILDTUNING_F_STREAM = 0x43544646  # keeps these draws apart from other users of the same seed and step


def keyed_bernoulli_uniforms(key: int, layout: MaskLayout, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) numbers (float32 [n]) of this rank's coordinates, keyed by their global positions."""
    runs = zip(layout.position_runs.tolist(), layout.run_sizes)
    parts = [keyed_uniform_flat(key, position, size, device=device) for (_, position), size in runs]
    return torch.cat(parts) if parts else torch.zeros(0, device=device)


class ChildTuningF(CoordinateMaskMethod):
    """Per-step Bernoulli(p_F) gradient mask, rescaled by 1 / p_F."""

    name = "childtuning_f"

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__(cfg)
        self.p_f = cfg.childtuning.p_f

    def select(
        self, scores: torch.Tensor, layout: MaskLayout, step: int, all_reduce_sum: AllReduceSum | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """keep ~ Bernoulli(p_F) keyed by (seed, step, position); factors keep / p_F."""
        uniform = keyed_bernoulli_uniforms(mix_key(self.ctx.seed, CHILDTUNING_F_STREAM, step), layout, scores.device)
        keep = uniform < self.p_f
        return keep, keep.to(torch.float32) / self.p_f
