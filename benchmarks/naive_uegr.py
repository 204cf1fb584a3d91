"""A naive UEGR step, the slow and obvious way: the reference our fast implementation is timed against.

One optimizer step on a batch:
1. adversary: delta_0 ~ U(-s, s) on tokens, `steps` normalized ascent steps projected onto the eps-ball, each a
   separate forward at the model's own dropout rates and `torch.autograd.grad` on delta;
2. K + 1 sequential forwards: the clean pass at the model's rates, then sub-model k on e + delta with every
   `nn.Dropout` module's `p` set to its rate (attention dropout reads the module's `p` too), one backward;
3. a Python loop over the parameter tensors builds the saliency vector of the whole model, `torch.topk` over it
   picks the kept coordinates, and a second loop zeroes the others;
4. clipping and AdamW written out per tensor, leaving masked coordinates and their moments untouched.

Same objective and update as `uegr_dist.methods.UEGR` + `MaskedAdamW` (tests/test_benchmarks.py checks it); hard masks
with scope "global" or "per_tensor" and saliency "taylor" or "grad_sq" only. It lives in benchmarks/ only: nothing in
the package may use it.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import StageTimer
from uegr_dist.config import MethodConfig
from uegr_dist.forward import DropoutRateSchedule

SHARED_SITES = ("pos_dropout",)  # DeBERTa's relative-position dropout keeps its base rate, as in the fast path


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """The loop's rule: biases, LayerNorm weights and other 1-D parameters are not decayed."""
    return param.dim() < 2 or "LayerNorm" in name or "layernorm" in name


