"""What stops a run early, safely: preemption signals (checkpoint, then exit 75) and non-finite losses or gradients
(skip the step on every process; stop after `train.max_nonfinite_steps` in a row).

Both decisions are agreed by all processes with one tiny all-reduce, so every rank skips the same steps and
checkpoints at the same step boundary. Under DeepSpeed ZeRO the optimizer step runs inside `accelerator.backward`,
so the non-finite check runs there too, as a hook on the ZeRO optimizer's `step` (`ZeroStepGuard`).

Without DeepSpeed (one process, DDP) the guard decides on the device, with no host synchronization in the step:
the optimizer is given the decision as a step gate (a non-finite step changes no parameter or moment), the decision
travels to the host without waiting, and it is read at the next step (or at a logging step, a checkpoint, the end),
where the bookkeeping that depends on it happens: the LR scheduler's step, taking back the Adam step counts of a
skipped step, the count of skipped steps and the stop after too many in a row (`NonFiniteGuard.bind`).

Testing aids (read only here, not part of the config): `UEGR_DEBUG_NAN_STEPS=2,5` fills a gradient of process 0
with NaN (and its loss) at those optimizer steps (0-based; under DeepSpeed ZeRO, its partition of the averaged
gradient, inside the ZeRO step); `UEGR_DEBUG_SIGNAL_AT=STEP:SIGNAL` (e.g. `4:TERM`,
`6:KILL`) makes process 0 send itself that signal at the boundary after optimizer step STEP.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Iterable
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType

from uegr_dist.backward.host import DeferredValue, host_values
from uegr_dist.deepspeed_internals import (
    clear_overflow,
    data_parallel_group,
    is_deepspeed_engine,
    skip_zero_step,
    wrap_engine_backward,
    wrap_inner_step,
    wrap_zero_step,
    zero_partitions,
)
from uegr_dist.engine.checkpoint import LoopState

logger = logging.getLogger(__name__)

# Exit codes of uegr-train besides 0 (done) and 2 (bad input).
EXIT_NONFINITE = 3
"""`train.max_nonfinite_steps` consecutive steps had a non-finite loss or gradient; the last checkpoint is intact."""
EXIT_PREEMPTED = 75
"""A preemption signal arrived; a checkpoint of the last finished step was written (EX_TEMPFAIL: requeue me)."""

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite steps: the run stops without writing anything more."""


class Preempted(RuntimeError):
    """A preemption signal was handled: the run checkpointed and must exit with EXIT_PREEMPTED."""

    def __init__(self, checkpoint: str, step: int) -> None:
        super().__init__(f"preempted: checkpoint of step {step} written to {checkpoint}; resume with --resume auto")
        self.checkpoint = checkpoint
        self.step = step


def _agree_any(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when `flag` is true on any (one all-reduce of one number; none in one process)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, "sum").item() > 0)


def _host_group(accelerator: Accelerator) -> Any:
    """A process group for agreeing on host-side flags without touching the device: the default group when it is
    gloo already (CPU runs), else a gloo group over the same processes (created by every process together); None
    in one process, or when gloo is not available (the flag then goes through the device)."""
    if accelerator.num_processes == 1 or not dist.is_initialized():
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    try:
        return dist.new_group(backend="gloo")
    except (RuntimeError, ValueError) as error:  # pragma: no cover - a machine without a usable gloo transport
        logger.warning("no gloo process group (%s): the preemption check reads a device value each step", error)
        return None


