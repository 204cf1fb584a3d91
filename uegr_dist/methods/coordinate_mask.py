"""Methods that train with the vanilla objective and update a chosen subset of gradient coordinates (ChildTuning-D,
ChildTuning-F, RoAST). They share UEGR's mask machinery, run by the optimizer's step wherever the run's backend puts
it (after the reduced backward in one process or DDP, inside the ZeRO step on this rank's gradient partition under
DeepSpeed), driven by the method's own `select` rule keyed by canonical coordinate position, so every rank and shard
agrees."""

from __future__ import annotations

import re

import torch
from torch import nn

from uegr_dist.backward import MaskOptions
from uegr_dist.backward.fisher import fisher_information
from uegr_dist.backward.masking import MaskLayout
from uegr_dist.backward.radix_select import AllReduceSum
from uegr_dist.config import ConfigError, MethodConfig
from uegr_dist.methods.base import MethodContext, model_inputs, task_loss
from uegr_dist.methods.vanilla import Vanilla


def _batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return task_loss(model(**model_inputs(batch)).logits, batch["labels"])


class CoordinateMaskMethod(Vanilla):
    """Vanilla objective; each step the reduced gradient is multiplied by `select`'s per-coordinate factors before
    clipping and the optimizer step (which then updates every coordinate with AdamW as usual: "mask before the
    Adam moments", as ChildTuning and RoAST do, unlike UEGR's frozen coordinates)."""

    include: str | None = None
    """Regex of the covered parameter names (None: every trainable parameter)."""

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg

    def gradient_mask(self, seed: int) -> MaskOptions:
        """`select`'s factors on the covered coordinates' gradients; the optimizer then steps every coordinate."""
        return MaskOptions(
            saliency="grad_sq", seed=seed, selector=self.select, include=self.include, freeze_masked=False
        )

    def covered(self, ctx: MethodContext) -> list[tuple[str, nn.Parameter]]:
        """Trainable parameters whose name matches `include`, in canonical (optimizer) order."""
        pattern = re.compile(self.include) if self.include else None
        covered = [(n, p) for n, p in ctx.named_parameters if p.requires_grad and (not pattern or pattern.search(n))]
        if not covered:
            raise ConfigError(f"method {self.name}: include pattern {self.include!r} matches no trainable parameter")
        return covered

    def setup(self, ctx: MethodContext) -> None:
        """Find the covered parameters and run `prepare` (e.g. a Fisher pre-pass) before the first step."""
        super().setup(ctx)
        self.covered_params = self.covered(ctx)
        self.prepare(ctx)

    def prepare(self, ctx: MethodContext) -> None:
        """Work before the first step (nothing by default)."""

    def select(
        self, scores: torch.Tensor, layout: MaskLayout, step: int, all_reduce_sum: AllReduceSum | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keep (bool [n]) and gradient factors (float32 [n] or None) of this rank's covered coordinates;
        scores [n] = g^2 of the reduced gradient (see `MaskSelector`)."""
        raise NotImplementedError

    fisher_reason = "its Fisher pre-pass needs whole parameters on every process"

    def fisher(self, ctx: MethodContext) -> torch.Tensor:
        """Fisher diagonal (float32 [covered numel], canonical order) over the training set, split across processes."""
        if ctx.data is None:
            raise ValueError(f"method {self.name} needs the training set in its MethodContext (Fisher pre-pass)")
        backend = ctx.backend
        return fisher_information(
            ctx.base_model,
            [param for _, param in self.covered_params],
            ctx.data.dataset,
            ctx.data.collate_fn,
            _batch_loss,
            batch_size=self.cfg.childtuning.fisher_batch_size,
            process_index=backend.process_index,
            num_processes=backend.num_processes,
            all_reduce_sum=backend.all_reduce_sum if backend.distributed else None,
            device=backend.device,
        )
