"""Per-coordinate parameter saliency (docs/design.md §1.4), written with fused ops into one preallocated flat fp32
buffer.

Kinds: "taylor" s = |theta * g| (first-order Taylor estimate of the loss change when the coordinate is removed,
the default), "grad_sq" s = g^2, "fisher_ema" s = EMA over steps of g^2 (an empirical Fisher diagonal, as RoAST and
ChildTuning-D use). The caller owns the layout: it hands in fp32 views (one per tensor) that tile a flat buffer, in
order; that way the same code scores a model's parameters in one process and a ZeRO rank's flat shard later.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

SALIENCY_KINDS = ("taylor", "grad_sq", "fisher_ema")


def check_saliency(kind: str, ema_beta: float) -> None:
    """Fail with the value and what is allowed when the saliency kind or its EMA decay is out of range."""
    if kind not in SALIENCY_KINDS:
        raise ValueError(f"saliency must be one of {SALIENCY_KINDS}, got {kind!r}")
    if not 0.0 <= ema_beta < 1.0:
        raise ValueError(f"ema_beta must be in [0, 1), got {ema_beta}")


class SaliencyScorer:
    """Scores of one kind; for "fisher_ema" also the EMA state (a flat fp32 buffer, zero-initialised)."""

    def __init__(self, kind: str = "taylor", *, ema_beta: float = 0.9) -> None:
        check_saliency(kind, ema_beta)
        self.kind = kind
        self.ema_beta = ema_beta
        # The zero start biases early EMAs low by the same factor everywhere, which no ranking can see, so there
        # is no bias correction.
        self.ema: torch.Tensor | None = None

    @torch.no_grad()
    def score_(
        self,
        flat: torch.Tensor,
        views: Sequence[torch.Tensor],
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor | None],
        *,
        gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Saliency (float32 [N]) of every coordinate; views[i] (shaped like params[i]) tile flat [N] in order.

        `flat` is overwritten and returned, except for "fisher_ema", which returns its EMA buffer. A missing
        gradient (None) scores 0. gate: a 0-dim bool tensor; where False (a step skipped on the device) the EMA
        keeps its value (the returned scores are then meaningless, as the step is).
        """
        if sum(view.numel() for view in views) != flat.numel():
            raise ValueError(f"views must tile the flat buffer: {sum(v.numel() for v in views)} != {flat.numel()}")
        present = [i for i, grad in enumerate(grads) if grad is not None]
        missing = [views[i] for i, grad in enumerate(grads) if grad is None]
        if missing:
            torch._foreach_zero_(missing)
        squared = False
        if present:
            targets = [views[i] for i in present]
            present_grads = [grads[i] for i in present]
            factors = [params[i] for i in present] if self.kind == "taylor" else present_grads
            if flat.device.type == "cpu" and all(t.dtype == flat.dtype for t in factors + present_grads):
                # One pass per tensor into the buffer (the same products as copy-then-multiply, bit for bit).
                for target, factor, grad in zip(targets, factors, present_grads):
                    torch.mul(factor, grad, out=target)
                squared = self.kind != "taylor"
            elif self.kind == "taylor":
                torch._foreach_copy_(targets, factors)
                torch._foreach_mul_(targets, present_grads)
            else:
                torch._foreach_copy_(targets, present_grads)
        # The views tile `flat`, so the element-wise rest is one op over the whole buffer.
        if self.kind == "taylor":
            return flat.abs_()
        if not squared:
            flat.square_()
        if self.kind == "grad_sq":
            return flat
        if self.ema is None:
            self.ema = torch.zeros_like(flat)
        elif self.ema.shape != flat.shape:
            raise ValueError(f"fisher_ema state has {self.ema.numel()} entries, the scores have {flat.numel()}")
        self.ema = self.ema.to(flat.device)
        if gate is None:
            return self.ema.lerp_(flat, 1.0 - self.ema_beta)
        torch.lerp(self.ema, flat, 1.0 - self.ema_beta, out=flat)
        return torch.where(gate, flat, self.ema, out=self.ema)

    def state_dict(self) -> dict[str, Any]:
        """Kind, beta and the EMA buffer (None until the first fisher_ema step)."""
        return {"kind": self.kind, "ema_beta": self.ema_beta, "ema": None if self.ema is None else self.ema.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; the kind must match."""
        if state["kind"] != self.kind:
            raise ValueError(f"saliency state is for kind {state['kind']!r}, this scorer is {self.kind!r}")
        self.ema_beta = float(state["ema_beta"])
        ema = state["ema"]
        self.ema = None if ema is None else ema.detach().to(torch.float32).clone()
