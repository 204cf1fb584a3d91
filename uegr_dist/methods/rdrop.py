"""R-Drop: two dropout passes of the same batch and a symmetric KL between them.

Liang et al., "R-Drop: Regularized Dropout for Neural Networks", NeurIPS 2021 (arXiv 2106.14448).
"""

from __future__ import annotations

import torch
from torch import nn

from uegr_dist.config import MethodConfig
from uegr_dist.forward import at_least_float32, install_chunk_dropout, symmetric_kl
from uegr_dist.methods.base import Method, MethodContext, StepOutput, model_inputs, task_loss
from uegr_dist.methods.uegr import stacked_row_keys
from uegr_dist.rng import mix_key


def pair_disagreement(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """first, second [B, C] -> [B]: 0.5 * (KL(p1||p2) + KL(p2||p1)); for regression (C = 1) the squared difference."""
    if first.shape[-1] == 1:
        return (at_least_float32(first[:, 0]) - at_least_float32(second[:, 0])).pow(2)
    return 0.5 * symmetric_kl(first, second)


class RDrop(Method):
    """L = 0.5 * (CE(f_1(x), y) + CE(f_2(x), y)) + alpha * 0.5 * (KL(P_1 || P_2) + KL(P_2 || P_1)).

    f_1, f_2 are the model under two independent dropout masks, run as ONE forward of the batch stacked [x; x].
    KL is summed over classes and averaged over the batch (deviation: the paper's BERT code sums over the batch and
    its RoBERTa code averages; we average so alpha does not scale with the batch size). Both KL directions carry
    gradients, as in the paper.
    Regression (num_labels = 1): MSE for the task term, squared difference of the two predictions for the KL term.
    Randomness: with `method.rng: keyed` the masks of sample i are keyed by (seed, micro-batch index, sample id, pass),
    so a 2-process run reproduces a 1-process run whose micro-batches hold the same samples; `fast` uses torch's
    generator (masks then depend on the process). Default alpha = 1 (`method.rdrop.alpha`).
    """

    name = "rdrop"

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg
        self.alpha = cfg.rdrop.alpha

    def setup(self, ctx: MethodContext) -> None:
        """Make dropout chunk-aware so the two stacked copies draw keyed, independent masks."""
        super().setup(ctx)
        self.controller = install_chunk_dropout(ctx.base_model)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int, micro_step: int) -> StepOutput:
        """Task loss averaged over the two passes plus alpha times their symmetric KL."""
        labels = batch["labels"]
        stacked = {name: torch.cat([value, value]) for name, value in model_inputs(batch).items()}
        row_keys = stacked_row_keys(batch["sample_id"], 2) if self.cfg.rng == "keyed" else None
        with self.controller.chunks([None, None], row_keys=row_keys, key=mix_key(self.ctx.seed, micro_step)):
            logits = model(**stacked).logits
        first, second = logits.view(2, labels.shape[0], -1)
        task = 0.5 * (task_loss(first, labels) + task_loss(second, labels))
        disagreement = pair_disagreement(first, second).mean()
        loss = task + self.alpha * disagreement
        logs = {"task_loss": task.detach(), "rdrop_kl": disagreement.detach()}
        return StepOutput(loss, first.detach(), logs)

    def teardown(self) -> None:
        """Restore the model's own dropout modules and attention implementation."""
        self.controller.remove()
