"""The one place that decides where gradients are averaged and where the optimizer step runs.

`Backend` is chosen once per run, after `accelerator.prepare`, from the prepared model: `LocalBackend` for one
process or DDP (the gradients are averaged when `backward` returns, and the optimizer steps after it) and
`ZeroBackend` for DeepSpeed ZeRO-1/2/3 (the step runs inside `accelerator.backward`, on this rank's partitions).
Methods and the optimizer ask the backend, never the model, what kind of run this is: which gradient masker to use,
how to run something right before the parameters are updated, whether whole parameters are available, how to sum a
tensor over processes. `prepare` is `accelerator.prepare` plus the few things that must happen around it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from uegr_dist.backward.masking import GradientMasker, MaskOptions, SplitMasking
from uegr_dist.backward.selective_adamw import SelectiveAdamW
from uegr_dist.config import ConfigError
from uegr_dist.deepspeed_internals import (
    ZeroMasterWeights,
    ZeroPartition,
    check_zero_layout,
    is_deepspeed_engine,
    wrap_zero_step,
    zero_partitions,
    zero_stage,
)

logger = logging.getLogger(__name__)


class Backend:
    """How this run reduces gradients and steps the optimizer (see the module docstring). Subclasses fill in the
    parts that differ; `zero_stage` is 0 for one process and DDP."""

    zero_stage = 0
    steps_in_backward = False
    """True when the optimizer step runs inside `accelerator.backward` (DeepSpeed)."""

    def __init__(self, num_processes: int, process_index: int, device: torch.device) -> None:
        self.num_processes = num_processes
        self.process_index = process_index
        self.device = device

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.num_processes > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """In-place sum over all processes of the run (nothing in one process)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def all_reduce_max(self, tensor: torch.Tensor) -> None:
        """In-place maximum over all processes of the run (nothing in one process)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over processes of a tensor (a new tensor; no host synchronization)."""
        out = value.detach().clone()
        if self.distributed:
            self.all_reduce_sum(out)
            out /= self.num_processes
        return out

    def masker(self, named_params: list[tuple[str, nn.Parameter]], options: MaskOptions, max_grad_norm: float) -> Any:
        """The gradient masker for this backend (one process / DDP: applied by the optimizer's `step`)."""
        return GradientMasker(named_params, options)

    def before_update(self, callback: Callable[[], None]) -> None:
        """Run `callback` right before every parameter update, wherever the update runs."""
        raise NotImplementedError

    def require_whole_parameters(self, method: str, reason: str) -> None:
        """Refuse, at start-up, a method that needs every parameter whole on every process when they are partitioned
        (ZeRO-3); `reason` says what needs them."""
        if self.zero_stage == 3:
            raise ConfigError(
                f"method.name = {method}: {reason}, but DeepSpeed ZeRO-3 partitions the parameters over the "
                "processes; use ZeRO-1/2 or DDP"
            )

    def fp32_master_weights(self, params: list[nn.Parameter]) -> ZeroMasterWeights | None:
        """Whole fp32 master copies of `params` when the optimizer keeps them apart from the module (ZeRO-1/2); None
        when the parameters themselves are what the optimizer updates."""
        return None

    def master_partitions(self) -> list[ZeroPartition] | None:
        """This process's flat fp32 master partitions when the optimizer keeps them apart from the module (DeepSpeed
        ZeRO), in the order DeepSpeed steps them; None when the module's parameters are what the optimizer updates."""
        return None

    @property
    def fp16_loss_scaling(self) -> bool:
        """DeepSpeed fp16 with its dynamic loss scaler."""
        return False


class LocalBackend(Backend):
    """One process or DDP: `backward` leaves the averaged gradient in `.grad`; the optimizer steps afterwards.

    Under DDP every process holds the whole averaged gradient; the gradient mask's scoring and selection are split
    between the processes (`SplitMasking`: each takes 1 / N of the coordinates, the thresholds come from all-reduced
    histograms and the kept sets are all-gathered as bits), with exactly the one-process result."""

    split_masking = True
    """Split the mask's work under DDP (False: every process masks the whole gradient, as before)."""
    packed_masks = True
    """All-gather the split kept sets as bits (False: as bytes)."""

    def __init__(self, num_processes: int, process_index: int, device: torch.device, optimizer: Any = None) -> None:
        super().__init__(num_processes, process_index, device)
        self.optimizer = optimizer

    def masker(self, named_params: list[tuple[str, nn.Parameter]], options: MaskOptions, max_grad_norm: float) -> Any:
        """The gradient masker, applied by the optimizer's `step`; under DDP the processes split its work."""
        if not (self.distributed and self.split_masking and dist.is_available() and dist.is_initialized()):
            return GradientMasker(named_params, options)
        split = SplitMasking(
            self.process_index, self.num_processes, self.all_reduce_sum, _all_gather_into, self.packed_masks
        )
        return GradientMasker(named_params, options, split=split)

    def before_update(self, callback: Callable[[], None]) -> None:
        """At the start of the SelectiveAdamW step."""
        if not isinstance(self.optimizer, SelectiveAdamW):
            raise TypeError("this method needs the run's optimizer to be a SelectiveAdamW")
        self.optimizer.before_update(callback)


