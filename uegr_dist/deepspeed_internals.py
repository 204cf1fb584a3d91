"""Every read or patch of DeepSpeed's private ZeRO optimizer attributes, in one module with a tested version range.

uegr-dist needs three things DeepSpeed has no public API for: this rank's partition of the averaged gradient and of
the fp32 master weights (the gradient mask and the non-finite guard work on them inside the ZeRO step), hooks around
the ZeRO optimizer's and its inner optimizer's `step` (the mask is built at step entry, applied in the inner step),
and DeepSpeed's own overflow path to skip a step. The attributes they read differ between DeepSpeed releases, so
`check_zero_layout` checks, once at start-up, that the installed DeepSpeed has every one of them and says which is
missing otherwise; releases outside `TESTED_VERSIONS` get a warning. setup.cfg's upper bound is the same range.

ZeRO-1/2 (`DeepSpeedZeroOptimizer`) partition each parameter group's flattened parameters (padded at the end)
evenly over the ranks; ZeRO-3 (`DeepSpeedZeroOptimizer_Stage3`) partitions every parameter on its own, with padding
after each shard, and its fp32 padding is uninitialised memory: only `ZeroPartition.fragments` are ever read or
written. Everything else in the package reaches DeepSpeed through this module or DeepSpeed's public API.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

TESTED_VERSIONS = ((0, 16), (0, 20))
"""DeepSpeed releases this module was tested with: >= 0.16, < 0.20 (the range setup.cfg declares)."""

# The private attributes each ZeRO optimizer must have (read here, checked by `check_zero_layout`).
_ZERO12_ATTRIBUTES = (
    "single_partition_of_fp32_groups",
    "partition_size",
    "real_dp_process_group",
    "round_robin_bit16_groups",
    "round_robin_bit16_offsets",
    "averaged_gradients",
    "cpu_offload",
    "dp_process_group",
    "optimizer",
    "overflow",
    "_update_scale",
)
_ZERO3_ATTRIBUTES = (
    "fp16_groups",
    "fp32_partitioned_groups_flat",
    "_get_sub_group_process_group",
    "grad_position",
    "get_param_id",
    "averaged_gradients",
    "offload_optimizer",
    "dp_process_group",
    "optimizer",
    "overflow",
    "_update_scale",
)
ZERO_OPTIMIZERS = {"DeepSpeedZeroOptimizer": _ZERO12_ATTRIBUTES, "DeepSpeedZeroOptimizer_Stage3": _ZERO3_ATTRIBUTES}


class UnsupportedDeepSpeedError(RuntimeError):
    """The installed DeepSpeed's ZeRO optimizer lacks an attribute uegr-dist reads (an untested release)."""


def is_deepspeed_engine(model: Any) -> bool:
    """True when `model` is a DeepSpeed engine (without importing DeepSpeed when nothing else did)."""
    deepspeed = sys.modules.get("deepspeed")
    return deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine)


def deepspeed_version() -> tuple[int, int]:
    """(major, minor) of the installed DeepSpeed."""
    import deepspeed

    major, minor, *_ = (int("".join(c for c in part if c.isdigit()) or 0) for part in deepspeed.__version__.split("."))
    return major, minor


def check_zero_layout(engine: Any) -> bool:
    """Whether the engine's optimizer is a ZeRO-1/2/3 optimizer whose internals this module reads (False for other
    DeepSpeed optimizers, e.g. ZeRO-0 or BF16_Optimizer: what needs the internals refuses them where it is used).
    Fails at start-up, naming the DeepSpeed version and the missing attributes, when a ZeRO optimizer lacks some
    (an untested layout); warns when the version is outside TESTED_VERSIONS but the layout is known."""
    import deepspeed

    zopt = engine.optimizer
    kind = type(zopt).__name__
    if kind not in ZERO_OPTIMIZERS:
        return False
    version = deepspeed.__version__
    missing = [name for name in ZERO_OPTIMIZERS[kind] if not hasattr(zopt, name)]
    low, high = (".".join(map(str, v)) for v in TESTED_VERSIONS)
    if missing:
        raise UnsupportedDeepSpeedError(
            f"DeepSpeed {version}: {kind} has no {', '.join(missing)}, which uegr-dist reads inside the ZeRO step; "
            f"this release changed the layout. Install a tested release: pip install 'deepspeed>={low},<{high}'"
        )
    if not TESTED_VERSIONS[0] <= deepspeed_version() < TESTED_VERSIONS[1]:
        logger.warning(
            "DeepSpeed %s is outside the tested range >=%s,<%s (its ZeRO layout is the same)", version, low, high
        )
    return True


def zero_stage(engine: Any) -> int:
    """The engine's ZeRO stage (0-3)."""
    return int(engine.zero_optimization_stage())


def inner_optimizer(engine: Any) -> Any:
    """The torch optimizer DeepSpeed steps on this rank's flat fp32 partitions (ours: MaskedAdamW)."""
    return engine.optimizer.optimizer


def data_parallel_group(engine: Any) -> Any:
    """The data-parallel process group of the engine's ZeRO optimizer."""
    return engine.optimizer.dp_process_group


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


def zero_partitions(engine: Any) -> list[ZeroPartition]:
    """This rank's flat fp32 partitions of the engine's ZeRO optimizer, in the order DeepSpeed steps them."""
    zopt = engine.optimizer
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


