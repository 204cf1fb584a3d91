"""Vanilla fine-tuning: cross-entropy (MSE for regression), no perturbation, no mask. The baseline."""

from __future__ import annotations

import torch
from torch import nn

from uegr_dist.methods.base import Method, StepOutput, model_inputs, task_loss


class Vanilla(Method):
    """Plain fine-tuning with the task loss."""

    name = "vanilla"

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int, micro_step: int) -> StepOutput:
        """Task loss of one ordinary forward."""
        logits = model(**model_inputs(batch)).logits
        loss = task_loss(logits, batch["labels"])
        return StepOutput(loss, logits.detach(), {"task_loss": loss.detach()})  # read when logged: no sync here