class ZeroBackend(Backend):
    """DeepSpeed ZeRO-1/2/3: each process holds its partition of the averaged gradient and of the fp32 master
    weights, and the step runs inside `accelerator.backward` (the engine's step)."""

    steps_in_backward = True

    def __init__(self, engine: Any, num_processes: int, process_index: int, device: torch.device) -> None:
        super().__init__(num_processes, process_index, device)
        self.layout_known = check_zero_layout(engine)
        self.engine = engine
        self.zero_stage = zero_stage(engine)

    def masker(self, named_params: list[tuple[str, nn.Parameter]], options: MaskOptions, max_grad_norm: float) -> Any:
        """A `ZeroGradientMasker` hooked into the ZeRO step (it clips the masked gradient there)."""
        from uegr_dist.backward.zero_masking import ZeroGradientMasker

        return ZeroGradientMasker(self.engine, named_params, options, max_grad_norm=max_grad_norm)

    def before_update(self, callback: Callable[[], None]) -> None:
        """At the entry of the ZeRO optimizer's step."""

        def wrapper(zero_step: Callable[..., Any]) -> Callable[..., Any]:
            def step(*args: Any, **kwargs: Any) -> Any:
                callback()
                return zero_step(*args, **kwargs)

            return step

        wrap_zero_step(self.engine, wrapper)

    def fp32_master_weights(self, params: list[nn.Parameter]) -> ZeroMasterWeights | None:
        """The ZeRO-1/2 fp32 master partitions, gathered and written as whole tensors."""
        return ZeroMasterWeights(self.engine, params)

    def master_partitions(self) -> list[ZeroPartition] | None:
        """This rank's ZeRO partitions (fp32 master tensor and the parameter fragments it holds)."""
        return zero_partitions(self.engine)

    @property
    def fp16_loss_scaling(self) -> bool:
        return bool(self.engine.fp16_enabled())


def _all_gather_into(output: torch.Tensor, local: torch.Tensor) -> None:
    """Every process's `local` [c], in rank order, into `output` [world * c] (one collective)."""
    dist.all_gather_into_tensor(output, local)


def build_backend(model: Any, optimizer: Any = None, accelerator: Any = None) -> Backend:
    """The backend of a prepared `model` (a DeepSpeed engine, a DDP module or a plain module). Process count and
    device come from `accelerator` when given, else from torch.distributed and the model's parameters."""
    if accelerator is not None:
        size, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    else:
        initialized = dist.is_available() and dist.is_initialized()
        size = dist.get_world_size() if initialized else 1
        rank = dist.get_rank() if initialized else 0
        device = next(model.parameters()).device
    if is_deepspeed_engine(model):
        return ZeroBackend(model, size, rank, device)
    return LocalBackend(size, rank, device, optimizer)


def configure_deepspeed_clipping(accelerator: Any, max_grad_norm: float, masks_gradients: bool) -> None:
    """Set DeepSpeed's `gradient_clipping` before `accelerator.prepare` (no-op without DeepSpeed).

    Without a mask DeepSpeed clips with max_grad_norm. With a mask it must not clip at all (0): the mask comes
    first and the ZeRO masker clips the masked gradient itself, as `SelectiveAdamW.step` does in one process. An
    explicit different value in the DeepSpeed config is overridden with a warning (max_grad_norm is the one setting).
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
            "the gradient mask clips after masking, with max_grad_norm" if masks_gradients else "max_grad_norm",
        )
    config["gradient_clipping"] = wanted


def prepare(accelerator: Any, *objects: Any) -> Any:
    """`accelerator.prepare(*objects)` for a run with uegr-dist's pieces among `objects`: a `SelectiveAdamW`
    (DeepSpeed's clipping is set for it first, then it is attached to the run's backend: under ZeRO its mask and
    clipping move into the ZeRO step) and `RobustLoss` objects (set up on the prepared model, with the accelerator's
    autocast). Returns what `accelerator.prepare` returns, in the same order (a loss object comes back as given)."""
    from uegr_dist.methods.robust_loss import RobustLoss

    optimizers = [obj for obj in objects if isinstance(obj, SelectiveAdamW)]
    if len(optimizers) > 1:
        raise ValueError("prepare(): give one SelectiveAdamW")
    optimizer = optimizers[0] if optimizers else None
    if optimizer is not None:
        configure_deepspeed_clipping(accelerator, optimizer.max_grad_norm, optimizer.masks_gradients)
    losses = [i for i, obj in enumerate(objects) if isinstance(obj, RobustLoss)]
    to_prepare = [obj for i, obj in enumerate(objects) if i not in losses]
    prepared = accelerator.prepare(*to_prepare)
    prepared = list(prepared) if isinstance(prepared, (tuple, list)) else [prepared]
    models = [p for p, o in zip(prepared, to_prepare) if isinstance(o, nn.Module)]
    if (optimizer is not None or losses) and len(models) != 1:
        raise ValueError("prepare(): give exactly one model with a SelectiveAdamW or a RobustLoss")
    backend = build_backend(models[0], optimizer, accelerator) if models else None
    if optimizer is not None:
        optimizer.attach(backend)
    for i in losses:
        objects[i].setup(models[0], accelerator, backend)
        prepared.insert(i, objects[i])
    return prepared[0] if len(prepared) == 1 else tuple(prepared)
