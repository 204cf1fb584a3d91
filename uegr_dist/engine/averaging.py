"""Weight averaging for every method (`train.average`): SWA or an exponential moving average of the weights.

SWA: Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization", UAI 2018; for fine-tuning
pre-trained language models, Lu et al., "Improving Generalization of Pre-trained Language Models via Stochastic
Weight Averaging", Findings of EMNLP 2022 (averaging from a start point, with a constant or cyclic learning rate
from there). With S the start step (`start`: a fraction of the run's optimizer steps, or a step number) and
theta_s the weights after optimizer step s:

- `swa`: the mean of theta_s over s = S + every, S + 2 every, ... (an incremental mean, Izmailov's
  avg <- avg + (theta - avg) / (n + 1)). After step S the learning rate is `lr_schedule`: `keep` the run's own,
  `constant` swa_lr, or `cyclic`: at the i-th step after S, t = ((i - 1) mod every + 1) / every and
  lr = (1 - t) swa_lr + t swa_lr_min (Izmailov's cycle), so the averaged weights are those at the low end of each cycle.
- `ema`: avg = theta_S at step S, then avg <- decay avg + (1 - decay) theta_s at s = S + every, S + 2 every, ...

The average replaces the weights wherever the run's result is read: every evaluation (per epoch and final) runs on
the averaged weights and the saved model holds them (`keep_raw` also saves the last step's raw weights into
output_dir/raw); training itself goes on from the raw weights, which are put back exactly after each evaluation. The
averager's state (its tensors and count) is in every checkpoint (`method_state_<rank>.pt`), so a resumed run ends
with the uninterrupted run's average. Before the first average exists (step S, or S + every for SWA) evaluation uses
the raw weights.

Where the average lives:
- one process, DDP: one copy of every trainable parameter, in the parameter's dtype (DDP keeps the replicas equal, so
  every process holds the same average); evaluation swaps average and weights tensor by tensor.
- DeepSpeed ZeRO-1/2: this process's partitions of the fp32 master weights, averaged in place of a full copy: each
  process averages only its own partition (the optimizer's fp32 values, also under bf16). For evaluation the module's
  parameters are written from the averaged partitions (one all-reduce per bucket of at most 2^24 values, each process
  filling in the fragments it owns: no process holds more than one bucket beyond the module) and afterwards rewritten
  from the master partitions, as DeepSpeed does after a step. For saving, the averaged partitions are copied into the
  master partitions first, so the exported fp32 weights are the average.
- ZeRO-3 is refused at start-up: its module parameters are partitioned (small ones kept whole on every process), and
  putting the average into them would take DeepSpeed's re-partitioning.

Scheduler steps are counted as the run's scheduler counts them (accelerate advances it num_processes times per
optimizer step); a skipped non-finite step advances neither the scheduler nor the cycle, but counts as a step for
the averaging points.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from uegr_dist.config import ConfigError
from uegr_dist.config.schema import AverageConfig, TrainConfig
from uegr_dist.deepspeed_internals import ZeroPartition

logger = logging.getLogger(__name__)

BUCKET = 1 << 24
"""Most values per all-reduce when ZeRO-1/2 module parameters are rewritten from partitions."""


def start_step(average: AverageConfig, total_steps: int) -> int:
    """S: `start` below 1 is a fraction of the run's optimizer steps (rounded), from 1 on a step number."""
    return round(average.start * total_steps) if average.start < 1 else int(average.start)


def swa_learning_rates(train: TrainConfig) -> Callable[[int], float | None]:
    """lr of the i-th optimizer step after S (i >= 1) under SWA's schedule; None for `keep` (the run's own)."""
    average = train.average
    top = train.lr if average.swa_lr is None else average.swa_lr
    low = top / 10 if average.swa_lr_min is None else average.swa_lr_min
    every = average.every

    def lr(i: int) -> float | None:
        if average.lr_schedule == "keep":
            return None
        if average.lr_schedule == "constant":
            return top
        t = ((i - 1) % every + 1) / every
        return (1 - t) * top + t * low

    return lr


