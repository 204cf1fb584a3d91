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

import functools
import itertools
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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

logger = logging.getLogger(__name__)

_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s epsilon, so the sharded clip matches the single-process one


def is_deepspeed_engine(model: Any) -> bool:
    """True when `model` is a DeepSpeed engine (without importing DeepSpeed when nothing else did)."""
    deepspeed = sys.modules.get("deepspeed")
    return deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine)


def configure_deepspeed_clipping(accelerator: Any, max_grad_norm: float, masks_gradients: bool) -> None:
    """Set DeepSpeed's `gradient_clipping` before `accelerator.prepare` (no-op without DeepSpeed).

    Without a mask DeepSpeed clips with max_grad_norm. With a mask it must not clip at all (0): the mask comes
    first and `ZeroGradientMasker` clips the masked gradient itself, as the single-process loop does. An explicit
    different value in the DeepSpeed config is overridden with a warning (train.max_grad_norm is the one setting).
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    config = plugin.deepspeed_config
    wanted = 0.0 if masks_gradients else float(max_grad_norm)
    given = config.get("gradient_clipping", "auto")
    if given != "auto" and float(given) != wanted:
        logger.warning(
            "DeepSpeed config gradient_clipping = %s replaced by %s (%s)",
            given,
            wanted,
            "the gradient mask clips after masking, with train.max_grad_norm"
            if masks_gradients
            else "train.max_grad_norm",
        )
    config["gradient_clipping"] = wanted


@dataclass
class ZeroPartition:
    """One flat fp32 master partition of this rank, as the inner optimizer sees it."""

    master: torch.Tensor
    """float32 [P]: the tensor the inner optimizer updates (persistent across steps)."""
    grad_views: Callable[[], list[torch.Tensor]]
    """At ZeRO step entry: 1-d tensors that tile the averaged gradient of this partition in order (in-place edits
    reach the gradient the inner optimizer gets)."""
    fragments: list[tuple[torch.nn.Parameter, int, int, int]]
    """(parameter, start in the flattened parameter, start in the partition, length), padding excluded."""


def _full_numel(param: torch.nn.Parameter) -> int:
    """Number of elements of the whole parameter (a ZeRO-3 parameter is empty outside its gather)."""
    return int(getattr(param, "ds_numel", param.numel()))


def _zero12_partitions(zopt: Any) -> list[ZeroPartition]:
    """Partitions of DeepSpeedZeroOptimizer (ZeRO-1/2): group i's flattened parameters, split evenly over ranks."""
    partitions = []
    for i, master in enumerate(zopt.single_partition_of_fp32_groups):
        size = int(zopt.partition_size[i])
        lo = dist.get_rank(group=zopt.real_dp_process_group[i]) * size
        fragments = []
        # The real flat layout (also with round_robin_gradients / parameter_alignment): these params at these offsets.
        for param, offset in zip(zopt.round_robin_bit16_groups[i], zopt.round_robin_bit16_offsets[i]):
            start, stop = max(lo, offset), min(lo + size, offset + param.numel())
            if start < stop:
                fragments.append((param, start - offset, start - lo, stop - start))

        def grad_views(i: int = i, master: torch.Tensor = master) -> list[torch.Tensor]:
            if zopt.cpu_offload:
                return [master.grad]  # filled during backward, copied (not accumulated) at each boundary
            averaged = zopt.averaged_gradients[i]
            # bf16 params with fp32 gradient accumulation keep one compact fp32 buffer per partition.
            flat = getattr(averaged, "flat_partition", None)
            return [flat.view(-1)] if flat is not None else [t.view(-1) for t in averaged]

        partitions.append(ZeroPartition(master, grad_views, fragments))
    return partitions


def _zero3_partitions(zopt: Any) -> list[ZeroPartition]:
    """Partitions of DeepSpeedZeroOptimizer_Stage3: one per sub-group, the concatenated shards of its parameters."""
    partitions = []
    for s, params in enumerate(zopt.fp16_groups):
        master = zopt.fp32_partitioned_groups_flat[s]
        rank = dist.get_rank(group=zopt._get_sub_group_process_group(s))
        fragments = []
        for param in params:
            _, offset, shard = zopt.grad_position[zopt.get_param_id(param)]
            valid = max(0, min(shard, param.ds_numel - rank * shard))  # the last shards end in padding
            if valid:
                fragments.append((param, rank * shard, offset, valid))

        def grad_views(s: int = s, master: torch.Tensor = master) -> list[torch.Tensor]:
            if zopt.offload_optimizer:
                return [master.grad]
            return [t.view(-1) for t in zopt.averaged_gradients[s]]  # views into grad_partitions_flat_buffer

        partitions.append(ZeroPartition(master, grad_views, fragments))
    return partitions


