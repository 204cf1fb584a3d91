"""Delta-SAM (Zhou, Liu, Zhang and Chen, "Sharpness-Aware Minimization with Dynamic Reweighting", Findings of EMNLP
2022, arXiv 2112.08772): SAM whose weight perturbation approximates per-example perturbations by a reweighted batch
perturbation, so that the examples that a per-example adversary would hurt most count more. As cheap as SAM: two
forward-backward passes per step.

One optimizer step on a batch with per-example losses l_i(theta) and logits z_i:
1. hardness s_i of each example, from the first forward alone (no per-example backward passes):
   `score: grad_norm` (default) s_i = ||d l_i / d z_i||_2 = ||softmax(z_i) - onehot(y_i)||_2 (regression:
   |2 (z_i - y_i)|), the output-layer factor of the example's gradient (the gradient of a final linear layer is this
   vector times the layer's input); `score: loss` s_i = l_i;
2. weights lambda_i = exp(s_i / tau) / sum_j exp(s_j / tau) over the GLOBAL batch (tau = `temperature`): the
   normaliser is summed over processes (one all-reduce of the maximum, one of the sum), so 2 processes equal 1;
3. g_w = grad sum_i lambda_i l_i(theta) (lambda constant; each process's share summed over processes), one backward;
4. eps = rho g_w / ||g_w||; the gradient of the batch's mean loss at theta + eps is taken, theta restored, and the
   optimizer (AdamW, as for every method) steps with it (the second pass and everything after it is SAM's:
   `uegr_dist.methods.sam`; under DeepSpeed ZeRO-1/2 theta is put back just before the ZeRO optimizer's step).
tau -> infinity gives uniform weights: SAM.

Our reading, where the paper could not be checked here: the exact weighting factors. The paper derives its weights
from per-example gradient information that it approximates without B backward passes; implemented is a softmax of
a per-example hardness with a temperature, the hardness the norm of the loss gradient with respect to the logits (or
the loss), and the reweighting enters the perturbation only (the update is the plain mean loss at theta + eps).
Defaults rho = 0.05 (SAM's), tau = 1 (ours). Deviations: AdamW as the base optimizer; clipping, if on, acts on the
gradient at theta + eps. Not supported (start-up errors): train.grad_accum > 1, ZeRO-3.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from uegr_dist.config import MethodConfig
from uegr_dist.config.schema import SamConfig
from uegr_dist.forward.divergence import at_least_float32
from uegr_dist.methods.base import StepOutput, model_inputs
from uegr_dist.methods.sam import SAM


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [B, C], labels [B] -> [B] cross-entropy per example (C == 1: squared error), at least float32; its
    mean is `task_loss`."""
    if logits.shape[-1] == 1:
        preds = at_least_float32(logits[:, 0])
        return (preds - labels.to(preds.dtype)) ** 2
    return F.cross_entropy(at_least_float32(logits), labels, reduction="none")


def logit_gradient_norm(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B]: ||d l_i / d z_i||_2 of the per-example loss, in closed form (softmax - onehot; regression 2 |z - y|)."""
    logits = at_least_float32(logits.detach())
    if logits.shape[-1] == 1:
        return 2.0 * (logits[:, 0] - labels.to(logits.dtype)).abs()
    probs = logits.softmax(dim=-1)
    # one-hot by scatter: F.one_hot checks the labels' range on the host
    residual = probs - torch.zeros_like(probs).scatter_(-1, labels.unsqueeze(-1), 1.0)
    return residual.norm(dim=-1)


class DeltaSAM(SAM):
    """SAM with the perturbation built from the gradient of a softmax-reweighted batch loss."""

    name = "delta_sam"

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__(cfg)
        self.options = cfg.delta_sam
        # SAM's machinery with this radius, one shard (the global batch), the plain Euclidean ball.
        self.cfg = SamConfig(rho=cfg.delta_sam.rho)

    def example_weights(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """lambda [B] (float64) = softmax(scores / tau) over the global batch, and max_i lambda_i times the global
        batch size (1: uniform; a 0-dim tensor)."""
        scaled = scores.detach().double() / self.options.temperature
        backend = self.ctx.backend
        peak = scaled.max().reshape(1)
        backend.all_reduce_max(peak)
        unnormalised = torch.exp(scaled - peak)
        rows = torch.full((), float(scores.numel()), dtype=torch.float64, device=scaled.device)
        totals = torch.stack([unnormalised.sum(), rows])
        backend.all_reduce_sum(totals)  # [sum over the global batch, global batch size]
        weights = unnormalised / totals[0]
        return weights, (weights.max() * totals[1]).detach()  # a 0-dim tensor, read when logged

    def ascent_gradients(
        self, accelerator: Any, batch: dict[str, torch.Tensor], step: int, micro_step: int, reduce: bool
    ) -> tuple[StepOutput, list[torch.Tensor]]:
        """The first pass at theta: g_w = grad sum_i lambda_i l_i over the global batch (summed over processes)."""
        labels = batch["labels"]
        with accelerator.autocast():
            logits = self.ctx.base_model(**model_inputs(batch)).logits
            losses = per_example_loss(logits, labels)
        if self.options.score == "loss":
            scores = losses.detach()
        else:
            scores = logit_gradient_norm(logits, labels)
        weights, spread = self.example_weights(scores)
        grads = self._gradients((losses * weights.to(losses.dtype)).sum())
        self._average(grads, mean=False)  # each process holds its rows' share of the global weighted sum
        loss = losses.detach().mean()
        logs = {"task_loss": loss, "weight_max_ratio": spread}
        return StepOutput(loss, logits.detach(), logs), grads
