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
optimizer step changes nothing (and `train.lr` / its schedule do not apply; eta_theta is the step size). Losses are
means over the global batch: each descent step's gradient is averaged over processes with one explicit all-reduce,
and the delta gradient of a process's rows is that of the global-batch mean (the local mean divided by the number of
processes). The theta noise is drawn from a generator seeded by (seed, step), identical on every process; with
`method.rng: keyed` delta's random numbers are keyed by (seed, micro-batch, sample id), so N processes reproduce one
process with the same global batch (with the model's dropout off or equal; MAT does not key dropout). The logged loss
is the task loss at theta_0.

Under DeepSpeed ZeRO-1/2 every process holds the whole model, so the SGLD steps run on full fp32 copies of theta
gathered from the ZeRO optimizer's fp32 master partitions (one all-gather per step; with bf16 parameters the
forward passes use their rounded copies). The result is written back into this process's master partition and into
the (possibly bf16) module parameters; the engine's optimizer never steps, so Adam's state stays empty and a
checkpoint holds the SGLD result.

Deviations / choices: with `method.rng: fast` delta's random numbers come from the process's torch generator (not
keyed by sample); the clean logits inside l_s keep their gradient in the descent steps (both sides of the symmetric
KL depend on theta); no gradient clipping (the loop's clipping sees no gradient). Not supported (start-up errors):
train.grad_accum > 1, ZeRO-3 (parameters are partitioned: every SGLD step would need them gathered), fp16 (no loss
scaling for the SGLD gradients) and DeepSpeed's BF16_Optimizer (bf16 + ZeRO-1 with fp32 gradient accumulation).
Cost: K_delta + 2 K_theta forward-backward passes per batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from uegr_dist.config import ConfigError, MethodConfig
from uegr_dist.forward import symmetric_kl
from uegr_dist.methods.base import MethodContext, StepOutput, model_inputs, task_loss
from uegr_dist.methods.noise import noise_row_keys, normal_noise
from uegr_dist.methods.vanilla import Vanilla
from uegr_dist.rng import mix_key

_THETA_NOISE_STREAM = 0x4D4154
_DELTA_INIT_STREAM = 0x4D4154_01
_DELTA_NOISE_STREAM = 0x4D4154_02


def _symmetric_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """logits a, b [B, C] -> scalar: batch mean of KL(p_a || p_b) + KL(p_b || p_a), in float32."""
    return symmetric_kl(a, b).mean()


class MAT(Vanilla):
    """SGLD over embedding perturbations and parameters with EMAs and a final interpolation."""

    name = "mat"
    steps_optimizer = False

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg.mat
        self.keyed = cfg.rng == "keyed"

    @property
    def needs_whole_parameters(self) -> str:
        """The SGLD steps update whole parameters."""
        return "its SGLD steps need whole parameters on every process"

    def setup(self, ctx: MethodContext) -> None:
        """Refuse fp16 loss scaling; where the optimizer keeps fp32 master weights apart (ZeRO-1/2), work on them."""
        super().setup(ctx)
        self.params = [param for _, param in ctx.named_parameters]
        if ctx.backend.fp16_loss_scaling:
            raise ConfigError("method.name = mat: DeepSpeed fp16 is not supported (no loss scaling for SGLD)")
        try:
            self.master = ctx.backend.fp32_master_weights(self.params)
        except (NotImplementedError, ValueError) as error:
            raise ConfigError(f"method.name = mat: {error}") from None

    def _logits(self, embeds: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        extra = {k: v for k, v in model_inputs(batch).items() if k != "input_ids"}
        return self.ctx.base_model(inputs_embeds=embeds, **extra).logits

    def _perturbation(self, batch: dict[str, torch.Tensor], micro_step: int) -> torch.Tensor:
        """delta_bar [B, S, D] after K_delta SGLD ascent steps on l_s (parameters untouched)."""
        cfg = self.cfg
        with torch.no_grad():
            embeds = self.ctx.base_model.get_input_embeddings()(batch["input_ids"])
            clean = self._logits(embeds, batch)
        token = batch["attention_mask"].to(embeds.dtype).unsqueeze(-1)
        row_keys = noise_row_keys(batch, self.keyed)
        key = mix_key(self.ctx.seed, micro_step)

        def normal(stream: int) -> torch.Tensor:
            if row_keys is None:
                return torch.randn_like(embeds)
            return normal_noise(tuple(embeds.shape), row_keys, stream, embeds.device).to(embeds.dtype)

        delta = normal(mix_key(key, _DELTA_INIT_STREAM)) * cfg.init_std * token
        delta_bar = delta.clone()
        for k in range(cfg.k_delta):
            delta.requires_grad_(True)
            # The global-batch mean: the local mean over num_processes equal shares.
            objective = _symmetric_kl(self._logits(embeds + delta, batch), clean) / self.ctx.backend.num_processes
            (grad,) = torch.autograd.grad(objective, [delta])
            noise = normal(mix_key(key, _DELTA_NOISE_STREAM, k)) * (math.sqrt(2 * cfg.eta_delta) * cfg.sigma_delta)
            delta = (delta.detach() + cfg.eta_delta * grad + noise) * token
            delta_bar.mul_(cfg.beta).add_(delta, alpha=1 - cfg.beta)
        return delta_bar

    def _skip(self, start: list[torch.Tensor], loss: torch.Tensor, logits: torch.Tensor) -> StepOutput:
        """A non-finite descent gradient: theta back to theta_0 (the master weights were not written yet), and a NaN
        loss for the loop's guard, which counts the skipped step (and stops the run after too many in a row)."""
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self.params], start)
        nan = torch.full_like(loss, math.nan)
        return StepOutput(nan, logits, {"task_loss": math.nan})

    def forward_backward(
        self, accelerator: Any, model: nn.Module, batch: dict[str, torch.Tensor], step: int, micro_step: int
    ) -> StepOutput:
        """Sample delta_bar, take K_theta SGLD steps on theta, interpolate; leaves no gradient for the optimizer."""
        cfg = self.cfg
        with accelerator.autocast():
            delta_bar = self._perturbation(batch, micro_step)
        # theta: the parameters themselves, or full fp32 copies of the ZeRO master weights (the module's parameters
        # then only carry their values into the forward passes).
        theta = [p.data for p in self.params] if self.master is None else self.master.gather()
        start = [t.clone() for t in theta]
        theta_bar = [t.clone() for t in theta]
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
            grads = [torch.zeros_like(t) if g is None else g.to(t.dtype) for t, g in zip(theta, grads)]
            backend = self.ctx.backend
            if backend.distributed:
                flat = torch.cat([g.reshape(-1) for g in grads]) / backend.num_processes
                backend.all_reduce_sum(flat)
                grads = [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]
            # A non-finite gradient on any process reaches every process through the all-reduce: all skip alike.
            if not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
                return self._skip(start, first_loss, first_logits)
            with torch.no_grad():
                torch._foreach_add_(theta, grads, alpha=-cfg.eta_theta)
                if cfg.sigma_theta > 0:
                    scale = math.sqrt(2 * cfg.eta_theta) * cfg.sigma_theta
                    noise = [torch.randn(t.shape, generator=generator, device=t.device) * scale for t in theta]
                    torch._foreach_add_(theta, noise)
                torch._foreach_lerp_(theta_bar, theta, 1 - cfg.beta)
                if self.master is not None:
                    torch._foreach_copy_([p.data for p in self.params], theta)
        with torch.no_grad():
            torch._foreach_lerp_(start, theta_bar, 1 - cfg.beta)  # beta theta_0 + (1 - beta) theta_bar
            torch._foreach_copy_([p.data for p in self.params], start)
            if self.master is not None:
                self.master.write(start)
        assert first_loss is not None
        return StepOutput(first_loss, first_logits, {"task_loss": first_loss.detach()})
