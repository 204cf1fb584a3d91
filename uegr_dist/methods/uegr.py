"""UEGR: adversarial embeddings + K adaptive-dropout sub-models in one stacked forward (forward stage), then
saliency scores and a top-rho gradient mask (backward stage). DESIGN.md §1 gives the equations; every choice the
paper's abstract leaves open is a config option (`MethodConfig`); the README's "Choices we had to make" lists the
choices and why (there is no reference code to deviate from)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from uegr_dist.backward import GradientMasker, MaskedAdamW, MaskOptions, ZeroGradientMasker, is_deepspeed_engine
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
        drop = cfg.dropout
        self.schedule: DropoutRateSchedule | None = None
        self.masker: GradientMasker | ZeroGradientMasker | None = None
        self.n_chunks = drop.k + 1
        self.masks_gradients = cfg.mask.enabled

    def setup(self, ctx: MethodContext) -> None:
        """Install per-chunk dropout on the unwrapped model and build the rate schedule and the gradient masker."""
        super().setup(ctx)
        drop, mask = self.cfg.dropout, self.cfg.mask
        self.controller = install_chunk_dropout(ctx.base_model)
        self.embeddings = ctx.base_model.get_input_embeddings()
        self.schedule = DropoutRateSchedule(
            drop.k, drop.p_min, drop.p_max, mode=drop.schedule, target_js=drop.target_js, gain=drop.gain, seed=ctx.seed
        )
        if mask.enabled:
            options = MaskOptions.from_config(mask, seed=ctx.seed)
            if is_deepspeed_engine(ctx.model):
                # The ZeRO step runs inside accelerator.backward: the masker hooks into it and clips there.
                self.masker = ZeroGradientMasker(
                    ctx.model, ctx.named_parameters, options, max_grad_norm=ctx.max_grad_norm
                )
            else:
                self.masker = GradientMasker(ctx.named_parameters, options)

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
        measured = agreement.item()
        if cfg.dropout.schedule == "adaptive":
            reduce = self.ctx.reduce_mean or float
            self.schedule.update(reduce(measured))
        logs = {
            "task_loss": clean_loss.item(),
            "adv_loss": adv_loss.item(),
            "consistency": measured,
            "rate_mean": sum(rates) / len(rates),
        }
        return StepOutput(loss, logits[0].detach(), logs)

    def transform_gradients(self, step: int) -> dict[str, float]:
        """Saliency + top-rho mask on the reduced gradients; hand the kept set to a MaskedAdamW."""
        if self.masker is None:
            return {}
        if isinstance(self.masker, ZeroGradientMasker):
            stats = self.masker.last_stats  # the masked ZeRO step already ran inside accelerator.backward
            assert stats is not None
            return {"mask_kept_fraction": stats.keep_fraction}
        stats = self.masker.apply_(step)
        optimizer = getattr(self.ctx.optimizer, "optimizer", self.ctx.optimizer)
        if isinstance(optimizer, MaskedAdamW):
            optimizer.set_update_masks(self.masker.update_masks())
        return {"mask_kept_fraction": stats.kept / max(stats.total, 1)}

    def teardown(self) -> None:
        """Restore the model's original dropout modules and attention implementation."""
        self.controller.remove()

    def state_dict(self) -> dict[str, Any]:
        """Rate controller and saliency EMA state."""
        assert self.schedule is not None
        return {
            "schedule": self.schedule.state_dict(),
            "masker": self.masker.state_dict() if self.masker is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        assert self.schedule is not None
        self.schedule.load_state_dict(state["schedule"])
        if self.masker is not None and state.get("masker") is not None:
            self.masker.load_state_dict(state["masker"])
