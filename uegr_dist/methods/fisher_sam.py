"""Fisher SAM (Kim, Li, Hu and Hospedales, "Fisher SAM: Information Geometry and Sharpness Aware Minimisation",
ICML 2022): SAM whose neighbourhood is the ellipsoid of the Fisher information instead of a Euclidean ball.

max over eps^T F eps <= rho^2 of the first-order loss L(theta) + g^T eps is attained at
eps = rho F^-1 g / sqrt(g^T F^-1 g). With the paper's diagonal empirical Fisher built from the batch gradient,
F = diag(1 + eta g^2) (eta the Fisher strength; g the gradient of the global batch's mean loss), this is
eps_i = rho (g_i / f_i) / sqrt(sum_j g_j^2 / f_j), f = 1 + eta g^2, over every trainable coordinate. eta = 0 gives SAM.
The gradient of L at theta + eps is taken, theta restored, and the optimizer (AdamW, as for every method) steps with
it, as in `uegr_dist.methods.sam` (two forward-backward passes per step, the same distributed rules: the first
gradient is averaged over processes with one all-reduce, so N processes equal one; under DeepSpeed ZeRO-1/2 theta is
put back just before the ZeRO optimizer's step).

Our reading, where the paper could not be checked here: F = 1 + eta g^2 from the squared mini-batch gradient (not a
mean of per-example squared gradients), the form the paper gives for its efficient variant; defaults rho = 0.1,
eta = 1. Deviations: the base optimizer is the loop's AdamW (the paper wraps SGD for its image experiments); clipping,
if on, acts on the gradient at theta + eps. Not supported (start-up errors): train.grad_accum > 1, ZeRO-3.
"""

from __future__ import annotations

import torch

from uegr_dist.config import MethodConfig
from uegr_dist.config.schema import SamConfig
from uegr_dist.methods.sam import SAM


class FisherSAM(SAM):
    """SAM with eps = rho F^-1 g / sqrt(g^T F^-1 g), F = diag(1 + eta g^2)."""

    name = "fisher_sam"

    def __init__(self, cfg: MethodConfig) -> None:
        super().__init__(cfg)
        self.eta = cfg.fisher_sam.eta
        # SAM's machinery with this radius, one shard (the global batch), the Euclidean form replaced below.
        self.cfg = SamConfig(rho=cfg.fisher_sam.rho)

    @torch.no_grad()
    def perturbation(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """eps = rho (g / f) / sqrt(sum g^2 / f), f = 1 + eta g^2, the sum over all coordinates."""
        scaled = [g / (1.0 + self.eta * g * g) for g in grads]  # F^-1 g
        quadratic = torch.stack([(g * s).sum() for g, s in zip(grads, scaled)]).sum()  # g^T F^-1 g
        torch._foreach_mul_(scaled, self.cfg.rho / (quadratic.sqrt() + 1e-12))  # a 0-dim tensor: no host read
        return scaled