def with_swa_schedule(scheduler: Any, train: TrainConfig, total_steps: int, num_processes: int) -> Any:
    """The run's LambdaLR `scheduler` (before `prepare`), its factor replaced after step S by SWA's learning rate
    (`train.average.lr_schedule` constant or cyclic); unchanged otherwise. The scheduler advances num_processes times
    per optimizer step (accelerate's convention for the prepared scheduler)."""
    average = train.average
    if average.kind != "swa" or average.lr_schedule == "keep":
        return scheduler
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise TypeError(f"SWA's learning-rate schedule needs a LambdaLR, got {type(scheduler).__name__}")
    start = start_step(average, total_steps)
    lr_after_start = swa_learning_rates(train)

    def compose(before: Callable[[int], float]) -> Callable[[int], float]:
        def factor(count: int) -> float:
            done = count // num_processes  # optimizer steps done before the one this factor is for
            if done < start:
                return before(count)
            return lr_after_start(done - start + 1) / train.lr  # type: ignore[operator]

        return factor

    scheduler.lr_lambdas = [compose(fn) for fn in scheduler.lr_lambdas]
    # The learning rate of the first step, under the new factors.
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return scheduler


class WeightAverager:
    """SWA / EMA of the trainable weights of a run (see the module docstring). The loop calls `after_step` after every
    optimizer step, evaluates inside `applied()`, and calls `install()` before saving the model; the checkpointer
    saves `state_dict()` per process. With `kind: none` every call does nothing."""

    def __init__(
        self, train: TrainConfig, backend: Any, named_parameters: list[tuple[str, nn.Parameter]], total_steps: int
    ) -> None:
        self.cfg = train.average
        self.kind = self.cfg.kind
        self.count = 0
        self.average: list[torch.Tensor] | None = None
        self.start = start_step(self.cfg, total_steps) if self.kind != "none" else 0
        if self.kind == "none":
            return
        last = self.start + (0 if self.kind == "ema" else self.cfg.every)
        if last > total_steps:
            raise ConfigError(
                f"train.average.start = {self.cfg.start}: averaging starts after step {self.start}"
                + ("" if self.kind == "ema" else f" and takes its first weights at step {last}")
                + f", beyond the run's {total_steps} optimizer steps"
            )
        self.backend = backend
        self.params = [param for _, param in named_parameters]
        self.partitions: list[ZeroPartition] | None = None
        if backend.steps_in_backward:  # DeepSpeed: the optimizer's fp32 master partitions
            if backend.zero_stage == 3:
                raise ConfigError(
                    f"train.average.kind = {self.kind}: DeepSpeed ZeRO-3 partitions the module's parameters (and keeps "
                    "the small ones whole on every process), so putting the average into them for evaluation and "
                    "saving would take DeepSpeed's own re-partitioning, which is not implemented; use ZeRO-1/2 or DDP"
                )
            try:
                self.partitions = backend.master_partitions()
            except NotImplementedError as error:
                raise ConfigError(f"train.average.kind = {self.kind}: {error}") from None
            self._index_fragments()
        if self.start == 0 and self.kind == "ema":
            self._begin()

    # -- where the weights are ------------------------------------------------------------------------------------

    def _index_fragments(self) -> None:
        """Per parameter, the (partition, start in the parameter, start in the partition, length) this process owns;
        buckets of whole parameters (in the optimizer's order, the same on every process) for the ZeRO-1/2 rewrite."""
        assert self.partitions is not None
        self.fragments: dict[int, list[tuple[int, int, int, int]]] = {id(p): [] for p in self.params}
        for index, part in enumerate(self.partitions):
            for param, start, at, length in part.fragments:
                self.fragments[id(param)].append((index, start, at, length))
        self.buckets: list[list[nn.Parameter]] = [[]]
        size = 0
        for param in self.params:
            if self.buckets[-1] and size + param.numel() > BUCKET:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(param)
            size += param.numel()

    def _sources(self) -> list[torch.Tensor]:
        """What is averaged: this process's fp32 master partitions (ZeRO) or the parameters themselves."""
        if self.partitions is not None:
            return [part.master.detach() for part in self.partitions]
        return [param.detach() for param in self.params]

    # -- averaging -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _begin(self) -> None:
        self.average = [source.clone() for source in self._sources()]
        self.count = 1

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """After optimizer step `step` (a 1-based count of the steps done): fold the weights in at the averaging
        points (every process, every step)."""
        if self.kind == "none":
            return
        if step == self.start and self.kind == "ema":
            self._begin()
            return
        if step <= self.start or (step - self.start) % self.cfg.every:
            return
        if self.average is None:
            self._begin()
            return
        weight = 1.0 / (self.count + 1) if self.kind == "swa" else 1.0 - self.cfg.ema_decay
        torch._foreach_lerp_(self.average, self._sources(), weight)
        self.count += 1

    # -- using the average -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def _write_module(self, flats: list[torch.Tensor]) -> None:
        """The module's parameters <- the values held in `flats` (one flat tensor per ZeRO partition)."""
        assert self.partitions is not None
        for bucket in self.buckets:
            buffer = torch.zeros(sum(p.numel() for p in bucket), dtype=torch.float32, device=self.backend.device)
            offset = 0
            for param in bucket:
                for index, start, at, length in self.fragments[id(param)]:
                    buffer[offset + start : offset + start + length].copy_(flats[index][at : at + length])
                offset += param.numel()
            self.backend.all_reduce_sum(buffer)  # each value is owned by one process: the sum is that value
            offset = 0
            for param in bucket:
                param.data.copy_(buffer[offset : offset + param.numel()].view_as(param))
                offset += param.numel()

    @torch.no_grad()
    def _swap(self) -> None:
        """Exchange the parameters and the average, tensor by tensor (one process, DDP)."""
        assert self.average is not None
        for param, average in zip(self.params, self.average):
            raw = param.detach().clone()
            param.data.copy_(average)
            average.copy_(raw)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside: the module holds the averaged weights (nothing changes before the first average); afterwards the
        raw weights are back exactly. Collective under ZeRO-1/2: every process enters it."""
        if self.average is None:
            yield
            return
        if self.partitions is None:
            self._swap()
            try:
                yield
            finally:
                self._swap()
            return
        self._write_module(self.average)
        try:
            yield
        finally:
            self._write_module(self._sources())

    @torch.no_grad()
    def install(self) -> None:
        """The averaged weights become the model's for good (at the end of the run, before saving it): the
        parameters, or under ZeRO the master partitions and the module's parameters."""
        if self.average is None:
            return
        if self.partitions is None:
            torch._foreach_copy_([param.data for param in self.params], self.average)
            return
        for part, average in zip(self.partitions, self.average):
            for _, _, at, length in part.fragments:
                part.master.data[at : at + length].copy_(average[at : at + length])
        self._write_module(self.average)

    # -- checkpoints and reports -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any] | None:
        """This process's average and count (None without averaging)."""
        if self.kind == "none":
            return None
        tensors = None if self.average is None else [t.detach().cpu().clone() for t in self.average]
        return {"kind": self.kind, "start": self.start, "count": self.count, "average": tensors}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore `state_dict()` (same kind and the same parameters, under ZeRO the same sharding)."""
        if self.kind == "none" or state is None:
            return
        if state["kind"] != self.kind:
            raise ValueError(f"the checkpoint holds a {state['kind']} average, this run asks for {self.kind}")
        if int(state["start"]) != self.start:
            logger.warning(
                "train.average: the checkpoint's average started after step %s, this run's start is step %s (the "
                "run's length changed); the average goes on from the checkpoint's",
                state["start"],
                self.start,
            )
        self.count = int(state["count"])
        if state["average"] is None:
            self.average = None
            return
        sources = self._sources()
        shapes = [tuple(t.shape) for t in state["average"]]
        if shapes != [tuple(s.shape) for s in sources]:
            raise ValueError("the checkpoint's average does not match this run's parameters (or their sharding)")
        self.average = [t.to(s.device, s.dtype) for t, s in zip(state["average"], sources)]

    def summary(self) -> dict[str, Any]:
        """What metrics.json says about the averaging (empty without it)."""
        if self.kind == "none":
            return {}
        return {"average": {"kind": self.kind, "start_step": self.start, "averaged": self.count}}
