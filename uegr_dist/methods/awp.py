"""AWP, adversarial weight perturbation (Wu, Xia and Wang, "Adversarial Weight Perturbation Helps Robust
Generalization", NeurIPS 2020): the loss is taken at weights w + v, v a layer-wise relative worst-case perturbation,
alone or around an objective with its own input-space adversary, as the paper does (AWP-AT: x' from PGD, then v on the
loss of x').

`method.name: awp`, `method.awp.objective` the loss rho(w) that is perturbed: `vanilla` (AWP alone: cross-entropy),
`uegr` (UEGR's objective, its embedding adversary, sub-models and JS term, and UEGR's gradient mask in the update) or
`freelb` (FreeLB's K-step embedding adversary); the objective's own options apply (`method.*`, `method.freelb.*`).
One optimizer step on a batch:
1. v = 0; `steps` times: g = grad_w rho(w + v) (the global batch's mean: averaged over processes with one
   all-reduce), and for every weight tensor w_l (the trainable tensors of two or more dimensions: embeddings and
   linear weights; biases and LayerNorm weights are not perturbed, as the official code skips tensors of one
   dimension) v_l <- v_l + gamma ||w_l|| g_l / ||g_l||, then v_l rescaled onto ||v_l|| <= gamma ||w_l|| if outside;
2. the gradient of rho at w + v is taken (the ordinary `accelerator.backward`, which DDP / ZeRO reduce), w restored
   just before the update (under DeepSpeed ZeRO-1/2 at the entry of the ZeRO optimizer's step: its fp32 master
   partition never saw v), and the optimizer (AdamW with the objective's gradient mask) steps with it.
One step (the default) gives the official code's v_l = gamma ||w_l|| g_l / ||g_l||. Cost: steps + 1 passes of the
objective with a parameter backward each.

Deviations / choices: the official code takes one SGD step on a proxy copy and rescales the difference per layer,
which for plain SGD without momentum is the normalised gradient above (steps > 1 is our projected-ascent extension);
the norms ||w_l|| are those of the unperturbed weights; an objective's input adversary runs inside each pass of the
objective, so in step 2 it is recomputed at w + v (the paper computes x' once at w, before v); the objective's state
(UEGR's adaptive dropout-rate controller) is put back after the ascent passes, so that it advances once per step;
the logged `loss` is rho(w), `awp_loss` is rho(w + v); the paper's gamma = 5e-3 (image models) is the default, and
AWP's warm-up epochs without perturbation are not implemented. Not supported (start-up errors): train.grad_accum > 1
(v is defined per optimizer step) and ZeRO-3 (v is added to whole parameters).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from uegr_dist.backward import MaskOptions
from uegr_dist.config import MethodConfig
from uegr_dist.methods.base import Method, MethodContext, StepOutput

_EPS = 1e-20  # the official code's floor on ||g_l||


class AWP(Method):
    """Layer-wise relative adversarial weight perturbation around an objective (vanilla, UEGR or FreeLB)."""

    name = "awp"

    def __init__(self, cfg: MethodConfig) -> None:
        from uegr_dist.methods import build_method

        self.options = cfg.awp
        self.objective = build_method(dataclasses.replace(cfg, name=cfg.awp.objective))
        self._saved: list[torch.Tensor] | None = None

    @property
    def needs_whole_parameters(self) -> str:
        """v is added to whole parameters."""
        return "v is added to whole parameters"

    def gradient_mask(self, seed: int) -> MaskOptions | None:
        """The objective's mask (UEGR's top-rho saliency mask; none for vanilla and FreeLB)."""
        return self.objective.gradient_mask(seed)

    def setup(self, ctx: MethodContext) -> None:
        """The objective's set-up; the perturbed tensors; w put back right before every parameter update."""
        super().setup(ctx)
        self.objective.setup(ctx)
        self.weights = [param for _, param in ctx.named_parameters if param.dim() >= 2]
        ctx.backend.before_update(self._restore)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int, micro_step: int) -> StepOutput:
        """The objective rho (unperturbed)."""
        return self.objective.loss(model, batch, step, micro_step)

    @torch.no_grad()
    def _restore(self) -> None:
        if self._saved is not None:
            torch._foreach_copy_([p.data for p in self.weights], self._saved)
            self._saved = None

    def _ascent_gradient(self, accelerator: Any, batch: dict[str, torch.Tensor], step: int, micro_step: int):
        """rho at the current weights on the unwrapped model, and its gradient with respect to the perturbed tensors
        averaged over processes."""
        with accelerator.autocast():
            out = self.objective.loss(self.ctx.base_model, batch, step, micro_step)
        grads = torch.autograd.grad(out.loss, self.weights, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(self.weights, grads)]
        backend = self.ctx.backend
        if backend.distributed:
            flat = torch.cat([g.reshape(-1) for g in grads])
            backend.all_reduce_sum(flat)
            flat /= backend.num_processes
            grads = [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]
        return out, grads

    @torch.no_grad()
    def _step_perturbation(self, v: list[torch.Tensor], grads: list[torch.Tensor], radius: list[torch.Tensor]) -> None:
        """v_l <- v_l + gamma ||w_l|| g_l / ||g_l||, then onto the ball ||v_l|| <= gamma ||w_l|| (in place)."""
        norms = torch._foreach_norm(grads)
        for v_l, g_l, norm, r in zip(v, grads, norms, radius):
            v_l.add_(g_l.to(v_l.dtype) * (r / (norm.to(v_l.dtype) + _EPS)))
            length = v_l.norm()
            # Onto the ball without reading the norm on the host: the factor is exactly 1 inside it.
            v_l.mul_(torch.where(length > r, r / length, torch.ones_like(length)))

    def forward_backward(
        self, accelerator: Any, model: nn.Module, batch: dict[str, torch.Tensor], step: int, micro_step: int
    ) -> StepOutput:
        """Ascent on v (unwrapped model), then one `accelerator.backward` of the objective at w + v."""
        state = self.objective.state_dict()
        first: StepOutput | None = None
        try:
            with torch.no_grad():
                self._saved = [p.detach().clone() for p in self.weights]
                # v and the norms in at least float32 (16-bit module weights under DeepSpeed bf16).
                v = [torch.zeros_like(w, dtype=torch.promote_types(w.dtype, torch.float32)) for w in self._saved]
                radius = [self.options.gamma * w.to(v_l.dtype).norm() for w, v_l in zip(self._saved, v)]
            for _ in range(self.options.steps):
                out, grads = self._ascent_gradient(accelerator, batch, step, micro_step)
                if first is None:
                    first = out
                self._step_perturbation(v, grads, radius)
                with torch.no_grad():
                    for p, w, v_l in zip(self.weights, self._saved, v):
                        p.data.copy_(w.to(v_l.dtype) + v_l)
            self.objective.load_state_dict(state)  # the ascent passes leave no trace in the objective's state
            with accelerator.autocast():
                perturbed = self.objective.loss(model, batch, step, micro_step)
            accelerator.backward(perturbed.loss)
        finally:
            self._restore()
        assert first is not None
        return StepOutput(first.loss.detach(), first.logits, {**first.logs, "awp_loss": perturbed.loss.detach()})

    def teardown(self) -> None:
        """The objective's teardown (UEGR's and FreeLB's dropout controllers)."""
        self.objective.teardown()

    def state_dict(self) -> dict[str, Any]:
        """The objective's state."""
        return self.objective.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        self.objective.load_state_dict(state)
