"""MAT, Mixed-strategy Adversarial Training for fine-tuning pretrained language models (Zhong et al., IJCAI 2023):
a sampling approximation of a mixed-strategy equilibrium between perturbations delta of the input embeddings and
the parameters theta.

Per batch, with e = E(x) and l_s(a, b) = KL(softmax a || softmax b) + KL(softmax b || softmax a):
1. delta_0 ~ N(0, init_std^2) on non-pad tokens, delta_bar = delta_0; K_delta SGLD ascent steps
   delta <- delta + eta_delta * grad_delta l_s(f(e + delta), f(e)) + sqrt(2 eta_delta) sigma_delta xi,
   delta_bar <- beta delta_bar + (1 - beta) delta (f(e) fixed during the ascent);
2. theta_0 = theta, theta_bar = theta_0; K_theta SGLD descent steps
   theta <- theta - eta_theta * grad_theta [CE(f(e), y) + lambda_s l_s(f(e + delta_bar), f(e))]
   + sqrt(2 eta_theta) sigma_theta xi, theta_bar <- beta theta_bar + (1 - beta) theta;
3. theta <- beta theta_0 + (1 - beta) theta_bar.

The method updates the parameters itself (plain SGLD, as the algorithm states): it leaves no gradient, so the loop's
optimizer step changes nothing (and `train.lr` / its schedule do not apply; eta_theta is the step size). Each
descent step's gradient is averaged over processes with one explicit all-reduce and the theta noise is drawn from a
generator seeded by (seed, step) on every process, so DDP replicas stay identical. The logged loss is the task
loss at theta_0.

Deviations / choices: the random numbers of delta (start and noise) come from the process's torch generator (per
sample, not keyed); the clean logits inside l_s keep their gradient in the descent steps (both sides of the
symmetric KL depend on theta); no gradient clipping (the loop's clipping sees no gradient). Not supported (start-up
errors): train.grad_accum > 1 and DeepSpeed (its engine owns the parameter update). Cost: K_delta + 2 K_theta
forward-backward passes per batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from uegr_dist.backward import is_deepspeed_engine
from uegr_dist.config import ConfigError, MethodConfig
from uegr_dist.forward import symmetric_kl
from uegr_dist.methods.base import MethodContext, StepOutput, model_inputs, task_loss
from uegr_dist.methods.vanilla import Vanilla
from uegr_dist.rng import mix_key

_THETA_NOISE_STREAM = 0x4D4154


def _symmetric_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """logits a, b [B, C] -> scalar: batch mean of KL(p_a || p_b) + KL(p_b || p_a), in float32."""
    return symmetric_kl(a, b).mean()


class MAT(Vanilla):
    """SGLD over embedding perturbations and parameters with EMAs and a final interpolation."""

    name = "mat"

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg.mat

    def setup(self, ctx: MethodContext) -> None:
        """Refuse DeepSpeed (its engine steps the parameters inside backward)."""
        if is_deepspeed_engine(ctx.model):
            raise ConfigError(
                "method.name = mat: MAT updates the parameters itself (SGLD), which DeepSpeed's engine owns; "
                "use one process or DDP"
            )
        super().setup(ctx)
        self.params = [param for _, param in ctx.named_parameters]

    def _logits(self, embeds: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        extra = {k: v for k, v in model_inputs(batch).items() if k != "input_ids"}
        return self.ctx.base_model(inputs_embeds=embeds, **extra).logits

    def _perturbation(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """delta_bar [B, S, D] after K_delta SGLD ascent steps on l_s (parameters untouched)."""
        cfg = self.cfg
        with torch.no_grad():
            embeds = self.ctx.base_model.get_input_embeddings()(batch["input_ids"])
            clean = self._logits(embeds, batch)
        token = batch["attention_mask"].to(embeds.dtype).unsqueeze(-1)
        delta = torch.randn_like(embeds) * cfg.init_std * token
        delta_bar = delta.clone()
        for _ in range(cfg.k_delta):
            delta.requires_grad_(True)
            (grad,) = torch.autograd.grad(_symmetric_kl(self._logits(embeds + delta, batch), clean), [delta])
            noise = torch.randn_like(delta) * math.sqrt(2 * cfg.eta_delta) * cfg.sigma_delta
            delta = (delta.detach() + cfg.eta_delta * grad + noise) * token
            delta_bar.mul_(cfg.beta).add_(delta, alpha=1 - cfg.beta)
        return delta_bar

    def forward_backward(
        self, accelerator: Any, model: nn.Module, batch: dict[str, torch.Tensor], step: int, micro_step: int
    ) -> StepOutput:
        """Sample delta_bar, take K_theta SGLD steps on theta, interpolate; leaves no gradient for the optimizer."""
        cfg = self.cfg
        with accelerator.autocast():
            delta_bar = self._perturbation(batch)
        start = [p.detach().clone() for p in self.params]
        theta_bar = [p.clone() for p in start]
        generator = torch.Generator(device=start[0].device).manual_seed(
            mix_key(self.ctx.seed, _THETA_NOISE_STREAM, step) & (2**63 - 1)
        )
        first_loss: torch.Tensor | None = None
        for _ in range(cfg.k_theta):
            with accelerator.autocast():
                embeds = self.ctx.base_model.get_input_embeddings()(batch["input_ids"])
                clean = self._logits(embeds, batch)
                loss = task_loss(clean, batch["labels"])
                objective = loss + cfg.lambda_s * _symmetric_kl(self._logits(embeds + delta_bar, batch), clean)
            if first_loss is None:
                first_loss, first_logits = loss.detach(), clean.detach()
            grads = torch.autograd.grad(objective, self.params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
            if self.ctx.all_reduce_sum is not None:
                flat = torch.cat([g.reshape(-1) for g in grads]) / self.ctx.num_processes
                self.ctx.all_reduce_sum(flat)
                grads = [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]
            with torch.no_grad():
                torch._foreach_add_([p.data for p in self.params], grads, alpha=-cfg.eta_theta)
                if cfg.sigma_theta > 0:
                    scale = math.sqrt(2 * cfg.eta_theta) * cfg.sigma_theta
                    noise = [torch.randn(p.shape, generator=generator, device=p.device) * scale for p in self.params]
                    torch._foreach_add_([p.data for p in self.params], noise)
                torch._foreach_lerp_(theta_bar, [p.detach() for p in self.params], 1 - cfg.beta)
        with torch.no_grad():
            torch._foreach_lerp_(start, theta_bar, 1 - cfg.beta)  # beta theta_0 + (1 - beta) theta_bar
            torch._foreach_copy_([p.data for p in self.params], start)
        assert first_loss is not None
        return StepOutput(first_loss, first_logits, {"task_loss": first_loss.item()})
