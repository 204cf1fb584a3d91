"""What every fine-tuning method plugs into the training loop: an objective and a gradient transform."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from uegr_dist.forward.divergence import at_least_float32

if TYPE_CHECKING:
    from uegr_dist.backward import MaskOptions
    from uegr_dist.engine.backend import Backend

NON_MODEL_KEYS = ("labels", "sample_id")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without the keys the model must not see (labels, sample ids)."""
    return {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [B, C], labels [B] -> mean cross-entropy; C == 1 means regression (MSE on logits[:, 0])."""
    if logits.shape[-1] == 1:
        preds = at_least_float32(logits[:, 0])
        return F.mse_loss(preds, labels.to(preds.dtype))
    return F.cross_entropy(at_least_float32(logits), labels)


@dataclass
class StepOutput:
    """One micro-batch's training loss, the clean logits [B, C] and detached scalars to log (floats, or 0-dim
    tensors, which the loop reads only when it logs: no host synchronization in the step)."""

    loss: torch.Tensor
    logits: torch.Tensor
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)


@dataclass
class TrainingData:
    """The training split, for methods with a pass over the data before training (ChildTuning-D's, RoAST's Fisher)."""

    dataset: Any
    """The tokenized training split (all of it, not this process's shard)."""
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    """Turns a list of training examples into a batch (the training loader's collator)."""
    steps_per_epoch: int = 0
    """Optimizer steps per epoch of this run (for methods refreshed once per epoch; 0: not known)."""


@dataclass
class MethodContext:
    """What a method is set up with, after `accelerator.prepare`."""

    model: nn.Module
    """The model as the loop calls it (DDP / DeepSpeed wrapper, or the module itself)."""
    base_model: nn.Module
    """The unwrapped module (for passes that must not fire data-parallel hooks)."""
    named_parameters: list[tuple[str, nn.Parameter]]
    """Trainable parameters in optimizer order (the canonical order of the gradient mask)."""
    backend: Backend
    """Where gradients are reduced and the step runs (`uegr_dist.engine.backend`)."""
    seed: int
    data: TrainingData | None = None


class Method:
    """A fine-tuning method: `loss` is the objective of one micro-batch (the forward stage); `gradient_mask` says
    which gradient coordinates the optimizer's step keeps (the backward stage, run by `SelectiveAdamW`). Subclasses
    override what they change."""

    name = "base"
    steps_optimizer = True
    """False for a method that updates the parameters itself and never lets the optimizer (under DeepSpeed: the
    engine) step (MAT): the loop's non-finite guard then checks the loss it returns, not a ZeRO step."""

    @property
    def needs_whole_parameters(self) -> str | None:
        """Why this method needs every parameter whole on every process (refused under ZeRO-3), or None."""
        return None

    def gradient_mask(self, seed: int) -> MaskOptions | None:
        """The coordinates the optimizer's step keeps (None: all). Called before `setup`, to build the optimizer;
        a selector in the options runs only at step time, after `setup`."""
        return None

    def setup(self, ctx: MethodContext) -> None:
        """Called once after `accelerator.prepare` (refuses a ZeRO-3 run if the method needs whole parameters)."""
        self.ctx = ctx
        reason = self.needs_whole_parameters
        if reason is not None:
            ctx.backend.require_whole_parameters(self.name, reason)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int, micro_step: int) -> StepOutput:
        """The training objective for one micro-batch (step = optimizer step index, micro_step = batch index)."""
        raise NotImplementedError

    def forward_backward(
        self, accelerator: Any, model: nn.Module, batch: dict[str, torch.Tensor], step: int, micro_step: int
    ) -> StepOutput:
        """One micro-batch: the objective under autocast, then `accelerator.backward`. Methods that need more than
        one backward per micro-batch (SAM, MAT) override this; under DeepSpeed the last `accelerator.backward` of a
        synchronizing micro-batch runs the engine step, so an override must call it exactly once per micro-batch
        (or never, with `steps_optimizer = False`, when it updates the parameters itself, as MAT does)."""
        with accelerator.autocast():
            result = self.loss(model, batch, step, micro_step)
        accelerator.backward(result.loss)
        return result

    def teardown(self) -> None:
        """Undo model changes made in `setup` (before saving the model)."""

    def state_dict(self) -> dict[str, Any]:
        """Method state that a checkpoint must carry."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
