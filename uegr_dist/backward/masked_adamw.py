"""AdamW whose update can be restricted, for one step, to a chosen set of coordinates (UEGR's selective update)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter, ICLR 2019: decoupled weight decay, bias-corrected moments) with update masks.

    Zeroing a coordinate's gradient is not enough to leave it alone under AdamW: its first moment still carries
    earlier gradients into the parameter, its moments decay, and weight decay shrinks it. So for a parameter given
    a bool update mask (`set_update_masks`, consumed by the next `step`), the False coordinates keep their value
    and both moments unchanged for that step, with no weight decay; True coordinates, and every coordinate of a
    parameter without a mask, get the standard AdamW update. Bias correction uses the parameter's step count
    (every step in which it has a gradient, masked or not), as in `torch.optim.AdamW`, whose state layout
    ("step", "exp_avg", "exp_avg_sq") this optimizer shares. No amsgrad / maximize options.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must both be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self._masks: dict[torch.Tensor, torch.Tensor] = {}

    def set_update_masks(self, masks: Mapping[torch.nn.Parameter, torch.Tensor] | None) -> None:
        """Bool masks (shaped like their parameter; True = update) for the next `step` only; None clears them."""
        if masks is None:
            self._masks = {}
            return
        known = {param for group in self.param_groups for param in group["params"]}
        for param, mask in masks.items():
            if param not in known:
                raise ValueError(f"update mask given for a tensor of shape {tuple(param.shape)} not in this optimizer")
            if mask.dtype != torch.bool or mask.shape != param.shape or mask.device != param.device:
                raise ValueError(
                    f"update mask must be bool, shaped and placed like its parameter {tuple(param.shape)} on "
                    f"{param.device}, got {mask.dtype} {tuple(mask.shape)} on {mask.device}"
                )
        self._masks = dict(masks)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW step on every parameter with a gradient, honouring (then clearing) the update masks."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            for group in self.param_groups:
                plain: list[tuple[torch.Tensor, dict[str, Any]]] = []
                masked: list[tuple[torch.Tensor, dict[str, Any]]] = []
                for param in group["params"]:
                    if param.grad is None:
                        continue
                    if param.grad.is_sparse:
                        raise ValueError("MaskedAdamW does not support sparse gradients")
                    state = self.state[param]
                    if not state:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["step"] += 1
                    (masked if param in self._masks else plain).append((param, state))
                _adamw_update_(plain, None, group)
                _adamw_update_(masked, [self._masks[param] for param, _ in masked], group)
        finally:
            self._masks = {}
        return loss


# The update works on groups of parameters of about this many elements at a time, so its temporaries (the
# denominator; masked: the mask as floats and two scratch buffers) stay this size whatever the model's (a parameter
# larger than this is one group of its own).
UPDATE_CHUNK_ELEMENTS = 1 << 23


def _adamw_update_(
    entries: list[tuple[torch.Tensor, dict[str, Any]]], masks: list[torch.Tensor] | None, group: dict[str, Any]
) -> None:
    """AdamW update of (param, state) pairs in place with foreach ops; masks: bool tensors shaped like the params.

    Masked form, written as increments scaled by the mask (m += (1 - beta1) * mask * (g - m), ...), so a False
    coordinate keeps its parameter and both moments bit for bit. Both forms run over groups of about
    UPDATE_CHUNK_ELEMENTS elements (the masked one with two reused scratch buffers per parameter); the gradient is
    left as it was.
    """
    chunk: list[int] = []
    size = 0
    for i, (param, _) in enumerate(entries):
        chunk.append(i)
        size += param.numel()
        if size >= UPDATE_CHUNK_ELEMENTS or i == len(entries) - 1:
            _update_([entries[j] for j in chunk], None if masks is None else [masks[j] for j in chunk], group)
            chunk, size = [], 0


def _update_(
    entries: list[tuple[torch.Tensor, dict[str, Any]]], bool_masks: list[torch.Tensor] | None, group: dict[str, Any]
) -> None:
    """One group of parameters (see `_adamw_update_`). Unmasked: torch.optim.AdamW's in-place form."""
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    params = [param for param, _ in entries]
    grads = [param.grad for param in params]
    exp_avgs = [state["exp_avg"] for _, state in entries]
    exp_avg_sqs = [state["exp_avg_sq"] for _, state in entries]
    # Bias corrections from each parameter's step count (a CPU tensor: no device sync).
    steps = [state["step"].item() for _, state in entries]
    root_corrections = [math.sqrt(1.0 - beta2**t) for t in steps]
    step_sizes = [-lr / (1.0 - beta1**t) for t in steps]
    if bool_masks is None:
        if weight_decay != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, root_corrections)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)
        return
    masks = [mask.to(param.dtype) for param, mask in zip(params, bool_masks)]
    if weight_decay != 0.0:
        torch._foreach_addcmul_(params, params, masks, value=-lr * weight_decay)
    # v += (1 - beta2) * mask * (g^2 - v), then m += (1 - beta1) * mask * (g - m), in scratch buffers a and b.
    a = torch._foreach_mul(grads, grads)
    torch._foreach_sub_(a, exp_avg_sqs)
    torch._foreach_mul_(a, masks)
    torch._foreach_add_(exp_avg_sqs, a, alpha=1.0 - beta2)
    b = torch._foreach_sub(grads, exp_avgs)
    torch._foreach_mul_(b, masks)
    torch._foreach_add_(exp_avgs, b, alpha=1.0 - beta1)
    # a <- sqrt(v) / sqrt(1 - beta2^t) + eps; b <- mask * m; theta += step_size * b / a.
    torch._foreach_copy_(a, exp_avg_sqs)
    torch._foreach_sqrt_(a)
    torch._foreach_div_(a, root_corrections)
    torch._foreach_add_(a, eps)
    torch._foreach_copy_(b, exp_avgs)
    torch._foreach_mul_(b, masks)
    torch._foreach_addcdiv_(params, b, a, step_sizes)