Wrapper = Callable[[Callable[..., Any]], Callable[..., Any]]


def _wrap(owner: Any, name: str, wrapper: Wrapper) -> None:
    original = getattr(owner, name)
    # functools.wraps keeps the attributes torch's LR scheduler put on a wrapped optimizer step.
    setattr(owner, name, functools.wraps(original)(wrapper(original)))


def wrap_zero_step(engine: Any, wrapper: Wrapper) -> None:
    """Replace the ZeRO optimizer's `step` (once per optimizer step, when this rank's averaged gradient partitions
    are in place) by `wrapper(step)`. The last wrapper installed runs first."""
    _wrap(engine.optimizer, "step", wrapper)


def wrap_inner_step(engine: Any, wrapper: Wrapper) -> None:
    """Replace the inner optimizer's `step` (called per parameter group / sub-group on the flat fp32 partitions)."""
    _wrap(engine.optimizer.optimizer, "step", wrapper)


def wrap_engine_backward(engine: Any, wrapper: Wrapper) -> None:
    """Replace the engine's `backward(loss, ...)`."""
    _wrap(engine, "backward", wrapper)


def clear_overflow(engine: Any) -> None:
    """Reset the ZeRO optimizer's overflow flag (DeepSpeed resets it each step, older releases only for fp16)."""
    engine.optimizer.overflow = False


def skip_zero_step(engine: Any) -> None:
    """Run DeepSpeed's own ZeRO `step`, without any installed wrapper, through its overflow path: DeepSpeed drops the
    gradients and returns before the inner optimizer (no parameter, master weight, moment or step count changes),
    leaves the loss scaler as it would, counts a skipped step, and accelerate then skips the LR scheduler step."""
    zopt = engine.optimizer
    had_own = "_update_scale" in vars(zopt)
    update_scale = zopt._update_scale

    def update_scale_and_skip(*args: Any, **kwargs: Any) -> Any:
        result = update_scale(*args, **kwargs)
        zopt.overflow = True  # read right after by DeepSpeed: clear the gradients and return
        return result

    zopt._update_scale = update_scale_and_skip
    try:
        type(zopt).step(zopt)
    finally:
        if had_own:
            zopt._update_scale = update_scale
        else:
            del zopt._update_scale
    zopt.overflow = True  # the engine reads it after the step: counts a skipped step, no LR scheduler step


# torch >= 2.13 calls it all_gather_single (all_gather_into_tensor is deprecated there); older torch has the latter.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ZeroMasterWeights:
    """The fp32 master weights of a DeepSpeed ZeRO-1/2 optimizer, seen as whole parameters.

    Each process owns one flat fp32 partition per parameter group; the group's flat layout (parameters at their
    offsets, padded at the end) is the same on every process. `gather` all-gathers the partitions into full fp32
    copies of every parameter; `write` puts full fp32 values back into this process's partitions.
    """

    def __init__(self, engine: Any, params: list[torch.nn.Parameter]) -> None:
        zopt = engine.optimizer
        if type(zopt).__name__ != "DeepSpeedZeroOptimizer":
            raise NotImplementedError(f"whole fp32 master weights need ZeRO-1/2, got {type(zopt).__name__}")
        self.zopt = zopt
        self.partitions = zero_partitions(engine)  # this process's fragments, for `write`
        self.params = params
        position = {id(p): i for i, p in enumerate(params)}
        # (group, [(index in params, offset in the group's flat buffer, numel)])
        self.layout = []
        for g, (group, offsets) in enumerate(zip(zopt.round_robin_bit16_groups, zopt.round_robin_bit16_offsets)):
            entries = [(position.get(id(p), -1), int(off), p.numel()) for p, off in zip(group, offsets)]
            self.layout.append((g, entries))
        covered = [index for _, entries in self.layout for index, _, _ in entries]
        if sorted(covered) != list(range(len(params))):
            raise ValueError(
                f"the ZeRO optimizer's parameters are not the model's {len(params)} trainable ones (the whole fp32 "
                "master weights need exactly the trainable parameters in the optimizer)"
            )

    def gather(self) -> list[torch.Tensor]:
        """Full fp32 copies of the parameters, in `params` order (one all-gather per parameter group)."""
        full: list[torch.Tensor | None] = [None] * len(self.params)
        for (g, entries), part in zip(self.layout, self.partitions):
            group = self.zopt.real_dp_process_group[g]
            master = part.master.detach()
            flat = torch.empty(master.numel() * dist.get_world_size(group), dtype=torch.float32, device=master.device)
            _all_gather_flat(flat, master.float().contiguous(), group=group)
            for index, offset, numel in entries:
                device = self.params[index].device
                full[index] = flat[offset : offset + numel].view_as(self.params[index]).to(device, copy=True)
        return full  # type: ignore[return-value]

    def write(self, values: list[torch.Tensor]) -> None:
        """This process's fp32 partitions <- the matching slices of `values` (full fp32 tensors, `params` order)."""
        position = {id(p): i for i, p in enumerate(self.params)}
        with torch.no_grad():
            for part in self.partitions:
                for param, start, at, length in part.fragments:
                    source = values[position[id(param)]].reshape(-1)[start : start + length]
                    part.master[at : at + length].copy_(source.to(part.master.device, part.master.dtype))