class NaiveUEGR:
    """The slow reference UEGR trainer for one model (owns its AdamW state)."""

    def __init__(
        self,
        model: nn.Module,
        cfg: MethodConfig,
        *,
        lr: float,
        weight_decay: float,
        max_grad_norm: float,
        seed: int,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        timer: StageTimer | None = None,
    ) -> None:
        mask = cfg.mask
        if mask.enabled and (mask.kind != "hard" or mask.scope not in ("global", "per_tensor")):
            raise ValueError(f"naive UEGR: only hard masks of scope global / per_tensor, got {mask.kind} {mask.scope}")
        if mask.enabled and mask.saliency not in ("taylor", "grad_sq"):
            raise ValueError(f"naive UEGR: saliency taylor or grad_sq only, got {mask.saliency!r}")
        self.model, self.cfg = model, cfg
        self.lr, self.weight_decay, self.max_grad_norm = lr, weight_decay, max_grad_norm
        self.betas, self.eps = betas, eps
        self.timer = timer or StageTimer()
        self.schedule = DropoutRateSchedule(
            cfg.dropout.k,
            cfg.dropout.p_min,
            cfg.dropout.p_max,
            mode=cfg.dropout.schedule,
            target_js=cfg.dropout.target_js,
            gain=cfg.dropout.gain,
            seed=seed,
        )
        self.dropouts = [
            (module, module.p)
            for name, module in model.named_modules()
            if isinstance(module, nn.Dropout) and name.rsplit(".", 1)[-1] not in SHARED_SITES
        ]
        # The loop's optimizer order (decayed parameters, then the rest): ties in the mask go to the earlier one.
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.named = [(n, p) for n, p in trainable if not no_weight_decay(n, p)]
        self.named += [(n, p) for n, p in trainable if no_weight_decay(n, p)]
        patterns = [re.compile(p) for p in mask.exclude]
        self.masked_names = {n for n, _ in self.named if not any(p.search(n) for p in patterns)}
        self.state: dict[str, dict[str, Any]] = {}
        self.last_masks: dict[str, torch.Tensor] = {}

    def _set_rate(self, rate: float | None) -> None:
        for module, base in self.dropouts:
            module.p = base if rate is None else rate

    def _forward(self, embeds: torch.Tensor, batch: dict[str, torch.Tensor], rate: float | None) -> torch.Tensor:
        self._set_rate(rate)
        try:
            return self.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
        finally:
            self._set_rate(None)

    def _adversary(self, embeds: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        adv = self.cfg.adversary
        clean = embeds.detach()
        token = batch["attention_mask"].to(torch.float32).unsqueeze(-1)
        delta = (2.0 * torch.rand(clean.shape, device=clean.device) - 1.0) * adv.init_scale * token
        delta = self._project(delta)
        for _ in range(adv.steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(self._forward(clean + delta, batch, None).float(), batch["labels"])
            (grad,) = torch.autograd.grad(loss, delta)
            grad = grad * token
            if adv.norm == "l2":
                scale = grad.flatten(1).norm(dim=1)
            else:
                scale = grad.flatten(1).abs().amax(dim=1)
            delta = self._project(delta.detach() + adv.step_size * grad / (scale + 1e-12).view(-1, 1, 1))
        return delta.detach()

    def _project(self, delta: torch.Tensor) -> torch.Tensor:
        eps = self.cfg.adversary.eps
        if self.cfg.adversary.norm == "linf":
            return delta.clamp(-eps, eps)
        length = delta.flatten(1).norm(dim=1)
        return delta * (eps / (length + 1e-12)).clamp(max=1.0).view(-1, 1, 1)

    def _objective(self, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, float]:
        cfg, timer = self.cfg, self.timer
        embeds = self.model.get_input_embeddings()(batch["input_ids"])
        with timer("adversary"):
            delta = self._adversary(embeds, batch)
        with timer("forward"):
            rates = self.schedule.rates(step)
            logits = [self._forward(embeds, batch, None)]
            for rate in rates:
                logits.append(self._forward(embeds + delta, batch, rate))
            labels = batch["labels"]
            clean = F.cross_entropy(logits[0].float(), labels)
            sub = torch.stack([F.cross_entropy(lg.float(), labels) for lg in logits[1:]]).mean()
            probs = torch.stack([lg.float().softmax(-1) for lg in logits[1:]])  # [K, B, C]

            def entropy(p: torch.Tensor) -> torch.Tensor:
                return -(p * p.clamp_min(1e-30).log()).sum(-1)

            js = (entropy(probs.mean(0)) - entropy(probs).mean(0)).mean()
            loss = clean + cfg.alpha * sub + cfg.beta * js
        if cfg.dropout.schedule == "adaptive":
            self.schedule.update(js.item())
        return loss, js.item()

    @torch.no_grad()
    def _mask(self) -> None:
        """Saliency of every coordinate in one vector, torch.topk over it, then zero the dropped gradients."""
        mask_cfg = self.cfg.mask
        names, scores = [], []
        for name, param in self.named:
            if name not in self.masked_names or param.grad is None:
                continue
            grad = param.grad.float()
            score = (param.float() * grad).abs() if mask_cfg.saliency == "taylor" else grad * grad
            names.append(name)
            scores.append(score.flatten())
        params = dict(self.named)
        self.last_masks = {}
        if mask_cfg.scope == "global":
            full = torch.cat(scores)
            pieces = _top_k_mask(full, _keep_count(mask_cfg.ratio, full.numel())).split([s.numel() for s in scores])
        else:
            pieces = [_top_k_mask(score, _keep_count(mask_cfg.ratio, score.numel())) for score in scores]
        for name, piece in zip(names, pieces):
            param = params[name]
            self.last_masks[name] = piece.view(param.shape)
            param.grad.mul_(self.last_masks[name])

    @torch.no_grad()
    def _clip(self) -> None:
        grads = [p.grad for _, p in self.named if p.grad is not None]
        total = math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads))
        if total > self.max_grad_norm:
            for g in grads:
                g.mul_(self.max_grad_norm / (total + 1e-6))

    @torch.no_grad()
    def _adamw(self) -> None:
        beta1, beta2 = self.betas
        for name, param in self.named:
            if param.grad is None:
                continue
            state = self.state.setdefault(name, {"step": 0, "m": torch.zeros_like(param), "v": torch.zeros_like(param)})
            state["step"] += 1
            t, grad = state["step"], param.grad
            keep = self.last_masks.get(name)
            decay = 0.0 if no_weight_decay(name, param) else self.weight_decay
            m = beta1 * state["m"] + (1 - beta1) * grad
            v = beta2 * state["v"] + (1 - beta2) * grad * grad
            denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(self.eps)
            new = param * (1 - self.lr * decay) - (self.lr / (1 - beta1**t)) * m / denom
            if keep is None:
                state["m"], state["v"] = m, v
                param.copy_(new)
            else:
                state["m"] = torch.where(keep, m, state["m"])
                state["v"] = torch.where(keep, v, state["v"])
                param.copy_(torch.where(keep, new, param))

    def step(self, batch: dict[str, torch.Tensor], step: int) -> float:
        """One optimizer step on `batch` (input_ids, attention_mask [B, S], labels [B]); returns the loss."""
        timer = self.timer
        loss, _ = self._objective(batch, step)
        with timer("backward"):
            loss.backward()
        if self.cfg.mask.enabled:
            with timer("saliency_mask"):
                self._mask()
        if self.max_grad_norm > 0:
            self._clip()  # untimed, like the loop's clipping: it lands in the "other" part of the step
        with timer("optimizer"):
            self._adamw()
        self.model.zero_grad(set_to_none=True)
        return loss.item()


def _top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest scores [n]; among scores equal to the k-th largest, the earliest positions."""
    threshold = torch.topk(scores, k).values[-1]
    keep = scores > threshold
    ties = (scores == threshold).nonzero().flatten()
    keep[ties[: k - int(keep.sum())]] = True
    return keep


def _keep_count(ratio: float, numel: int) -> int:
    """ceil(ratio * numel), at least 1, computed on the decimal the ratio prints as."""
    return min(numel, max(1, math.ceil(round(ratio * numel, 9))))
