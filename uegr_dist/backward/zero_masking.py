"""UEGR's selective update inside a DeepSpeed ZeRO optimizer step (ZeRO-1/2/3, with or without optimizer offload).

Under DeepSpeed, `accelerator.backward` runs the whole optimizer step, and each rank only ever holds its own
partition of the averaged gradient and of the fp32 master weights. So the mask is built inside the step, from two
hooks installed once after `accelerator.prepare`:

- on the ZeRO optimizer's `step` (once per optimizer step, at the accumulation boundary, when every averaged
  gradient partition of this rank is in place): score this rank's valid coordinates, agree on the per-segment
  thresholds with `select_top_k` (a few all-reduces of S * 256 counts), zero the dropped gradient coordinates in
  place, then clip with the global norm of the masked gradient (one scalar all-reduce). DeepSpeed's own clipping
  must be off: it would clip the unmasked gradient (and under offload its norm is cached during backward);
- on the inner optimizer's (our MaskedAdamW's) `step`, which DeepSpeed calls once per parameter group (ZeRO-1/2) or
  per sub-group (ZeRO-3) with the flat fp32 partitions as its parameters: apply the clip factor and hand it the
  update masks, so dropped coordinates keep their value and Adam moments.

Each rank's partition is a list of *fragments*: (parameter, start in the flattened parameter, start in the flat
partition, length). ZeRO-1/2 partition each parameter group's flattened parameters (padded at the end); ZeRO-3
partitions every parameter on its own, with padding after each shard, and its fp32 padding is uninitialised
memory: only fragments are ever scored or updated. The scores live in a local buffer ordered by segment, then by
global position, where the global position is the coordinate's offset in the canonical order of the covered
parameters, exactly as in `GradientMasker`: ties break identically and soft masks draw identical numbers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from uegr_dist.backward.masking import (
    MaskLayout,
    MaskOptions,
    MaskStats,
    covered_parameters,
    keep_count,
    segment_names,
    select_coordinates,
)
from uegr_dist.backward.saliency import SaliencyScorer
from uegr_dist.deepspeed_internals import (
    data_parallel_group,
    inner_optimizer,
    wrap_inner_step,
    wrap_zero_step,
    zero_partitions,
)

_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s epsilon, so the sharded clip matches the single-process one


def _full_numel(param: torch.nn.Parameter) -> int:
    """Number of elements of the whole parameter (a ZeRO-3 parameter is empty outside its gather)."""
    return int(getattr(param, "ds_numel", param.numel()))


class ZeroGradientMasker:
    """`GradientMasker` for a DeepSpeed ZeRO engine: the same mask, computed shard by shard inside the ZeRO step.

    named_params: the model's trainable parameters in the canonical (optimizer) order, as given to the optimizer
    before `prepare`. options: what to keep (`MaskOptions`), as for `GradientMasker`; a `selector` is given this
    rank's layout and the cross-rank sum; `options.freeze_masked` hands the keep mask to MaskedAdamW (dropped
    coordinates keep value and moments) or only masks (and rescales) the gradient. max_grad_norm > 0 clips the masked
    gradient (global norm) before the update. The DeepSpeed config must have gradient_clipping 0
    (`configure_deepspeed_clipping`). All access to DeepSpeed's internals goes through `uegr_dist.deepspeed_internals`.
    """

    def __init__(
        self,
        engine: Any,
        named_params: Sequence[tuple[str, torch.nn.Parameter]],
        options: MaskOptions,
        *,
        max_grad_norm: float = 0.0,
    ) -> None:
        self.options = options
        if engine.gradient_clipping() != 0:
            raise ValueError(
                f"DeepSpeed gradient_clipping = {engine.gradient_clipping()} while masking gradients: DeepSpeed "
                "would clip the unmasked gradient. Set it to 0 (configure_deepspeed_clipping does) and pass "
                "max_grad_norm to the masker"
            )
        self.max_grad_norm = max_grad_norm
        self.scorer = SaliencyScorer(options.saliency, ema_beta=options.ema_beta)
        self.engine = engine
        self.inner = inner_optimizer(engine)
        if not hasattr(self.inner, "set_update_masks"):
            raise TypeError(
                f"the ZeRO inner optimizer is {type(self.inner).__name__}, not MaskedAdamW: with offload_optimizer "
                "set zero_force_ds_cpu_optimizer: false in the DeepSpeed config"
            )
        self.group = data_parallel_group(engine)
        self.step = 0
        self.last_stats: MaskStats | None = None

        covered = covered_parameters(named_params, options)
        self.names = [name for name, _ in covered]
        segments = segment_names(self.names, options.scope)
        segment_order = {segment: i for i, segment in enumerate(dict.fromkeys(segments))}
        sizes = [0] * len(segment_order)
        where: dict[int, tuple[int, int]] = {}  # id(param) -> (segment, canonical start)
        start = 0
        for (_, param), segment in zip(covered, segments):
            where[id(param)] = (segment_order[segment], start)
            sizes[segment_order[segment]] += _full_numel(param)
            start += _full_numel(param)
        self.total = start
        self.k = torch.tensor([keep_count(options.ratio, size) for size in sizes], dtype=torch.int64)

        self.partitions = zero_partitions(engine)
        # Keep mask per partition: False on padding, True on uncovered (excluded) fragments, set per step elsewhere.
        self.keep_masks = [
            torch.zeros(p.master.numel(), dtype=torch.bool, device=p.master.device) for p in self.partitions
        ]
        self._keep_by_master = {id(p.master): keep for p, keep in zip(self.partitions, self.keep_masks)}
        # Covered fragments in local buffer order: (segment, global position, partition, start in partition, length).
        pieces = []
        for index, partition in enumerate(self.partitions):
            for param, param_start, part_start, length in partition.fragments:
                if id(param) in where:
                    segment, canonical = where[id(param)]
                    pieces.append((segment, canonical + param_start, index, part_start, length))
                else:
                    self.keep_masks[index][part_start : part_start + length] = True
        pieces.sort()
        self._pieces = [(index, part_start, length) for _, _, index, part_start, length in pieces]
        device = self.partitions[0].master.device if self.partitions else torch.device("cpu")
        counts = [0] * len(sizes)
        runs, offset = [], 0
        for segment, position, _, _, length in pieces:
            counts[segment] += length
            runs.append((offset, position))
            offset += length
        self.local_total = offset
        self.segment_offsets = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int64)
        self.position_runs = torch.tensor(runs or [(0, 0)], dtype=torch.int64)
        self.run_sizes = [length for *_, length in pieces]
        self.layout = MaskLayout(self.segment_offsets, self.position_runs, self.run_sizes)
        # Gradient multipliers per partition (1 on uncovered fragments, 0 on padding), only for rescaling selectors.
        self._multipliers: list[torch.Tensor] | None = None
        # Local saliency scores [n] (this rank's covered coordinates only) and their per-fragment views.
        self.scores = torch.zeros(offset, dtype=torch.float32, device=device)
        self._score_views = list(self.scores.split(self.run_sizes)) if pieces else []
        self._master_views = [self.partitions[i].master.detach()[a : a + n] for i, a, n in self._pieces]
        self._keep_views = [self.keep_masks[i][a : a + n] for i, a, n in self._pieces]
        self._grad_slices: list[tuple[int, int, int]] | None = None
        self._grad_layout: list[list[int]] | None = None
        self._clip_coef = 1.0
        self._install_hooks()

    def _install_hooks(self) -> None:
        """Wrap the ZeRO optimizer's step (build the masks) and the inner optimizer's step (apply them)."""

        def masked_zero_step(zero_step: Any) -> Any:
            def step(*args: Any, **kwargs: Any) -> Any:
                self.last_stats = self.compute_masks()
                self.step += 1
                return zero_step(*args, **kwargs)

            return step

        def masked_inner_step(inner_step: Any) -> Any:
            def step(*args: Any, **kwargs: Any) -> Any:
                masks = {}
                for group in self.inner.param_groups:
                    for master in group["params"]:
                        keep = self._keep_by_master.get(id(master))
                        if keep is not None and master.grad is not None:
                            if self._clip_coef != 1.0:
                                master.grad.mul_(self._clip_coef)
                            if self.options.freeze_masked:
                                masks[master] = keep
                self.inner.set_update_masks(masks)
                return inner_step(*args, **kwargs)

            return step

        wrap_zero_step(self.engine, masked_zero_step)
        wrap_inner_step(self.engine, masked_inner_step)

    def _all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """In-place sum over the data-parallel ranks."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)

    def _gradient_slices(self, grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Per covered fragment, its slice of the averaged gradient (1-d views, in local buffer order)."""
        layout = [[t.numel() for t in views] for views in grads]
        if layout != self._grad_layout:
            # DeepSpeed rebuilds the gradient lists every step with the same sizes; map fragments to (list entry,
            # start) once per layout. A fragment never spans two entries: the entries are per-parameter pieces.
            self._grad_layout, self._grad_slices = layout, []
            for index, part_start, length in self._pieces:
                ends = list(itertools.accumulate(layout[index]))
                entry = next(j for j, end in enumerate(ends) if end > part_start)
                entry_start = ends[entry] - layout[index][entry]
                if part_start + length > ends[entry]:
                    raise RuntimeError("a parameter fragment spans two DeepSpeed gradient pieces (unexpected layout)")
                self._grad_slices.append((entry, part_start - entry_start, length))
        assert self._grad_slices is not None
        return [
            grads[index][entry][start : start + length]
            for (index, _, _), (entry, start, length) in zip(self._pieces, self._grad_slices)
        ]

    @torch.no_grad()
    def compute_masks(self) -> MaskStats:
        """Score this rank's gradient partition, select globally, zero dropped coordinates and set the clip factor."""
        grads = [partition.grad_views() for partition in self.partitions]
        scores = self.scorer.score_(self.scores, self._score_views, self._master_views, self._gradient_slices(grads))
        keep, multiplier, mean_threshold = select_coordinates(
            self.options, scores, self.layout, self.k, self.step, all_reduce_sum=self._all_reduce_sum
        )
        if self._keep_views:
            torch._foreach_copy_(self._keep_views, list(keep.split(self.run_sizes)))
        factors: list[torch.Tensor] = self.keep_masks
        if multiplier is not None:
            factors = self._multiplier_partitions(multiplier)
        norms = []
        for views, factor in zip(grads, factors):
            torch._foreach_mul_(views, list(factor.split([t.numel() for t in views])))
            norms.extend(torch._foreach_norm(views, 2, dtype=torch.float32))
        # [squared norm of the masked gradient, kept count], summed over ranks in one collective.
        totals = torch.stack(
            [torch.stack(norms).double().square().sum() if norms else torch.zeros((), dtype=torch.float64)]
            + [keep.count_nonzero().double()]
        )
        self._all_reduce_sum(totals)
        norm = math.sqrt(float(totals[0]))
        self._clip_coef = min(1.0, self.max_grad_norm / (norm + _CLIP_EPS)) if self.max_grad_norm > 0 else 1.0
        return MaskStats(int(totals[1]), self.total, self.k.numel(), mean_threshold)

    def _multiplier_partitions(self, multiplier: torch.Tensor) -> list[torch.Tensor]:
        """Per partition, float32 gradient factors: `multiplier` [n] on covered fragments, 1 / 0 elsewhere."""
        if self._multipliers is None:
            self._multipliers = [keep.to(torch.float32) for keep in self.keep_masks]  # uncovered 1, padding 0
            self._multiplier_views = [self._multipliers[i][a : a + n] for i, a, n in self._pieces]
        if self._multiplier_views:
            torch._foreach_copy_(self._multiplier_views, list(multiplier.split(self.run_sizes)))
        return self._multipliers

    def kept_positions(self) -> torch.Tensor:
        """Global positions (int64 [kept here]) of this rank's kept covered coordinates at the last step."""
        runs = self.position_runs.tolist()
        kept = [
            torch.arange(position, position + length)[view.cpu()]
            for (_, position), length, view in zip(runs, self.run_sizes, self._keep_views)
        ]
        return torch.cat(kept) if kept else torch.zeros(0, dtype=torch.int64)

    def state_dict(self) -> dict[str, Any]:
        """Covered names, step, this rank's shard layout and saliency state (the fisher_ema buffer of this shard)."""
        return {
            "names": list(self.names),
            "step": self.step,
            "position_runs": self.position_runs.clone(),
            "saliency": self.scorer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` of the same rank under the same sharding (same parameters, stage and world size)."""
        if list(state["names"]) != self.names:
            raise ValueError("masker state covers different parameters (names or order) than this masker")
        if not torch.equal(state["position_runs"], self.position_runs):
            raise ValueError("masker state was saved under another sharding (ZeRO stage, world size or rank)")
        self.step = int(state["step"])
        self.scorer.load_state_dict(state["saliency"])
