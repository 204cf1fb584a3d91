"""What every fine-tuning method plugs into the training loop: an objective and a gradient transform."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from uegr_dist.forward.divergence import at_least_float32

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
class MethodContext:
    """What the loop hands a method at set-up: the (possibly wrapped) model, its unwrapped module, the optimizer."""

    model: nn.Module
    base_model: nn.Module
    optimizer: torch.optim.Optimizer
    named_parameters: list[tuple[str, nn.Parameter]]
    """Trainable parameters in optimizer order (the canonical order of the gradient mask)."""
    seed: int
    num_processes: int = 1
    reduce_mean: Any = None
    """Callable float -> float averaging a scalar over processes (identity in one process)."""
    max_grad_norm: float = 0.0
    """Gradient clipping norm (0: none); a method that masks inside a DeepSpeed step clips there itself."""
    process_index: int = 0
    device: torch.device | None = None
    train_dataset: Any = None
    """The tokenized training split (unsharded) for methods with a pre-pass over the data (ChildTuning-D's Fisher)."""
    collate_fn: Any = None
    """Turns a list of training examples into a batch (the training loader's collator)."""
    steps_per_epoch: int = 0
    """Optimizer steps per epoch of this run (for methods refreshed once per epoch; 0: not known)."""
    all_reduce_sum: Any = None
    """In-place sum of a tensor over processes (None in one process)."""


class Method:
    """A fine-tuning method: `loss` is the objective of one micro-batch, `transform_gradients` runs after the
    (accumulated, reduced) backward and before the optimizer step. Subclasses override what they change."""

    name = "base"
    masks_gradients = False
    """True when `transform_gradients` masks coordinates (under DeepSpeed the mask then clips, not the engine)."""
    steps_optimizer = True
    """False for a method that updates the parameters itself and never lets the optimizer (under DeepSpeed: the
    engine) step (MAT): the loop's non-finite guard then checks the loss it returns, not a ZeRO step."""

    def setup(self, ctx: MethodContext) -> None:
        """Called once after `accelerator.prepare`."""
        self.ctx = ctx

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

    def transform_gradients(self, step: int) -> dict[str, float]:
        """Modify `.grad` in place before the optimizer step; return scalars to log."""
        return {}

    def teardown(self) -> None:
        """Undo model changes made in `setup` (before saving the model)."""

    def state_dict(self) -> dict[str, Any]:
        """Method state that a checkpoint must carry."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
