"""What stops a run early, safely: preemption signals (checkpoint, then exit 75) and non-finite losses or gradients
(skip the step on every process; stop after `train.max_nonfinite_steps` in a row).

Both decisions are agreed by all processes with one tiny all-reduce, so every rank skips the same steps and
checkpoints at the same step boundary.

Testing aids (read only here, not part of the config): `UEGR_DEBUG_NAN_STEPS=2,5` fills a gradient of process 0
with NaN (and its loss) at those optimizer steps (0-based); `UEGR_DEBUG_SIGNAL_AT=STEP:SIGNAL` (e.g. `4:TERM`,
`6:KILL`) makes process 0 send itself that signal at the boundary after optimizer step STEP.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Iterable
from types import FrameType

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from uegr_dist.engine.checkpoint import LoopState

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


class PreemptionHandler:
    """Turns SIGTERM / SIGUSR1 into a flag the loop polls at each optimizer-step boundary (a handler that only sets a
    flag is safe at any point of a step; the checkpoint is written between steps)."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._debug_at, self._debug_signal = _parse_debug_signal(os.environ.get("UEGR_DEBUG_SIGNAL_AT", ""))

    def __enter__(self) -> PreemptionHandler:
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
        return _agree_any(self.accelerator, self.received is not None)


def _parse_debug_signal(spec: str) -> tuple[int, int | None]:
    if not spec:
        return -1, None
    step, _, name = spec.partition(":")
    return int(step), int(getattr(signal, f"SIG{name.upper()}"))


class NonFiniteGuard:
    """Decides, after the backward of a synchronizing micro-batch, whether the optimizer step may run.

    One process, DDP: the step is skipped on every process (no optimizer or scheduler step, gradients zeroed) when
    the loss or any reduced gradient is non-finite on any process. fp16 with a GradScaler: only the loss is checked;
    infinite gradients are the scaler's business (it skips the step and lowers the scale). DeepSpeed: the engine
    has already stepped inside `accelerator.backward` (fp16: its own loss scaler skips overflowing steps); the guard
    sees the loss only, counts non-finite losses and stops the run after N in a row, but cannot undo a bf16/fp32 step.
    """

    def __init__(self, accelerator: Accelerator, max_in_a_row: int) -> None:
        self.accelerator = accelerator
        self.max_in_a_row = max_in_a_row
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.check_gradients = not self.deepspeed and accelerator.scaler is None
        raw = os.environ.get("UEGR_DEBUG_NAN_STEPS", "")
        self._inject = {int(s) for s in raw.split(",") if s.strip()}

    def step_is_finite(self, loss: torch.Tensor, parameters: Iterable[torch.nn.Parameter], step: int) -> bool:
        """All processes agree whether optimizer step `step` (0-based) is finite; when not, gradients are zeroed."""
        params = [p for p in parameters if p.grad is not None]
        if step in self._inject and self.accelerator.is_main_process:
            loss = loss.detach() * math.nan
            if params:
                params[0].grad.fill_(math.nan)
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self.check_gradients and params and not bad:
            norms = torch._foreach_norm([p.grad for p in params])
            bad = not bool(torch.isfinite(torch.stack(norms)).all())
        bad = _agree_any(self.accelerator, bad)
        if bad and not self.deepspeed:
            for param in params:
                param.grad = None
        return not bad

    def record(self, finite: bool, state: LoopState, step: int) -> None:
        """Count a skipped step in `state`; raise NonFiniteLossError after too many in a row."""
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