def zero_partitions(zopt: Any) -> list[ZeroPartition]:
    """This rank's flat fp32 partitions of a ZeRO optimizer, in the order DeepSpeed steps them."""
    kind = type(zopt).__name__
    if kind == "DeepSpeedZeroOptimizer":
        return _zero12_partitions(zopt)
    if kind == "DeepSpeedZeroOptimizer_Stage3":
        if getattr(zopt, "swap_optimizer", False):
            raise NotImplementedError("gradient masking does not support NVMe optimizer offload (swapped states)")
        return _zero3_partitions(zopt)
    raise NotImplementedError(
        f"gradient masking under DeepSpeed supports ZeRO-1/2/3 optimizers, got {kind} (bf16 + ZeRO-1 with "
        "grad_accum_dtype fp32 selects BF16_Optimizer: use ZeRO-2 or drop data_types.grad_accum_dtype)"
    )


class ZeroGradientMasker:
    """`GradientMasker` for a DeepSpeed ZeRO engine: the same mask, computed shard by shard inside the ZeRO step.

    named_params: the model's trainable parameters in the canonical (optimizer) order, as given to the optimizer
    before `prepare`. options: what to keep (`MaskOptions`), as for `GradientMasker`; a `selector` is given this
    rank's layout and the cross-rank sum. max_grad_norm > 0 clips the masked gradient (global norm) before the
    update. The DeepSpeed config must have gradient_clipping 0 (`configure_deepspeed_clipping`). freeze_masked:
    hand the keep mask to MaskedAdamW so dropped coordinates keep value and moments (UEGR); False: only the gradient
    is masked (and rescaled), the optimizer steps every coordinate.
    """

    def __init__(
        self,
        engine: Any,
        named_params: Sequence[tuple[str, torch.nn.Parameter]],
        options: MaskOptions,
        *,
        max_grad_norm: float = 0.0,
        freeze_masked: bool = True,
    ) -> None:
        self.options, self.freeze_masked = options, freeze_masked
        if engine.gradient_clipping() != 0:
            raise ValueError(
                f"DeepSpeed gradient_clipping = {engine.gradient_clipping()} while masking gradients: DeepSpeed "
                "would clip the unmasked gradient. Set it to 0 (configure_deepspeed_clipping does) and pass "
                "max_grad_norm to the masker"
            )
        self.max_grad_norm = max_grad_norm
        self.scorer = SaliencyScorer(options.saliency, ema_beta=options.ema_beta)
        self.zopt = engine.optimizer
        self.inner = self.zopt.optimizer
        if not hasattr(self.inner, "set_update_masks"):
            raise TypeError(
                f"the ZeRO inner optimizer is {type(self.inner).__name__}, not MaskedAdamW: with offload_optimizer "
                "set zero_force_ds_cpu_optimizer: false in the DeepSpeed config"
            )
        self.group = self.zopt.dp_process_group
        self.step = 0
        self.last_stats: MaskStats | None = None

        covered = covered_parameters(named_params, options.exclude)
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

        self.partitions = zero_partitions(self.zopt)
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
        zero_step, inner_step = self.zopt.step, self.inner.step

        # functools.wraps keeps the attributes torch's LR scheduler put on the wrapped steps.
        @functools.wraps(zero_step)
        def masked_zero_step(*args: Any, **kwargs: Any) -> Any:
            self.last_stats = self.compute_masks()
            self.step += 1
            return zero_step(*args, **kwargs)

        @functools.wraps(inner_step)
        def masked_inner_step(*args: Any, **kwargs: Any) -> Any:
            masks = {}
            for group in self.inner.param_groups:
                for master in group["params"]:
                    keep = self._keep_by_master.get(id(master))
                    if keep is not None and master.grad is not None:
                        if self._clip_coef != 1.0:
                            master.grad.mul_(self._clip_coef)
                        if self.freeze_masked:
                            masks[master] = keep
            self.inner.set_update_masks(masks)
            return inner_step(*args, **kwargs)

        self.zopt.step = masked_zero_step
        self.inner.step = masked_inner_step

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
