"""UEGR: adversarial embeddings + K adaptive-dropout sub-models in one stacked forward (forward stage), then
saliency scores and a top-rho gradient mask (backward stage, run by the optimizer's step: `gradient_mask`).
docs/design.md gives the equations; every choice the paper's abstract leaves open is a config option
(`MethodConfig`); the README's "Choices we had to make" lists the choices and why (there is no reference code to
deviate from)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from uegr_dist.backward import MaskOptions
from uegr_dist.config import MethodConfig
from uegr_dist.forward import (
    DropoutRateSchedule,
    install_chunk_dropout,
    js_divergence,
    perturb_embeddings,
    prediction_variance,
)
from uegr_dist.methods.base import Method, MethodContext, StepOutput, model_inputs, task_loss
from uegr_dist.rng import mix_key

# Stream ids of the keyed random draws of one micro-batch.
_ADVERSARY_STREAM, _STACKED_STREAM = 1, 2


def stacked_row_keys(sample_id: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """sample_id [B] -> int64 [n_chunks * B] keys; chunk c of sample i gets i * n_chunks + c in any batch layout."""
    chunks = torch.arange(n_chunks, device=sample_id.device).unsqueeze(1)
    return (sample_id.unsqueeze(0) * n_chunks + chunks).reshape(-1)


def consistency(sub_logits: torch.Tensor) -> torch.Tensor:
    """sub_logits [K, B, C] -> scalar: mean generalized JS divergence, or for regression (C = 1) the mean variance of
    the K predictions."""
    if sub_logits.shape[-1] == 1:
        return prediction_variance(sub_logits[..., 0]).mean()
    return js_divergence(sub_logits).mean()


class UEGR(Method):
    """Bi-stage UEGR. Ablations are config values: adversary.steps = 0 and init_scale = 0 (no adversary),
    beta = 0 (no JS term), mask.enabled = false (no mask), dropout.k (number of sub-models)."""

    name = "uegr"

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg
        self.schedule: DropoutRateSchedule | None = None
        self.n_chunks = cfg.dropout.k + 1

    def gradient_mask(self, seed: int) -> MaskOptions | None:
        """The top-rho saliency mask of `method.mask` (None when mask.enabled is false)."""
        mask = self.cfg.mask
        return MaskOptions.from_config(mask, seed=seed) if mask.enabled else None

    def setup(self, ctx: MethodContext) -> None:
        """Install per-chunk dropout on the unwrapped model and build the rate schedule."""
        super().setup(ctx)
        drop = self.cfg.dropout
        self.controller = install_chunk_dropout(ctx.base_model)
        self.embeddings = ctx.base_model.get_input_embeddings()
        self.schedule = DropoutRateSchedule(
            drop.k, drop.p_min, drop.p_max, mode=drop.schedule, target_js=drop.target_js, gain=drop.gain, seed=ctx.seed
        )

    def _adversarial_delta(
        self, batch: dict[str, torch.Tensor], embeds: torch.Tensor, key: int, keyed: bool
    ) -> torch.Tensor | None:
        """Embedding perturbation [B, S, D] from `adversary.steps` ascent steps on the clean-rate model."""
        adv = self.cfg.adversary
        if adv.steps == 0 and adv.init_scale == 0.0:
            return None
        extra = {k: v for k, v in model_inputs(batch).items() if k != "input_ids"}
        base = self.ctx.base_model
        sample_keys = batch["sample_id"] if keyed else None

        def adversary_loss(perturbed: torch.Tensor) -> torch.Tensor:
            # The unwrapped module: the ascent needs d/d(delta) only, so no data-parallel hooks may fire here.
            with self.controller.chunks([None], row_keys=sample_keys, key=mix_key(key, _ADVERSARY_STREAM, 1)):
                logits = base(inputs_embeds=perturbed, **extra).logits
            return task_loss(logits, batch["labels"])

        return perturb_embeddings(
            adversary_loss,
            embeds,
            batch["attention_mask"],
            eps=adv.eps,
            step_size=adv.step_size,
            steps=adv.steps,
            norm=adv.norm,
            init_scale=adv.init_scale,
            row_keys=sample_keys,
            key=mix_key(key, _ADVERSARY_STREAM, 0),
            relative=adv.relative,
        )

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int, micro_step: int) -> StepOutput:
        """L = task(clean) + alpha * mean_k task(sub-model k on e + delta) + beta * consistency(sub-models)."""
        assert self.schedule is not None
        cfg, k, n = self.cfg, self.cfg.dropout.k, self.n_chunks
        keyed = cfg.rng == "keyed"
        key = mix_key(self.ctx.seed, micro_step)
        labels = batch["labels"]
        embeds = self.embeddings(batch["input_ids"])  # [B, S, D]
        delta = self._adversarial_delta(batch, embeds, key, keyed)
        adv_embeds = embeds if delta is None else embeds + delta.to(embeds.dtype)

        rates = self.schedule.rates(step)
        stacked = torch.cat([embeds] + [adv_embeds] * k)  # [(K+1) B, S, D]: [clean; adv_1; ...; adv_K]
        extra = {
            name: value.repeat(n, *([1] * (value.dim() - 1)))
            for name, value in model_inputs(batch).items()
            if name != "input_ids"
        }
        row_keys = stacked_row_keys(batch["sample_id"], n) if keyed else None
        with self.controller.chunks([None, *rates], row_keys=row_keys, key=mix_key(key, _STACKED_STREAM)):
            logits = model(inputs_embeds=stacked, **extra).logits
        logits = logits.view(n, labels.shape[0], -1)  # [K+1, B, C]

        clean_loss = task_loss(logits[0], labels)
        adv_loss = torch.stack([task_loss(logits[i], labels) for i in range(1, n)]).mean()
        agreement = consistency(logits[1:])
        loss = clean_loss + cfg.alpha * adv_loss + cfg.beta * agreement
        if cfg.dropout.schedule == "adaptive":
            # Applied to the next step's rates; read on the host then, not now (no synchronization here).
            self.schedule.observe(self.ctx.backend.reduce_mean(agreement.detach()))
        logs = {
            "task_loss": clean_loss.detach(),
            "adv_loss": adv_loss.detach(),
            "consistency": agreement.detach(),
            "rate_mean": sum(rates) / len(rates),
        }
        return StepOutput(loss, logits[0].detach(), logs)

    def teardown(self) -> None:
        """Restore the model's original dropout modules and attention implementation."""
        self.controller.remove()

    def state_dict(self) -> dict[str, Any]:
        """The rate controller's state (the mask's saliency EMA is the optimizer's)."""
        assert self.schedule is not None
        return {"schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        assert self.schedule is not None
        self.schedule.load_state_dict(state["schedule"])
