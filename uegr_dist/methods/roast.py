"""RoAST's selective training (Kim et al., "RoAST: Robustifying Language Models via Adversarial Perturbation with
Selective Training", Findings of EMNLP 2023): the gradient-masking half of RoAST (its adversarial perturbation is
the adversary of `uegr`/FreeLB and is not part of this method).

Importance of an encoder-layer coordinate (`include`) = its Fisher information: before the first epoch from a
pre-pass over the training set (as ChildTuning-D), then the mean of g^2 of the reduced training gradients over the
previous epoch. From it, per epoch: relative rank r in [0, 1] (1 = most important), keep probability
p = sigmoid(2 * beta * (r - alpha)); every step (`redraw: step`, or once per epoch with `redraw: epoch`) the mask
m ~ Bernoulli(p) multiplies the gradient (divided by p with `scale: true`) before AdamW.

Deviations: the ranks are average ranks of the importance rounded to its top 16 bits (a relative resolution of
2**-7, `relative_rank`: exact and identical across ZeRO shards without gathering); the Bernoulli draws are keyed by
(seed, step or epoch, canonical position) so every process count draws the same mask; `scale` defaults to false (a
rarely kept coordinate would get its gradient multiplied by up to 1 / sigmoid(-2 beta alpha) ~ 6e7 at the paper's
alpha, beta). Not under ZeRO-3 (the Fisher pre-pass needs whole parameters: start-up error).
"""

from __future__ import annotations

from typing import Any

import torch

from uegr_dist.backward import relative_rank
from uegr_dist.backward.masking import MaskLayout
from uegr_dist.backward.radix_select import AllReduceSum
from uegr_dist.config import MethodConfig
from uegr_dist.methods.base import MethodContext
from uegr_dist.methods.childtuning_f import keyed_bernoulli_uniforms
from uegr_dist.methods.coordinate_mask import CoordinateMaskMethod
from uegr_dist.rng import mix_key

ROAST_STREAM = 0x524F4153


def keep_probability(importance: torch.Tensor, alpha: float, beta: float, **rank_args: Any) -> torch.Tensor:
    """p = sigmoid(2 beta (r - alpha)) (float32 [n]) from importance [n] >= 0, r its relative rank (1 = largest)."""
    offsets = torch.tensor([0, importance.numel()], dtype=torch.int64, device=importance.device)
    rank = relative_rank(importance.contiguous(), offsets, **rank_args)
    return rank.sub_(alpha).mul_(2.0 * beta).sigmoid_()


class RoAST(CoordinateMaskMethod):
    """Bernoulli gradient mask from the relative rank of the epoch's Fisher information."""

    name = "roast"

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__(cfg)
        self.include = cfg.roast.include
        self.initial: torch.Tensor | None = None
        self.prob: torch.Tensor | None = None
        self.sum_sq: torch.Tensor | None = None
        self.count = 0
        self.epoch = 0

    @property
    def needs_whole_parameters(self) -> str | None:
        """The Fisher pre-pass runs on whole parameters."""
        return self.fisher_reason

    def prepare(self, ctx: MethodContext) -> None:
        """Fisher pre-pass: the importance of the first epoch (canonical order)."""
        self.initial = self.fisher(ctx)

    def select(
        self, scores: torch.Tensor, layout: MaskLayout, step: int, all_reduce_sum: AllReduceSum | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Refresh p at an epoch start, accumulate this step's g^2 [n], draw the keyed Bernoulli mask."""
        cfg = self.cfg.roast
        # steps_per_epoch 0 (not given): one epoch, the pre-pass importance throughout.
        per_epoch = self.ctx.data.steps_per_epoch if self.ctx.data is not None else 0
        epoch = step // per_epoch if per_epoch > 0 else 0
        if self.prob is None or (epoch != self.epoch and self.count > 0):
            if self.prob is None and self.sum_sq is None:
                assert self.initial is not None
                importance = layout.local_values(self.initial.to(scores.device))
                self.initial = None
            else:
                assert self.sum_sq is not None
                importance = self.sum_sq / max(self.count, 1)
            self.prob = keep_probability(importance, cfg.alpha, cfg.beta, all_reduce_sum=all_reduce_sum)
            self.sum_sq, self.count, self.epoch = torch.zeros_like(scores), 0, epoch
        assert self.sum_sq is not None
        self.sum_sq += scores
        self.count += 1
        draw = step if cfg.redraw == "step" else self.epoch
        keep = keyed_bernoulli_uniforms(mix_key(self.ctx.seed, ROAST_STREAM, draw), layout, scores.device) < self.prob
        factors = keep.to(torch.float32)
        if cfg.scale:
            factors /= self.prob
        return keep, factors

    def state_dict(self) -> dict[str, Any]:
        """This rank's keep probabilities, g^2 sum and count of the running epoch."""
        return {
            **super().state_dict(),
            "prob": self.prob,
            "sum_sq": self.sum_sq,
            "count": self.count,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` (same sharding)."""
        self.prob, self.sum_sq = state["prob"], state["sum_sq"]
        self.count, self.epoch = int(state["count"]), int(state["epoch"])
