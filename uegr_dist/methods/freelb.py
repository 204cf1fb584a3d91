"""FreeLB: K ascent steps on an embedding perturbation; the parameter gradient is the average over the K steps.

Zhu et al., "FreeLB: Enhanced Adversarial Training for Natural Language Understanding", ICLR 2020
(arXiv 1909.11764).
"""

from __future__ import annotations

import torch
from torch import nn

from uegr_dist.config import MethodConfig
from uegr_dist.forward import install_chunk_dropout
from uegr_dist.methods.base import Method, MethodContext, StepOutput, task_loss
from uegr_dist.methods.noise import embedding_inputs, uniform_noise
from uegr_dist.rng import mix_key

# Stream ids of one micro-batch's draws.
_INIT_STREAM, _DROPOUT_STREAM = 1, 2
# The official code's floor on the gradient norm used for normalization.
_MIN_NORM = 1e-8


def freelb_init(uniform: torch.Tensor, attention_mask: torch.Tensor, init_mag: float, norm: str) -> torch.Tensor:
    """delta_0 [B, S, D] from U[0, 1) draws [B, S, D]: l2: U(-1, 1) * mask * init_mag / sqrt(tokens_b * D);
    linf: U(-init_mag, init_mag) * mask."""
    token = attention_mask.to(uniform.dtype).unsqueeze(-1)
    centred = (2.0 * uniform - 1.0) * token
    if norm == "linf":
        return centred * init_mag
    dims = attention_mask.sum(dim=1).to(uniform.dtype) * uniform.shape[-1]
    return centred * (init_mag / dims.clamp(min=1).sqrt()).view(-1, 1, 1)


def freelb_ascent(delta: torch.Tensor, grad: torch.Tensor, adv_lr: float, max_norm: float, norm: str) -> torch.Tensor:
    """One ascent step delta [B, S, D] + adv_lr * grad / ||grad||_b (per example l2 or max-abs), then projection
    onto the max_norm ball (l2: rescale the examples outside it; linf: clamp; max_norm 0: none)."""
    flat = grad.flatten(1).float()
    scale = flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)
    delta = delta + adv_lr * grad / scale.clamp(min=_MIN_NORM).view(-1, 1, 1).to(grad.dtype)
    if max_norm <= 0:
        return delta
    if norm == "linf":
        return delta.clamp(-max_norm, max_norm)
    length = delta.flatten(1).float().norm(dim=1)
    exceed = (length > max_norm).to(delta.dtype)
    reweight = max_norm / length.clamp(min=_MIN_NORM) * exceed + (1.0 - exceed)
    return delta * reweight.view(-1, 1, 1).to(delta.dtype)


class FreeLB(Method):
    """For t = 1..K: loss_t = L(f(e + delta_{t-1}), y) / K; delta_t = Proj(delta_{t-1} + adv_lr * g_t / ||g_t||),
    g_t = d loss_t / d delta. The parameter gradient is sum_t d loss_t / d theta, then ONE optimizer step.

    Deviation in mechanics, not in math: the official code calls backward K times (parameter gradients accumulate
    in .grad). Under DeepSpeed one backward per micro-batch runs the engine step, so here each delta gradient comes
    from `torch.autograd.grad(loss_t, delta, retain_graph=True)` and the K losses are backpropagated once as
    sum_t loss_t: the same parameter gradient (linearity of the gradient), at the memory cost of keeping the K
    graphs until the backward. Only the last pass runs through the wrapped model (DDP / DeepSpeed count one forward
    per backward); the first K - 1 use the unwrapped module. Refused under ZeRO-3 (see `setup`). The embedding
    lookup e = E(x) is shared by the K passes, so E gets the sum of the K gradients, as in the official code which
    recomputes E(x) every step.
    Same dropout masks across the K steps (as the paper prescribes): dropout is keyed by the micro-batch and the row,
    and every pass reuses the key. Row keys are the sample ids with `method.rng: keyed` (a 2-process run then equals the
    1-process run) and a per-micro-batch draw from torch's generator otherwise; delta_0 follows the same rule.
    Defaults (`method.freelb`): K = 3, adv_lr = 0.1, init_mag = 0.6, max_norm = 0 (no projection), l2.
    Regression: MSE replaces CE. The logged clean logits are those of the first pass (e + delta_0).
    """

    name = "freelb"

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg
        self.options = cfg.freelb

    @property
    def needs_whole_parameters(self) -> str:
        """The K retained graphs are backpropagated once, after the first delta gradient."""
        return (
            "it backpropagates all K retained graphs once, after the first delta gradient (ZeRO-3 releases the "
            "gathered parameters there)"
        )

    def setup(self, ctx: MethodContext) -> None:
        """Keyed dropout (same masks in every ascent pass) and the embedding lookup of the unwrapped model."""
        super().setup(ctx)
        self.controller = install_chunk_dropout(ctx.base_model)
        self.embeddings = ctx.base_model.get_input_embeddings()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int, micro_step: int) -> StepOutput:
        """Mean task loss over the K perturbed passes (delta gradients taken on the way)."""
        opts = self.options
        labels, attention_mask = batch["labels"], batch["attention_mask"]
        key = mix_key(self.ctx.seed, micro_step)
        if self.cfg.rng == "keyed":
            row_keys = batch["sample_id"]
        else:
            row_keys = torch.randint(0, 2**62, labels.shape, device=labels.device)
        embeds = self.embeddings(batch["input_ids"])  # [B, S, D], graph to the embedding matrix kept
        extra = embedding_inputs(batch)
        uniform = uniform_noise(tuple(embeds.shape), row_keys, mix_key(key, _INIT_STREAM), embeds.device)
        delta = freelb_init(uniform, attention_mask, opts.init_mag, opts.norm)
        total = torch.zeros((), device=embeds.device)
        first_logits = None
        norms = []
        for t in range(opts.steps):
            delta.requires_grad_(True)
            # One forward through the wrapped model per backward (what DDP and DeepSpeed's engine count on): the
            # first K - 1 passes use the unwrapped module; the single backward still reaches every pass's graph.
            net = model if t + 1 == opts.steps else self.ctx.base_model
            with self.controller.chunks([None], row_keys=row_keys, key=mix_key(key, _DROPOUT_STREAM)):
                logits = net(inputs_embeds=embeds + delta.to(embeds.dtype), **extra).logits
            loss_t = task_loss(logits, labels) / opts.steps
            total = total + loss_t
            if first_logits is None:
                first_logits = logits.detach()
            if t + 1 < opts.steps:
                (grad,) = torch.autograd.grad(loss_t, delta, retain_graph=True)
                delta = freelb_ascent(delta.detach(), grad, opts.adv_lr, opts.max_norm, opts.norm)
                norms.append(delta.flatten(1).float().norm(dim=1).mean().detach())
        assert first_logits is not None
        logs = {"task_loss": total.detach(), "delta_norm": norms[-1] if norms else 0.0}
        return StepOutput(total, first_logits, logs)

    def teardown(self) -> None:
        """Restore the model's own dropout modules and attention implementation."""
        self.controller.remove()
