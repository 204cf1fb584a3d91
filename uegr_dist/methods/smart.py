"""SMART: a smoothness-inducing adversarial regularizer on the embeddings, with an optional Bregman proximal term
to an EMA teacher.

Jiang et al., "SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural Language Models through Principled
Regularized Optimization", ACL 2020 (arXiv 1911.03437).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from uegr_dist.config import MethodConfig
from uegr_dist.forward import at_least_float32, symmetric_kl
from uegr_dist.methods.base import Method, MethodContext, StepOutput, task_loss
from uegr_dist.methods.noise import embedding_inputs, noise_row_keys, normal_noise
from uegr_dist.rng import mix_key

_NOISE_STREAM = 1


def ascent_divergence(perturbed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """perturbed [B, C], target [B, C] (constant) -> scalar: sum_b KL(P_perturbed || P_target); regression: summed
    squared error. Summed, not averaged, over the batch: each example's gradient (hence its ascent step, whose
    normalization has the additive norm_eps) then does not depend on how many examples share its micro-batch."""
    if perturbed.shape[-1] == 1:
        return (at_least_float32(perturbed[:, 0]) - at_least_float32(target[:, 0])).pow(2).sum()
    log_p = torch.log_softmax(at_least_float32(perturbed), dim=-1)
    log_q = torch.log_softmax(at_least_float32(target), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum()


def smoothness(clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """clean, perturbed [B, C] -> scalar: mean_b [KL(sg P_clean || P_pert) + KL(sg P_pert || P_clean)]; regression:
    mean squared difference."""
    if clean.shape[-1] == 1:
        return (at_least_float32(clean[:, 0]) - at_least_float32(perturbed[:, 0])).pow(2).mean()
    return symmetric_kl(clean, perturbed, stop_gradient_targets=True).mean()


def smart_ascent(delta: torch.Tensor, grad: torch.Tensor, step_size: float, norm_eps: float) -> torch.Tensor:
    """delta [B, S, D] + step_size * grad / (max |grad|_b + norm_eps), the max taken per example (l-inf form)."""
    scale = grad.flatten(1).abs().amax(dim=1).view(-1, 1, 1)
    return delta + step_size * grad / (scale + norm_eps)


class SMART(Method):
    """L = task(f(e)) + lambda_s * R + mu * D_Breg, with

    delta_0 ~ N(0, sigma^2) on non-pad tokens; `steps` times: g = d/d(delta) sum_b KL(P(e + delta) || sg P(e)),
    delta <- delta + eta * g / (max|g| + 1e-6); R = KL(sg P(e) || P(e + delta)) + KL(sg P(e + delta) || P(e)).
    D_Breg = KL(P_teacher(e) || P(e)) + KL(P(e) || P_teacher(e)) with the teacher a constant EMA of the parameters:
    theta~ <- beta * theta~ + (1 - beta) * theta at the start of every optimizer step (theta~ = theta at step 0),
    run without dropout. Defaults (`method.smart`): lambda_s = 1, sigma = 1e-5, eta = 1e-3, 1 step, mu = 0 (off),
    beta = 0.99.

    Deviations: the max |g| normalization is per example as in the paper's Algorithm 1 (the authors' mt-dnn code,
    as we read it, normalizes per token and rescales delta + eta g; we follow the paper), and there is no projection
    onto an eps-ball; the ascent objective is summed over the batch (mt-dnn averages it), which makes the step
    independent of the micro-batch size and so of the process count. R's stop-gradients follow mt-dnn's symmetric-KL
    criterion (each KL's target is a constant). The ascent passes and, with lambda_s > 0, the clean pass run through
    the unwrapped model (one wrapped forward per backward); regression uses squared differences.
    Randomness: delta_0 is keyed by (seed, micro-batch index, sample id) with `method.rng: keyed`, so a 2-process
    run equals the 1-process run when dropout is off or keyed elsewhere; model dropout itself uses torch's generator.
    The Bregman teacher (mu > 0) keeps an fp32 copy of every trainable parameter per process; it is refused under
    ZeRO-3, where no process holds the full parameters.
    """

    name = "smart"

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg
        self.options = cfg.smart
        self.teacher: dict[str, torch.Tensor] | None = None
        self.teacher_step = -1

    @property
    def needs_whole_parameters(self) -> str | None:
        """The Bregman EMA teacher (bregman_mu > 0) copies whole parameters."""
        if self.options.bregman_mu > 0:
            mu = self.options.bregman_mu
            return f"its EMA teacher (method.smart.bregman_mu = {mu}; 0 turns it off) copies whole parameters"
        return None

    def setup(self, ctx: MethodContext) -> None:
        """Embedding lookup of the unwrapped model."""
        super().setup(ctx)
        self.embeddings = ctx.base_model.get_input_embeddings()

    def _update_teacher(self, step: int) -> None:
        """theta~ <- beta theta~ + (1 - beta) theta once per optimizer step (a copy of theta at the first call)."""
        if step == self.teacher_step:
            return
        current = {n: p.detach() for n, p in self.ctx.base_model.named_parameters() if p.requires_grad}
        if self.teacher is None:
            self.teacher = {n: p.float().clone() for n, p in current.items()}
        else:
            beta = self.options.ema_beta
            for name, value in current.items():
                self.teacher[name].mul_(beta).add_(value.float(), alpha=1.0 - beta)
        self.teacher_step = step

    def _teacher_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits [B, C] of the EMA parameters, without dropout and without gradient."""
        base = self.ctx.base_model
        assert self.teacher is not None
        dtype = next(base.parameters()).dtype
        params = {name: value.to(dtype) for name, value in self.teacher.items()}
        was_training = base.training
        base.eval()
        try:
            with torch.no_grad():
                inputs = {k: v for k, v in batch.items() if k not in ("labels", "sample_id")}
                return functional_call(base, params, args=(), kwargs=inputs).logits
        finally:
            base.train(was_training)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int, micro_step: int) -> StepOutput:
        """Task loss + lambda_s * smoothness after the ascent (+ mu * Bregman term)."""
        opts = self.options
        labels, attention_mask = batch["labels"], batch["attention_mask"]
        extra = embedding_inputs(batch)
        embeds = self.embeddings(batch["input_ids"])  # [B, S, D]
        # One forward through the wrapped model per backward (what DDP and DeepSpeed's engine count on): with the
        # regularizer on, the clean pass uses the unwrapped module and the perturbed pass the wrapped one.
        clean_net = self.ctx.base_model if opts.weight > 0 else model
        logits = clean_net(inputs_embeds=embeds, **extra).logits
        task = task_loss(logits, labels)
        loss = task
        logs = {"task_loss": task.detach()}

        if opts.weight > 0:
            key = mix_key(self.ctx.seed, micro_step, _NOISE_STREAM)
            row_keys = noise_row_keys(batch, self.cfg.rng == "keyed")
            token = attention_mask.to(torch.float32).unsqueeze(-1)
            delta = normal_noise(tuple(embeds.shape), row_keys, key, embeds.device) * opts.noise_std * token
            target = logits.detach()
            clean = embeds.detach()
            for _ in range(opts.steps):
                delta.requires_grad_(True)
                # The unwrapped module: only delta needs a gradient, so no data-parallel hook may fire.
                perturbed = self.ctx.base_model(inputs_embeds=clean + delta.to(clean.dtype), **extra).logits
                (grad,) = torch.autograd.grad(ascent_divergence(perturbed, target), delta)
                delta = smart_ascent(delta.detach(), grad, opts.step_size, opts.norm_eps) * token
            adv_logits = model(inputs_embeds=embeds + delta.detach().to(embeds.dtype), **extra).logits
            regularizer = smoothness(logits, adv_logits)
            loss = loss + opts.weight * regularizer
            logs["smoothness"] = regularizer.detach()

        if opts.bregman_mu > 0:
            self._update_teacher(step)
            teacher = self._teacher_logits(batch)
            proximal = smoothness(logits, teacher) if logits.shape[-1] == 1 else symmetric_kl(teacher, logits).mean()
            loss = loss + opts.bregman_mu * proximal
            logs["bregman"] = proximal.detach()
        return StepOutput(loss, logits.detach(), logs)

    def state_dict(self) -> dict[str, Any]:
        """The EMA teacher (fp32, on CPU) and the step it was last updated at."""
        teacher = None if self.teacher is None else {n: t.detach().cpu().clone() for n, t in self.teacher.items()}
        return {"teacher": teacher, "teacher_step": self.teacher_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` (teacher tensors moved to the model's device)."""
        self.teacher_step = int(state["teacher_step"])
        teacher = state.get("teacher")
        if teacher is None:
            self.teacher = None
            return
        device = next(self.ctx.base_model.parameters()).device
        self.teacher = {name: value.to(device=device, dtype=torch.float32).clone() for name, value in teacher.items()}
