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
    an update mask (`set_update_masks`, consumed by the next `step`), the dropped coordinates keep their value
    and both moments unchanged for that step, with no weight decay; kept coordinates, and every coordinate of a
    parameter without a mask, get the standard AdamW update. Bias correction uses the parameter's step count
    (every step in which it has a gradient, masked or not), as in `torch.optim.AdamW`, whose state layout
    ("step", "exp_avg", "exp_avg_sq") this optimizer shares. No amsgrad / maximize options.

    A step gate (`set_step_gate`: a bool 0-dim tensor on the parameters' device) decides on the device whether the
    next step changes anything: when it is False no parameter or moment moves (the gradients are zeroed), so a
    non-finite step can be skipped without reading the decision on the host; the step counts still advance until
    `undo_step_counts` takes them back. The step counts live on the host (CPU tensors, as in torch's AdamW) and are
    mirrored in Python, so a step reads no tensor value.
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
        self._gate: torch.Tensor | None = None
        self._counts: dict[torch.Tensor, tuple[torch.Tensor, int, int]] = {}
        self._last_stepped: list[torch.Tensor] = []
        self._scratch: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}

    def set_update_masks(self, masks: Mapping[torch.nn.Parameter, torch.Tensor] | None) -> None:
        """Update masks for the next `step` only (None clears them): bool (True = update), or 0 / 1 in the
        parameter's floating dtype (what the gradient masker hands over: no conversion), shaped and placed like
        their parameter."""
        if masks is None:
            self._masks = {}
            return
        known = {param for group in self.param_groups for param in group["params"]}
        for param, mask in masks.items():
            if param not in known:
                raise ValueError(f"update mask given for a tensor of shape {tuple(param.shape)} not in this optimizer")
            if mask.dtype not in (torch.bool, param.dtype) or mask.shape != param.shape or mask.device != param.device:
                raise ValueError(
                    f"update mask must be bool (or 0 / 1 in the parameter's dtype), shaped and placed like its "
                    f"parameter {tuple(param.shape)} on {param.device}, got {mask.dtype} {tuple(mask.shape)} on "
                    f"{mask.device}"
                )
        self._masks = dict(masks)

    def set_step_gate(self, gate: torch.Tensor | None) -> None:
        """A bool 0-dim tensor deciding on the device whether the next `step` updates anything (None: it does)."""
        if gate is not None and (gate.dtype != torch.bool or gate.dim() != 0):
            raise ValueError(f"step gate must be a bool 0-dim tensor, got {gate.dtype} of shape {tuple(gate.shape)}")
        self._gate = gate

    def undo_step_counts(self) -> None:
        """Take back the step-count increments of the last `step` (after its gate turned out False)."""
        for param in self._last_stepped:
            state = self.state[param]
            step = state["step"]
            step -= 1
            cached = self._counts.get(param)
            if cached is not None and cached[0] is step:
                self._counts[param] = (step, step._version, cached[2] - 1)
        self._last_stepped = []

    def _advance_count(self, param: torch.Tensor, state: dict[str, Any]) -> int:
        """Add one to the parameter's step count and return it, from the Python mirror (the tensor is read only
        when something else replaced or changed it, e.g. after `load_state_dict`)."""
        step = state["step"]
        cached = self._counts.get(param)
        if cached is not None and cached[0] is step and cached[1] == step._version:
            value = cached[2]
        else:
            value = int(step.item())  # a host tensor (CPU) in this optimizer's state layout
        step += 1
        self._counts[param] = (step, step._version, value + 1)
        return value + 1

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW step on every parameter with a gradient, honouring (then clearing) the update masks and the
        step gate."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gate, self._gate = self._gate, None
        self._last_stepped = []
        try:
            for group in self.param_groups:
                plain: list[tuple[torch.Tensor, dict[str, Any], int]] = []
                masked: list[tuple[torch.Tensor, dict[str, Any], int]] = []
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
                        self._counts[param] = (state["step"], state["step"]._version, 0)
                    count = self._advance_count(param, state)
                    self._last_stepped.append(param)
                    (masked if param in self._masks else plain).append((param, state, count))
                if gate is not None:
                    _sanitize_([param.grad for param, _, _ in plain + masked], gate)
                self._update(plain, None, group, gate)
                self._update(masked, [self._masks[param] for param, _, _ in masked], group, gate)
        finally:
            self._masks = {}
        return loss

    def _update(
        self,
        entries: list[tuple[torch.Tensor, dict[str, Any], int]],
        masks: list[torch.Tensor] | None,
        group: dict[str, Any],
        gate: torch.Tensor | None,
    ) -> None:
        """The update of (param, state, step count) entries in pieces of at most UPDATE_CHUNK_ELEMENTS elements."""
        pieces: list[_Piece] = []
        size = 0
        for i, (param, state, count) in enumerate(entries):
            numel = param.numel()
            mask = None if masks is None else masks[i]
            tensors = [param, param.grad, state["exp_avg"], state["exp_avg_sq"]] + ([] if mask is None else [mask])
            flat = numel > UPDATE_CHUNK_ELEMENTS and all(t.is_contiguous() for t in tensors)
            step = UPDATE_CHUNK_ELEMENTS if flat else numel
            for start in range(0, numel, step):
                stop = min(start + step, numel)
                if flat:  # a large parameter in slices (every operation is element-wise)
                    piece = _Piece(
                        param.view(-1)[start:stop],
                        param.grad.view(-1)[start:stop],
                        state["exp_avg"].view(-1)[start:stop],
                        state["exp_avg_sq"].view(-1)[start:stop],
                        None if mask is None else mask.view(-1)[start:stop],
                        count,
                    )
                else:
                    piece = _Piece(param, param.grad, state["exp_avg"], state["exp_avg_sq"], mask, count)
                if size + piece.param.numel() > UPDATE_CHUNK_ELEMENTS and pieces:
                    _update_(pieces, group, gate, self._scratch_for(pieces[0].param, size))
                    pieces, size = [], 0
                pieces.append(piece)
                size += piece.param.numel()
        if pieces:
            _update_(pieces, group, gate, self._scratch_for(pieces[0].param, size))

    def _scratch_for(self, like: torch.Tensor, size: int) -> list[torch.Tensor] | None:
        """Three flat buffers of at least `size` elements kept across steps (CPU: a fresh large allocation costs
        page faults on every step); None on other devices (their allocators cache freed blocks)."""
        if like.device.type != "cpu":
            return None
        key = (like.device, like.dtype)
        buffers = self._scratch.get(key)
        if buffers is None or buffers[0].numel() < size:
            buffers = [torch.empty(max(size, UPDATE_CHUNK_ELEMENTS), dtype=like.dtype) for _ in range(3)]
            self._scratch[key] = buffers
        return buffers

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's `load_state_dict`; the step-count mirror is rebuilt from the loaded counts on the next step."""
        super().load_state_dict(state_dict)
        self._counts = {}


# Parameters are updated in groups (large ones in slices) of about this many elements at a time, so the update's
# temporaries stay this size whatever the model's.
UPDATE_CHUNK_ELEMENTS = 1 << 23


class _Piece:
    """A parameter (or a slice of one) with its gradient, moments, update mask (or None) and step count."""

    __slots__ = ("param", "grad", "exp_avg", "exp_avg_sq", "mask", "count")

    def __init__(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        mask: torch.Tensor | None,
        count: int,
    ) -> None:
        self.param, self.grad, self.exp_avg, self.exp_avg_sq, self.mask, self.count = (
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            mask,
            count,
        )


def _sanitize_(grads: list[torch.Tensor], gate: torch.Tensor) -> None:
    """Gradients times the gate, then NaN and inf to 0: unchanged when the gate is True, all zeros when False (so
    that the gated update's arithmetic stays finite)."""
    if grads:
        torch._foreach_mul_(grads, gate.to(grads[0].dtype))
        for grad in grads:
            torch.nan_to_num_(grad, nan=0.0, posinf=0.0, neginf=0.0)


def _views(flat: torch.Tensor, likes: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of the start of a flat buffer shaped like `likes`, back to back."""
    views, start = [], 0
    for like in likes:
        views.append(flat[start : start + like.numel()].view(like.shape))
        start += like.numel()
    return views


def _update_(
    pieces: list[_Piece], group: dict[str, Any], gate: torch.Tensor | None, scratch: list[torch.Tensor] | None
) -> None:
    """AdamW update of one group of pieces in place (masks: all or none of the pieces have one).

    Unmasked: torch.optim.AdamW's foreach arithmetic. Masked, with a 0 / 1 mask M: decay p += -lr wd M p,
    m = lerp(m, g, (1 - beta1) M), v = lerp(v, g^2, (1 - beta2) M), p += step_size M m / (sqrt(v) / sqrt(1 -
    beta2^t) + eps): the same floating-point operations for kept coordinates as the increments this update used to
    write (m += (1 - beta1) M (g - m), ...; tests hold it to those bits), and a dropped coordinate keeps its
    parameter and both moments bit for bit. A gate (0-dim bool, gradients already zeroed when it is False) enters
    the weights: when False every weight is 0 and the denominators infinite, so nothing moves; when True the
    arithmetic is the ungated one, bit for bit. `scratch`: three flat buffers (CPU) for the temporaries; None:
    foreach operations allocate them.
    """
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    params = [piece.param for piece in pieces]
    grads = [piece.grad for piece in pieces]
    exp_avgs = [piece.exp_avg for piece in pieces]
    exp_avg_sqs = [piece.exp_avg_sq for piece in pieces]
    # Bias corrections from each parameter's step count (Python numbers: no tensor is read).
    root_corrections = [math.sqrt(1.0 - beta2**piece.count) for piece in pieces]
    step_sizes = [-lr / (1.0 - beta1**piece.count) for piece in pieces]
    size = sum(param.numel() for param in params)
    denom = None if scratch is None else _views(scratch[0], params)
    if pieces[0].mask is None:
        if gate is None:
            if weight_decay != 0.0:
                torch._foreach_mul_(params, 1.0 - lr * weight_decay)
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
        else:
            if weight_decay != 0.0:
                torch._foreach_mul_(params, _gated(gate, 1.0 - lr * weight_decay, 1.0, params[0]))
            weight = _gated(gate, 1.0 - beta1, 0.0, params[0])
            torch._foreach_lerp_(exp_avgs, grads, [weight] * len(exp_avgs))
            torch._foreach_mul_(exp_avg_sqs, _gated(gate, beta2, 1.0, params[0]))
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denom = _sqrt(exp_avg_sqs, denom)
        torch._foreach_div_(denom, root_corrections)
        if gate is None:
            torch._foreach_add_(denom, eps)
        else:  # a list of 0-dim tensors: the single-tensor form reads the value back on the host (CPU)
            torch._foreach_add_(denom, [_gated(gate, eps, math.inf, params[0])] * len(denom))
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)
        return
    # The masks as 0 / 1 factors (times the gate): the masker's float masks as they are, bool ones converted.
    masks = [piece.mask for piece in pieces]
    if gate is not None or masks[0].dtype == torch.bool:
        if scratch is None:
            factors = [mask.to(param.dtype) for mask, param in zip(masks, params)]
        else:
            factors = _views(scratch[1], params)
            torch._foreach_copy_(factors, masks)
        if gate is not None:
            torch._foreach_mul_(factors, gate.to(params[0].dtype))
    else:
        factors = masks
    if weight_decay != 0.0:
        torch._foreach_addcmul_(params, params, factors, value=-lr * weight_decay)
    if scratch is None:
        weights = torch._foreach_mul(factors, 1.0 - beta1)
        torch._foreach_lerp_(exp_avgs, grads, weights)
        weights = torch._foreach_mul(factors, 1.0 - beta2)
        squares = torch._foreach_mul(grads, grads)
    else:
        weights = _views(scratch[2], params)
        _mul_into(weights, factors, 1.0 - beta1, scratch[1] if factors is not masks else None, size, scratch[2])
        torch._foreach_lerp_(exp_avgs, grads, weights)
        _mul_into(weights, factors, 1.0 - beta2, scratch[1] if factors is not masks else None, size, scratch[2])
        squares = denom
        for square, grad in zip(squares, grads):
            torch.mul(grad, grad, out=square)
    torch._foreach_lerp_(exp_avg_sqs, squares, weights)
    denom = _sqrt(exp_avg_sqs, denom)
    torch._foreach_div_(denom, root_corrections)
    torch._foreach_add_(denom, eps)
    if scratch is None:
        numerators = torch._foreach_mul(exp_avgs, factors)
    else:
        numerators = weights
        for numerator, exp_avg, factor in zip(numerators, exp_avgs, factors):
            torch.mul(exp_avg, factor, out=numerator)
    torch._foreach_addcdiv_(params, numerators, denom, step_sizes)


def _gated(gate: torch.Tensor, on: float, off: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor of like's dtype on the gate's device: `on` where the gate is True, else `off`."""
    return torch.where(gate, on, off).to(like.dtype)


def _sqrt(values: list[torch.Tensor], out: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Square roots of `values`, into `out` when given (else new tensors)."""
    if out is None:
        return torch._foreach_sqrt(values)
    for target, value in zip(out, values):
        torch.sqrt(value, out=target)
    return out


def _mul_into(
    out: list[torch.Tensor],
    factors: list[torch.Tensor],
    scale: float,
    flat_factors: torch.Tensor | None,
    size: int,
    flat_out: torch.Tensor,
) -> None:
    """out = factors * scale (one flat operation when the factors are a flat scratch buffer)."""
    if flat_factors is not None:
        torch.mul(flat_factors[:size], scale, out=flat_out[:size])
        return
    for target, factor in zip(out, factors):
        torch.mul(factor, scale, out=target)
