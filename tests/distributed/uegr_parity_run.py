"""A few steps of UEGR through the real `train()`, recording what the distributed tests check.

Run as `python tests/distributed/uegr_parity_run.py CONFIG REPORT` (one process: the reference) or under
`accelerate launch` (DDP / DeepSpeed ZeRO). Rank 0 writes REPORT (JSON): per step, the count and a sha256 of the
sorted global positions the gradient mask kept (gathered over ranks under ZeRO); the largest tensor any collective
of the ZeRO masking code carried; with --check-threshold, whether a sharded `select_top_k` over uneven,
interleaved shards with ties equals a stable sort. The trained model is saved by `train()` itself (gathered
state dict). UEGR_TEST_CRASH_AT_STEP=n makes rank 1 raise at optimizer step n (exit-on-failure test).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from uegr_dist.backward import GradientMasker, ZeroGradientMasker, select_top_k
from uegr_dist.config import load_config
from uegr_dist.engine.train_loop import train
from uegr_dist.methods.uegr import UEGR

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor", "reduce")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def gather_objects(items: list) -> list:
    """Concatenation of every rank's list (the list itself in one process)."""
    if not dist.is_initialized():
        return items
    parts: list[list | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts if part is not None for item in part]


def kept_positions(masker: GradientMasker | ZeroGradientMasker) -> torch.Tensor:
    """Sorted global positions kept at the last step, over all ranks."""
    if isinstance(masker, ZeroGradientMasker):
        local = masker.kept_positions()
        parts: list[torch.Tensor | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        return torch.sort(torch.cat([p for p in parts if p is not None])).values
    kept = [
        torch.nonzero(mask.reshape(-1)).squeeze(1) + position
        for (_, position), mask in zip(masker.position_runs.tolist(), masker.update_masks().values())
    ]
    return torch.sort(torch.cat(kept)).values


def record_masks(steps: list[dict], checks: dict[str, bool] | None) -> None:
    """Wrap the gradient maskers (`GradientMasker.apply_` in the optimizer's step, `ZeroGradientMasker.compute_masks`
    in the ZeRO step): log the kept set of every step, crash on request, and at the first step run the sharded
    threshold check when `checks` is given (the run's process group is up then). Install after
    `record_collectives`, so that what this adds is not counted as the masking's collectives."""
    original_apply, original_compute, original_loss = GradientMasker.apply_, ZeroGradientMasker.compute_masks, UEGR.loss
    seen: list[int] = []

    def loss(self: UEGR, model, batch, step, micro_step):
        seen.extend(batch["sample_id"].tolist())
        return original_loss(self, model, batch, step, micro_step)

    crash_at = int(os.environ.get("UEGR_TEST_CRASH_AT_STEP", "-1"))

    def before(step: int) -> None:
        if step == crash_at and rank() == 1:
            raise RuntimeError(f"injected failure on rank 1 at step {step} (time {time.time():.3f})")
        if checks is not None and not checks:
            checks["threshold_ok"] = check_sharded_threshold()

    def after(masker: GradientMasker | ZeroGradientMasker, step: int) -> None:
        positions = kept_positions(masker).numpy()
        samples = sorted(gather_objects(list(seen)))
        seen.clear()
        steps.append(
            {
                "step": step,
                "samples": samples,
                "kept": int(positions.size),
                "sha256": hashlib.sha256(positions).hexdigest(),
            }
        )

    def apply_(self: GradientMasker, step: int | None = None, **options):
        index = self.step if step is None else step
        before(index)
        stats = original_apply(self, step, **options)
        after(self, index)
        return stats

    def compute_masks(self: ZeroGradientMasker):
        index = self.step
        before(index)
        stats = original_compute(self)
        after(self, index)
        return stats

    GradientMasker.apply_ = apply_
    ZeroGradientMasker.compute_masks = compute_masks
    UEGR.loss = loss


def record_collectives(sizes: list[int]) -> None:
    """Wrap ZeroGradientMasker.compute_masks: note the numel of every collective issued while it runs."""
    original = ZeroGradientMasker.compute_masks

    def compute_masks(self: ZeroGradientMasker):
        saved = {name: getattr(dist, name) for name in COLLECTIVES}

        def recorder(name: str):
            def call(tensor, *args, **kwargs):
                sizes.append(tensor.numel() if isinstance(tensor, torch.Tensor) else sum(t.numel() for t in tensor))
                return saved[name](tensor, *args, **kwargs)

            return call

        for name in COLLECTIVES:
            setattr(dist, name, recorder(name))
        try:
            return original(self)
        finally:
            for name, function in saved.items():
                setattr(dist, name, function)

    ZeroGradientMasker.compute_masks = compute_masks


def check_sharded_threshold() -> bool:
    """Sharded select_top_k == per-segment stable descending sort, on uneven interleaved shards with many ties."""
    gen = torch.Generator().manual_seed(7)
    ok = True
    for trial in range(4):
        sizes = [int(s) for s in torch.randint(1, 400, (3,), generator=gen)]
        values = [torch.randint(0, 6 if trial % 2 else 1000, (n,), generator=gen).float() / 7 for n in sizes]
        k = torch.tensor([max(1, int(0.3 * n)) for n in sizes])
        starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
        # Cut every segment at a random point; rank 0 takes the tail piece, rank 1 the head: uneven, interleaved.
        local, runs, counts = [], [], []
        for s, vals in enumerate(values):
            cut = int(torch.randint(0, sizes[s] + 1, (1,), generator=gen))
            lo, hi = (cut, sizes[s]) if rank() == 0 else (0, cut)
            runs.append((sum(counts), starts[s] + lo))
            local.append(vals[lo:hi])
            counts.append(hi - lo)
        scores = torch.cat(local)
        offsets = torch.tensor([0, *counts]).cumsum(0)
        keep = select_top_k(
            scores, offsets, k, position_runs=torch.tensor(runs), all_reduce_sum=lambda t: dist.all_reduce(t)
        ).keep
        mine = torch.cat(
            [torch.arange(g, g + n)[keep[a : a + n]] for (a, g), n in zip(runs, counts)] or [torch.zeros(0)]
        ).long()
        parts: list[torch.Tensor | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        got = torch.sort(torch.cat([p for p in parts if p is not None])).values
        expected = torch.sort(
            torch.cat(
                [
                    torch.sort(v, descending=True, stable=True).indices[: int(kk)] + st
                    for v, kk, st in zip(values, k, starts)
                ]
            )
        ).values
        ok = ok and torch.equal(got, expected)
    return ok


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("report")
    parser.add_argument("--check-threshold", action="store_true")
    args = parser.parse_args()
    steps: list[dict] = []
    sizes: list[int] = []
    checks: dict[str, bool] = {}
    record_collectives(sizes)
    record_masks(steps, checks if args.check_threshold else None)
    result = train(load_config(args.config))
    report = {"steps": steps, "max_collective_numel": max(sizes, default=0), "num_collectives": len(sizes)}
    report.update(final=result.metrics["final"], **checks)
    if rank() == 0:
        Path(args.report).write_text(json.dumps(report, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
