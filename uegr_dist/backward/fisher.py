"""Empirical Fisher information of the parameters over a dataset (ChildTuning-D's pre-pass, RoAST's first epoch).

F = (1 / num_batches) * sum over batches b of (dL_b / dtheta)^2, with L_b the mean task loss of batch b, as the
ChildTuning-D code computes it. The batches are fixed (dataset order, `batch_size` rows each) and dealt out
round-robin to the processes: each process sums its own batches and one all-reduce adds the partial sums, so the
result does not depend on the process count (up to float64 rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from uegr_dist.backward.radix_select import AllReduceSum


def fisher_information(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    dataset: Any,
    collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]],
    loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    *,
    batch_size: int,
    process_index: int = 0,
    num_processes: int = 1,
    all_reduce_sum: AllReduceSum | None = None,
    device: torch.device | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """float32 [sum of numels]: the Fisher diagonal of `params` (flattened and concatenated in the given order).

    model: an unwrapped module (no data-parallel hooks: gradients come from `torch.autograd.grad`), run in eval
    mode (no dropout noise, so every process count gives the same numbers). loss_fn(model, batch) -> scalar.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    device = device or params[0].device
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        batches = (batch for i, batch in enumerate(loader) if i % num_processes == process_index)
        mine = len(range(process_index, len(loader), num_processes))
        for batch in tqdm(batches, total=mine, desc="Fisher pre-pass", disable=not progress):
            batch = {k: v.to(device) for k, v in batch.items()}
            grads = torch.autograd.grad(loss_fn(model, batch), list(params), allow_unused=True)
            start = 0
            for param, grad in zip(params, grads):
                if grad is not None:
                    total[start : start + param.numel()] += grad.detach().reshape(-1).double().square()
                start += param.numel()
    finally:
        model.train(was_training)
    if all_reduce_sum is not None:
        all_reduce_sum(total)
    return (total / max(len(loader), 1)).to(torch.float32)
