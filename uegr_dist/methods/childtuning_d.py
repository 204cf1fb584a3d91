"""ChildTuning-D (Xu et al., "Raise a Child in Large Language Model: Towards Effective and Generalizable
Fine-tuning", EMNLP 2021), task-driven variant.

Before training, F = (1 / #batches) sum_b (dL_b/dtheta)^2 over the training set (`fisher_information`: the batches
are split across processes and summed with one all-reduce, where the official code repeats the pass on every
rank). The child network is the top `reserve_p` fraction of F over the encoder-layer parameters (`include`),
fixed for the run; every step the gradient of those parameters is multiplied by this 0/1 mask before AdamW
(its moments and weight decay then act on every coordinate, as in the official ChildTuningAdamW). Embeddings,
pooler and classifier are always updated.

Deviations: exact top-k (k = ceil(reserve_p * n), ties to the lower canonical position) where the official code
keeps F >= the (1 - reserve_p) percentile; the Fisher pass runs in eval mode (no dropout) and in float64
accumulation, with its own batch size (`method.childtuning.fisher_batch_size`); clipping (`train.max_grad_norm`)
sees the masked gradient (the official code clips before the optimizer masks). Not under ZeRO-3 (start-up error).
"""

from __future__ import annotations

from typing import Any

import torch

from uegr_dist.backward import keep_count, select_top_k
from uegr_dist.backward.masking import MaskLayout
from uegr_dist.backward.radix_select import AllReduceSum
from uegr_dist.config import MethodConfig
from uegr_dist.methods.base import MethodContext
from uegr_dist.methods.coordinate_mask import CoordinateMaskMethod


class ChildTuningD(CoordinateMaskMethod):
    """Fixed Fisher top-reserve_p gradient mask on the encoder layers."""

    name = "childtuning_d"

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__(cfg)
        self.include = cfg.childtuning.include
        self.child: torch.Tensor | None = None
        self._local: torch.Tensor | None = None

    @property
    def needs_whole_parameters(self) -> str | None:
        """The Fisher pre-pass runs on whole parameters."""
        return self.fisher_reason

    def prepare(self, ctx: MethodContext) -> None:
        """Fisher pre-pass and the global top-reserve_p child mask (bool [covered numel], canonical order)."""
        fisher = self.fisher(ctx)
        offsets = torch.tensor([0, fisher.numel()], dtype=torch.int64, device=fisher.device)
        k = torch.tensor([keep_count(self.cfg.childtuning.reserve_p, fisher.numel())], device=fisher.device)
        self.child = select_top_k(fisher, offsets, k).keep

    def select(
        self, scores: torch.Tensor, layout: MaskLayout, step: int, all_reduce_sum: AllReduceSum | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fixed child mask, restricted to this rank's coordinates."""
        if self._local is None:
            assert self.child is not None
            self._local = layout.local_values(self.child.to(scores.device))
        return self._local, None

    def state_dict(self) -> dict[str, Any]:
        """The child mask (canonical order)."""
        return {**super().state_dict(), "child": self.child}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        self.child, self._local = state["child"], None
