"""Methods that train with the vanilla objective and update a chosen subset of gradient coordinates (ChildTuning-D,
ChildTuning-F, RoAST). They share UEGR's mask machinery: a `GradientMasker` (one process, DDP: after the reduced
backward) or a `ZeroGradientMasker` (DeepSpeed: inside the ZeRO step, on this rank's gradient partition), driven by
the method's own `select` rule keyed by canonical coordinate position, so every rank and shard agrees."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from uegr_dist.backward import GradientMasker, MaskOptions, ZeroGradientMasker, is_deepspeed_engine
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

    masks_gradients = True
    include: str | None = None
    """Regex of the covered parameter names (None: every trainable parameter)."""

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg
        self.masker: GradientMasker | ZeroGradientMasker | None = None

    def covered(self, ctx: MethodContext) -> list[tuple[str, nn.Parameter]]:
        """Trainable parameters whose name matches `include`, in canonical (optimizer) order."""
        pattern = re.compile(self.include) if self.include else None
        covered = [(n, p) for n, p in ctx.named_parameters if p.requires_grad and (not pattern or pattern.search(n))]
        if not covered:
            raise ConfigError(f"method {self.name}: include pattern {self.include!r} matches no trainable parameter")
        return covered

    def setup(self, ctx: MethodContext) -> None:
        """Run `prepare` (e.g. a Fisher pre-pass), then hook the masker into the backward / the ZeRO step."""
        super().setup(ctx)
        self.covered_params = self.covered(ctx)
        self.prepare(ctx)
        options = MaskOptions(saliency="grad_sq", seed=ctx.seed, selector=self.select)
        if is_deepspeed_engine(ctx.model):
            self.masker = ZeroGradientMasker(
                ctx.model, self.covered_params, options, max_grad_norm=ctx.max_grad_norm, freeze_masked=False
            )
        else:
            self.masker = GradientMasker(self.covered_params, options)

    def prepare(self, ctx: MethodContext) -> None:
        """Work before the first step (nothing by default)."""

    def select(
        self, scores: torch.Tensor, layout: MaskLayout, step: int, all_reduce_sum: AllReduceSum | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keep (bool [n]) and gradient factors (float32 [n] or None) of this rank's covered coordinates;
        scores [n] = g^2 of the reduced gradient (see `MaskSelector`)."""
        raise NotImplementedError

    def fisher(self, ctx: MethodContext) -> torch.Tensor:
        """Fisher diagonal (float32 [covered numel], canonical order) over the training set, split across processes."""
        if is_deepspeed_engine(ctx.model) and ctx.model.zero_optimization_stage() == 3:
            raise ConfigError(
                f"method.name = {self.name}: its Fisher pre-pass needs whole parameters on every process, which "
                "ZeRO-3 partitions; use ZeRO-1/2 or DDP"
            )
        if ctx.train_dataset is None or ctx.collate_fn is None:
            raise ValueError(f"method {self.name} needs the training set in its MethodContext (Fisher pre-pass)")
        return fisher_information(
            ctx.base_model,
            [param for _, param in self.covered_params],
            ctx.train_dataset,
            ctx.collate_fn,
            _batch_loss,
            batch_size=self.cfg.childtuning.fisher_batch_size,
            process_index=ctx.process_index,
            num_processes=ctx.num_processes,
            all_reduce_sum=ctx.all_reduce_sum,
            device=ctx.device,
        )

    def transform_gradients(self, step: int) -> dict[str, float]:
        """Mask the reduced gradients (under DeepSpeed that already happened inside the ZeRO step)."""
        assert self.masker is not None
        if isinstance(self.masker, ZeroGradientMasker):
            stats = self.masker.last_stats
            assert stats is not None
        else:
            stats = self.masker.apply_(step)
        return {"mask_kept_fraction": stats.keep_fraction}

    def state_dict(self) -> dict[str, Any]:
        """The masker's layout check (covered names)."""
        return {"masker": self.masker.state_dict() if self.masker is not None else None}
