"""SAM (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021), with
the m-sharpness (mSAM, same paper §4) and ASAM (Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for
Scale-Invariant Learning of Deep Neural Networks", ICML 2021) options.

One optimizer step: g = grad L(theta) on the batch; eps = rho * g / ||g|| (ASAM: eps = rho * T^2 g / ||T g||,
T = |w| + asam_eta on tensors whose name contains "weight", 1 elsewhere, as the ASAM code); the gradient of L at
theta + eps is taken, theta restored, and the optimizer (AdamW here, as for every method) steps with it.

Distributed (m_shards = 1): the first pass runs on the unwrapped model with `torch.autograd.grad` (no DDP / ZeRO
hooks fire) and its gradient is averaged over processes with one explicit all-reduce, so ||g|| and eps are those
of the global batch on every rank: N processes equal one process with the same global batch. The second pass is
the ordinary `accelerator.backward` (DDP reduces; DeepSpeed ZeRO-1/2 steps inside it: theta is put back just before
the ZeRO optimizer's step, whose fp32 master partition never saw eps).

mSAM (m_shards = m > 1): each process splits its micro-batch into m shards, each with its own eps from its own
(local, not reduced) gradient; the update is the size-weighted mean of the shards' perturbed gradients. N
processes with m shards therefore equal one process with N * m shards of the same sizes (m-sharpness with
m = per-shard batch).

Deviations: the base optimizer is the loop's AdamW, as for every method here (SAM's paper wraps SGD for its image
experiments; the perturbation and the two passes are the same); the step's gradient clipping, if on, acts on the
gradient at theta + eps (the one the optimizer uses); mSAM's shards are cut from each process's micro-batch, so m
counts shards per process, where the paper's m is the per-accelerator batch size.

Not supported (start-up errors): train.grad_accum > 1 (eps is defined per optimizer step), ZeRO-3 (parameters are
partitioned: eps cannot be added to whole parameters). Costs two forward-backward passes per step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from uegr_dist.config import MethodConfig
from uegr_dist.methods.base import MethodContext, StepOutput
from uegr_dist.methods.vanilla import Vanilla


class SAM(Vanilla):
    """Two-pass sharpness-aware gradient (plain, m-sharp or adaptive)."""

    name = "sam"

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg.sam
        self._saved: list[torch.Tensor] | None = None

    @property
    def needs_whole_parameters(self) -> str:
        """eps is added to whole parameters."""
        return "eps is added to whole parameters"

    def setup(self, ctx: MethodContext) -> None:
        """Put theta back right before every parameter update (under DeepSpeed the update runs inside the backward
        at theta + eps; the ZeRO master partition never saw eps)."""
        super().setup(ctx)
        self.names = [name for name, _ in ctx.named_parameters]
        self.params = [param for _, param in ctx.named_parameters]
        ctx.backend.before_update(self._restore)

    def _gradients(self, loss: torch.Tensor, scale: float = 1.0) -> list[torch.Tensor]:
        """d(scale * loss)/dtheta for every parameter (zeros where unused), without any data-parallel hook."""
        grads = torch.autograd.grad(loss * scale, self.params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(self.params, grads)]

    def _average(self, grads: list[torch.Tensor], mean: bool = True) -> None:
        """Mean (or sum) over processes, in place (one all-reduce of the flattened gradient)."""
        backend = self.ctx.backend
        if not backend.distributed:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        backend.all_reduce_sum(flat)
        if mean:
            flat /= backend.num_processes
        torch._foreach_copy_(grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)])

    def ascent_gradients(
        self, accelerator: Any, batch: dict[str, torch.Tensor], step: int, micro_step: int, reduce: bool
    ) -> tuple[StepOutput, list[torch.Tensor]]:
        """The first pass at theta on the unwrapped model: its output and the gradient eps is built from (the batch
        mean's, averaged over processes when `reduce`)."""
        with accelerator.autocast():
            first = self.loss(self.ctx.base_model, batch, step, micro_step)
        grads = self._gradients(first.loss)
        if reduce:
            self._average(grads)
        return first, grads

    @torch.no_grad()
    def perturbation(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """eps per parameter: rho g / ||g|| (ASAM: rho T^2 g / ||T g||), norm over all parameters."""
        if self.cfg.adaptive:
            scales = [
                p.abs().add(self.cfg.asam_eta) if "weight" in name else torch.ones_like(p)
                for name, p in zip(self.names, self.params)
            ]
            scaled = torch._foreach_mul(grads, scales)
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(scaled)))
            eps = torch._foreach_mul(scaled, scales)
        else:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            eps = [g.clone() for g in grads]
        torch._foreach_mul_(eps, self.cfg.rho / (norm + 1e-12))  # a 0-dim tensor: no host read
        return eps

    @torch.no_grad()
    def _perturb(self, eps: list[torch.Tensor]) -> None:
        self._saved = [p.detach().clone() for p in self.params]
        torch._foreach_add_([p.data for p in self.params], [e.to(p.dtype) for p, e in zip(self.params, eps)])

    @torch.no_grad()
    def _restore(self) -> None:
        if self._saved is not None:
            torch._foreach_copy_([p.data for p in self.params], self._saved)
            self._saved = None

    def forward_backward(
        self, accelerator: Any, model: nn.Module, batch: dict[str, torch.Tensor], step: int, micro_step: int
    ) -> StepOutput:
        """Ascent pass(es) on the unwrapped model, then one `accelerator.backward` at theta + eps."""
        base = self.ctx.base_model
        rows = batch["labels"].shape[0]
        shards = torch.arange(rows).tensor_split(min(self.cfg.m_shards, rows))
        first_losses, logits, carried = [], [], None
        try:
            for i, index in enumerate(shards):
                part = batch if len(shards) == 1 else {k: v[index.to(v.device)] for k, v in batch.items()}
                weight = index.numel() / rows
                first, grads = self.ascent_gradients(accelerator, part, step, micro_step, reduce=len(shards) == 1)
                first_losses.append(first.loss.detach() * weight)
                logits.append(first.logits)
                self._perturb(self.perturbation(grads))
                if i < len(shards) - 1:
                    with accelerator.autocast():
                        second = self.loss(base, part, step, micro_step)
                    grads = self._gradients(second.loss, weight)
                    carried = grads if carried is None else torch._foreach_add(carried, grads)
                    self._restore()
                    continue
                with accelerator.autocast():
                    second = self.loss(model, part, step, micro_step)
                total = second.loss * weight
                if carried is not None:
                    # The other shards' perturbed gradients join the one backward that DDP / ZeRO reduce: the
                    # gradient of sum(theta * c) is c.
                    total = total + sum((p * c.to(p.dtype)).sum() for p, c in zip(self.params, carried))
                accelerator.backward(total)
        finally:
            self._restore()
        loss = torch.stack(first_losses).sum()
        logs = {**first.logs, "task_loss": loss.detach(), "sam_loss": second.loss.detach()}
        return StepOutput(loss, torch.cat(logits), logs)