class PreemptionHandler:
    """Turns SIGTERM / SIGUSR1 into a flag the loop polls at each optimizer-step boundary (a handler that only sets a
    flag is safe at any point of a step; the checkpoint is written between steps)."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._debug_at, self._debug_signal = _parse_debug_signal(os.environ.get("UEGR_DEBUG_SIGNAL_AT", ""))
        self._group: Any = None

    def __enter__(self) -> PreemptionHandler:
        self._group = _host_group(self.accelerator)
        for sig in PREEMPTION_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. train() called from a worker thread): no handler
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def requested(self, step: int) -> bool:
        """At the boundary after optimizer step `step` (1-based count of steps done): does any process have a
        preemption signal? Every process must call it at every boundary."""
        if self._debug_signal is not None and step == self._debug_at and self.accelerator.is_main_process:
            os.kill(os.getpid(), self._debug_signal)
        if self._group is None:
            return _agree_any(self.accelerator, self.received is not None)
        # A host flag agreed over a host (gloo) group: no device work, no device synchronization.
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int64)
        dist.all_reduce(flag, group=self._group)
        return host_values(flag)[0] > 0


def _parse_debug_signal(spec: str) -> tuple[int, int | None]:
    if not spec:
        return -1, None
    step, _, name = spec.partition(":")
    return int(step), int(getattr(signal, f"SIG{name.upper()}"))


class NonFiniteGuard:
    """Decides, after the backward of a synchronizing micro-batch, whether the optimizer step may run.

    One process, DDP: the step is skipped on every process (no optimizer or scheduler step, gradients zeroed) when
    the loss or any reduced gradient is non-finite on any process. fp16 with a GradScaler: only the loss is checked;
    infinite gradients are the scaler's business (it skips the step and lowers the scale).

    DeepSpeed ZeRO-1/2/3: the engine steps inside `accelerator.backward`, so the same decision is taken there, by a
    `ZeroStepGuard` on the ZeRO optimizer's `step` (installed here when `model` is a DeepSpeed engine: create the
    guard after the method's own hooks, i.e. after `method.setup`). A skipped step leaves the parameters, the fp32
    master weights, the Adam moments and step counts unchanged on every process; this call then only reports the
    decision. fp16: only the loss is checked (DeepSpeed's loss scaler skips overflowing steps itself). Any other
    DeepSpeed optimizer (ZeRO-0, bf16 ZeRO-1 with fp32 gradient accumulation, NVMe optimizer offload): the guard
    sees the loss only, after the step, so it counts non-finite losses and stops after N in a row but cannot undo
    a step (a warning says so).

    first_step: the index (0-based) of the next optimizer step, `LoopState.step` (after a resume, not 0).

    Decided on the device (`bind`; one process and DDP, no fp16 loss scaling, an optimizer with a step gate): the
    check is the same, but instead of skipping the optimizer step the guard gives the optimizer the decision as a step
    gate (a non-finite step runs but moves nothing) and reads the decision one step later, from a copy that travelled
    to the host in the meantime (`settle`): then the LR scheduler steps (finite) or the optimizer takes its step counts
    back (skipped), and the step is recorded. Nothing is read on the host in between: no synchronization in the step.
    The loop settles before anything reads that bookkeeping (logging, checkpoints, preemption, the end of training).
    """

    def __init__(self, accelerator: Accelerator, max_in_a_row: int, model: Any = None, first_step: int = 0) -> None:
        self.accelerator = accelerator
        self.max_in_a_row = max_in_a_row
        self._bound: tuple[Any, Any, LoopState] | None = None
        self._pending: tuple[int, DeferredValue] | None = None
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.check_gradients = not self.deepspeed and accelerator.scaler is None
        raw = os.environ.get("UEGR_DEBUG_NAN_STEPS", "")
        self._inject = {int(s) for s in raw.split(",") if s.strip()}
        self.zero: ZeroStepGuard | None = None
        if self.deepspeed and is_deepspeed_engine(model):
            try:
                self.zero = ZeroStepGuard(
                    model, accelerator.device, first_step, inject=self._inject if accelerator.is_main_process else ()
                )
            except NotImplementedError:
                logger.warning(
                    "DeepSpeed optimizer %s: a step with a non-finite gradient cannot be skipped (the engine "
                    "steps inside backward); non-finite losses are counted and the run stops after "
                    "train.max_nonfinite_steps = %d in a row. ZeRO-1/2/3 without NVMe optimizer offload skip "
                    "such steps exactly",
                    type(model.optimizer).__name__,
                    max_in_a_row,
                )

    def bind(self, optimizer: Any, scheduler: Any, state: LoopState) -> None:
        """Decide on the device from now on, when this run allows it (see the class docstring): `optimizer` takes
        the step gate (a SelectiveAdamW), `scheduler` steps once a step is known to be finite, `state` counts the
        skipped steps. Otherwise (DeepSpeed, fp16 loss scaling, another optimizer) nothing changes."""
        if self.deepspeed or not self.check_gradients or not hasattr(optimizer, "set_step_gate"):
            return
        self._bound = (optimizer, scheduler, state)

    @property
    def deferred(self) -> bool:
        """Whether the decision is taken on the device and settled one step later (`bind`)."""
        return self._bound is not None

    def settle(self) -> None:
        """Apply the pending decision of the last step, if any: the scheduler steps (finite) or the optimizer takes
        back its step counts (skipped); the step is recorded (NonFiniteLossError after too many in a row). Reads one
        flag that was copied to the host during the step after it (or waits for it, when called right away)."""
        if self._pending is None or self._bound is None:
            return
        step, decision = self._pending
        self._pending = None
        optimizer, scheduler, state = self._bound
        finite = bool(decision.get())
        if finite:
            scheduler.step()
        else:
            optimizer.undo_last_step()
        self._record(finite, state, step)

    def step_is_finite(self, loss: torch.Tensor, parameters: Iterable[torch.nn.Parameter], step: int) -> bool:
        """All processes agree whether optimizer step `step` (0-based) is finite; when not, gradients are zeroed.
        Under a `ZeroStepGuard`, the decision it took inside the ZeRO step (no further collective). Decided on the
        device (`bind`): settles the previous step, gives the optimizer this step's decision as its step gate and
        returns True (the step runs; it moves nothing if the gate is False)."""
        if self.zero is not None:
            return self.zero.decision(step)
        if self._bound is not None:
            self.settle()
        params = [p for p in parameters if p.grad is not None]
        if step in self._inject and self.accelerator.is_main_process:
            loss = loss.detach() * math.nan
            if params:
                params[0].grad.fill_(math.nan)
        finite = torch.isfinite(loss.detach()).all()
        if self.check_gradients and params:
            norms = torch._foreach_norm([p.grad for p in params])
            finite = finite & torch.isfinite(torch.stack(norms).to(finite.device)).all()
        if self._bound is not None:
            if self.accelerator.num_processes > 1:
                bad = (~finite).to(torch.float32).reshape(1)
                dist.all_reduce(bad)  # on the device: queued, nothing waits for it
                finite = bad[0] == 0
            self._bound[0].set_step_gate(finite)
            self._pending = (step, DeferredValue(finite))
            return True
        bad = _agree_any(self.accelerator, not bool(finite))  # the step's one host synchronization
        if bad and not self.deepspeed:
            for param in params:
                param.grad = None
        return not bad

    def record(self, finite: bool, state: LoopState, step: int) -> None:
        """Count a skipped step in `state`; raise NonFiniteLossError after too many in a row. Decided on the device,
        `settle` records instead (a no-op here)."""
        if self._bound is None:
            self._record(finite, state, step)

    def _record(self, finite: bool, state: LoopState, step: int) -> None:
        if finite:
            state.nonfinite_in_a_row = 0
            return
        state.nonfinite_steps += 1
        state.nonfinite_in_a_row += 1
        if state.nonfinite_in_a_row >= self.max_in_a_row:
            raise NonFiniteLossError(
                f"{state.nonfinite_in_a_row} optimizer steps in a row (up to step {step + 1}) had a non-finite loss "
                f"or gradient (train.max_nonfinite_steps = {self.max_in_a_row}); stopping. The checkpoints already "
                "written are intact: lower train.lr, enable clipping (train.max_grad_norm) or use bf16, then "
                "--resume auto"
            )


class ZeroStepGuard:
    """The non-finite check inside a DeepSpeed ZeRO-1/2/3 optimizer step, and the skip of a non-finite step.

    Three hooks, installed on the engine and its optimizers:

    - `engine.backward` keeps the last loss it was given (the synchronizing micro-batch's, as without DeepSpeed);
    - the ZeRO optimizer's `step` (the outermost wrapper: install this after the method's hooks, e.g. the UEGR
      masker's) runs first at each accumulation boundary, when this rank's partition of the averaged gradient is in
      place. It checks that loss and the norm of every gradient partition of this rank (fp16: the loss only) and
      agrees with the other ranks in one all-reduce of one number. A finite step goes on through the hooks below it
      to DeepSpeed. A non-finite one calls DeepSpeed's own ZeRO `step` directly (the mask's hooks do not run, as the
      optimizer's step does not without DeepSpeed) with its overflow flag forced, exactly as for an fp16
      loss-scale overflow but leaving the loss scaler as DeepSpeed would: DeepSpeed drops the gradients and returns
      before the inner optimizer, so no parameter, master weight, moment or step count changes; the engine counts the
      step in `skipped_steps` and accelerate then skips the LR scheduler step;
    - the inner optimizer's `step` is a no-op during a skipped step, a second guard should a DeepSpeed version step
      it anyway.

    first_step: index of the next optimizer step. inject: step indices at which to fill this rank's first gradient
    partition with NaN (the `UEGR_DEBUG_NAN_STEPS` testing aid; given to process 0 only).
    """

    def __init__(self, engine: Any, device: torch.device, first_step: int = 0, inject: Iterable[int] = ()) -> None:
        self.engine = engine
        self.partitions = zero_partitions(engine)  # NotImplementedError for other DeepSpeed optimizers
        self.group = data_parallel_group(engine)
        self.device = device
        self.check_gradients = not engine.fp16_enabled()
        self.inject = set(inject)
        self.step = first_step
        self.last: tuple[int, bool] | None = None
        """(step index, finite) of the last ZeRO step."""
        self._loss: torch.Tensor | None = None
        self._skipping = False
        self._install(engine)

    def _install(self, engine: Any) -> None:
        def backward_keeping_loss(backward: Any) -> Any:
            def wrapped(loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                self._loss = loss.detach()
                return backward(loss, *args, **kwargs)

            return wrapped

        def guarded_zero_step(zero_step: Any) -> Any:
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                finite = self._agree_finite()
                self.last = (self.step, finite)
                self.step += 1
                clear_overflow(engine)  # a skip must not stick
                if finite:
                    return zero_step(*args, **kwargs)
                self._skipping = True
                try:
                    skip_zero_step(engine)
                finally:
                    self._skipping = False
                return None

            return wrapped

        def guarded_inner_step(inner_step: Any) -> Any:
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                return None if self._skipping else inner_step(*args, **kwargs)

            return wrapped

        wrap_engine_backward(engine, backward_keeping_loss)
        wrap_zero_step(engine, guarded_zero_step)
        wrap_inner_step(engine, guarded_inner_step)

    @torch.no_grad()
    def _agree_finite(self) -> bool:
        """Is the step finite on every rank: this rank's last loss and gradient partitions, one all-reduce."""
        flags = []
        if self._loss is not None:
            flags.append(~torch.isfinite(self._loss).all())
            self._loss = None
        views = [view for partition in self.partitions for view in partition.grad_views() if view is not None]
        views = [view for view in views if view.numel() > 0]
        if self.step in self.inject:
            flags.append(torch.ones((), dtype=torch.bool))  # as if the loss were NaN too
            if views:
                views[0].fill_(math.nan)
        if self.check_gradients and views:
            norms = torch.stack(torch._foreach_norm(views, 2, dtype=torch.float32))
            flags.append(~torch.isfinite(norms).all())
        bad = torch.zeros(1, dtype=torch.float32, device=self.device)
        for flag in flags:
            bad += flag.to(device=self.device, dtype=torch.float32)
        if dist.get_world_size(group=self.group) > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.SUM, group=self.group)
        return bool(bad.item() == 0)

    def decision(self, step: int) -> bool:
        """Whether optimizer step `step` was finite (it ran inside `accelerator.backward`, before this call)."""
        if self.last is None or self.last[0] != step:
            raise RuntimeError(
                f"the non-finite guard expected DeepSpeed's ZeRO step for optimizer step {step}, but the last one it "
                f"saw was {None if self.last is None else self.last[0]}: the engine did not step at this boundary"
            )
        return self.last[1]
