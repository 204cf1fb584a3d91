"""Host synchronizations inside training steps: counted on a CPU, forbidden on a GPU.

    python -m benchmarks.sync_check --methods vanilla uegr                 # CPU: reads counted, listed with stacks
    python -m benchmarks.sync_check --methods uegr --fixed-shapes          # + ops whose output size needs a read
    python -m benchmarks.sync_check --device cuda --dtype bf16 --config roberta-large --methods vanilla uegr

It runs the real `uegr_dist.engine.train_loop.train()` (a random-init model of a `common.PRESETS` size, synthetic
data, `--steps` optimizer steps, logging only at the last one) and watches the *step*: `train_step` and the loop's
per-step bookkeeping around it (the loss tally, the mask statistics, the non-finite guard's record, the preemption
check, a non-logging `RunLog.step`); logging, checkpoints and evaluation are left out, as is data loading (the
loader yields host tensors). Every `train_step` is watched (the last step's logging, after it, is not).

On a CPU every tensor lives on the host, so a synchronization cannot be observed; what is counted is what would be
one on a GPU (`HostReadCounter`):

- a tensor value read into Python: `aten::_local_scalar_dense` (`.item()`, `bool()`, `int()`, `float()`, indexing
  with a tensor), `aten::equal`, `Tensor.tolist()`, `Tensor.numpy()`;
- host data sent to the run's device: `torch.tensor(..., device=...)` / `torch.as_tensor(..., device=...)` with an
  explicit device (on a GPU a blocking copy from pageable memory);
- with `fixed_shapes` (the masker's GPU path forced on): operations whose output size depends on values (`nonzero`,
  `masked_select`, `unique`, boolean indexing, `bincount` (it reads its largest key), `repeat_interleave` without
  `output_size`).

Reads through `uegr_dist.backward.host` are not counted: `host_values` reads CPU tensors only (it refuses others)
and `DeferredValue` reads a copy that left the device one step earlier (pinned memory, a CUDA event): host data
by construction (the dropout rates' CPU generator draws, the guard's decision, the adaptive controller's divergence).

transformers' SDPA mask builder reads whether anything is padded in every forward (TRANSFORMERS_MASK_CHECK): that
read is reported apart, not as uegr-dist's.

On CUDA the same steps run under `torch.cuda.set_sync_debug_mode("error")`, with transformers' mask check switched
off: any other synchronizing CUDA call in a step raises. A second run in "warn" mode with the check on counts what
it adds. Writes results/sync_check_<tag>.json (one per process under a launcher).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import PRESETS, machine_info, run_config

RESULTS = Path(__file__).resolve().parent / "results"
_aten = torch.ops.aten
READS = {_aten._local_scalar_dense.default, _aten.equal.default}
SHAPE_DEPENDENT = {
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten.bincount.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.repeat_interleave.Tensor,
}


TRANSFORMERS_MASK_CHECK = "_ignore_bidirectional_mask_sdpa"
"""transformers' SDPA mask builder reads `attention_mask.all()` in every forward, to skip the mask (and let SDPA use
its flash kernel) when nothing is padded: a host synchronization inside the model, which the plain Accelerate loop
has too. Counted apart (`Event.in_transformers`)."""


@dataclass
class Event:
    """One counted call: what, in which step, from where."""

    kind: str
    step: int
    stack: str

    @property
    def in_transformers(self) -> bool:
        """The read is transformers' SDPA mask check (see TRANSFORMERS_MASK_CHECK)."""
        return TRANSFORMERS_MASK_CHECK in self.stack


@dataclass
class HostReadCounter:
    """Counts, while `active`, the calls listed in the module docstring; `stacks` keeps where each came from."""

    fixed_shapes: bool = False
    active: bool = False
    step: int = -1
    events: list[Event] = field(default_factory=list)

    def record(self, kind: str) -> None:
        from uegr_dist.backward.host import reading_host

        if not self.active or reading_host():
            return
        stack = "".join(traceback.format_stack(limit=16)[:-2])
        self.events.append(Event(kind, self.step, stack))

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Count inside the block (nested blocks count once)."""
        was, self.active = self.active, True
        try:
            yield
        finally:
            self.active = was

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The dispatch mode and the Python-level wrappers, for the duration of the block."""
        counter = self
        saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
        saved_factories = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}

        def reading(name: str) -> Callable[..., Any]:
            original = saved[name]

            def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                counter.record(f"Tensor.{name}")
                return original(self, *args, **kwargs)

            return wrapper

        def factory(name: str) -> Callable[..., Any]:
            original = saved_factories[name]

            @functools.wraps(original)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                if kwargs.get("device") is not None:
                    counter.record(f"torch.{name}(..., device=...)")
                return original(*args, **kwargs)

            return wrapper

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                kwargs = kwargs or {}
                if func in READS:
                    counter.record(str(func))
                elif counter.fixed_shapes and (func in SHAPE_DEPENDENT or _bool_index(func, args)):
                    if not (func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None):
                        counter.record(str(func))
                return func(*args, **kwargs)

        for name in saved:
            setattr(torch.Tensor, name, reading(name))
        for name in saved_factories:
            setattr(torch, name, factory(name))
        try:
            with Mode():
                yield
        finally:
            for name, original in saved.items():
                setattr(torch.Tensor, name, original)
            for name, original in saved_factories.items():
                setattr(torch, name, original)


def _bool_index(func: Any, args: tuple[Any, ...]) -> bool:
    """x[mask] / x[mask] = v with a bool mask (the result's size is the mask's count)."""
    if func not in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default):
        return False
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


@contextlib.contextmanager
def watched_steps(watch: Callable[[], Any], on_step: Callable[[int], None] | None = None) -> Iterator[None]:
    """Run `train()` with `watch()` (a context manager) around each step and the loop's per-step bookkeeping,
    except logging steps."""
    from uegr_dist.engine import guard, run_log, train_loop

    original_step = train_loop.train_step
    original_mask_logs = train_loop.mask_logs
    original_micro = run_log.RunLog.micro_step
    original_log_step = run_log.RunLog.step
    original_record = guard.NonFiniteGuard.record
    original_requested = guard.PreemptionHandler.requested

    def wrap(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with watch():
                return function(*args, **kwargs)

        return wrapper

    def train_step(run: Any, batch: Any) -> Any:
        if on_step is not None:
            on_step(run.state.step)
        with watch():
            return original_step(run, batch)

    def log_step(self: Any, state: Any, logs: Any, lr: float) -> None:
        if self.logs_at(state.step):  # a logging step reads what it logs: not watched
            return original_log_step(self, state, logs, lr)
        with watch():
            return original_log_step(self, state, logs, lr)

    train_loop.train_step = train_step
    train_loop.mask_logs = wrap(original_mask_logs)
    run_log.RunLog.micro_step = wrap(original_micro)
    run_log.RunLog.step = log_step
    guard.NonFiniteGuard.record = wrap(original_record)
    guard.PreemptionHandler.requested = wrap(original_requested)
    try:
        yield
    finally:
        train_loop.train_step = original_step
        train_loop.mask_logs = original_mask_logs
        run_log.RunLog.micro_step = original_micro
        run_log.RunLog.step = original_log_step
        guard.NonFiniteGuard.record = original_record
        guard.PreemptionHandler.requested = original_requested


def count_reads(cfg: Any, *, fixed_shapes: bool = False) -> list[Event]:
    """Train `cfg` (a Config) on the CPU, counting (see the module docstring) inside every non-logging step."""
    from uegr_dist.backward import masking
    from uegr_dist.engine.train_loop import train

    counter = HostReadCounter(fixed_shapes=fixed_shapes)
    original_init = masking.GradientMasker.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        if fixed_shapes:
            kwargs["fixed_shapes"] = True
        original_init(self, *args, **kwargs)

    def on_step(step: int) -> None:
        counter.step = step

    masking.GradientMasker.__init__ = init
    try:
        with counter.installed(), watched_steps(counter.watching, on_step):
            train(cfg)
    finally:
        masking.GradientMasker.__init__ = original_init
    return counter.events


@contextlib.contextmanager
def _cuda_sync_errors() -> Iterator[None]:
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@contextlib.contextmanager
def _cuda_sync_warnings(found: list[str]) -> Iterator[None]:
    """set_sync_debug_mode("warn") inside the block; each synchronization warning's message goes to `found`."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        found.extend(str(w.message)[:300] for w in caught if "synchroniz" in str(w.message))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@contextlib.contextmanager
def _without_transformers_mask_check() -> Iterator[None]:
    """transformers builds the SDPA mask without first reading whether anything is padded (it then always
    materializes the mask; the model computes the same)."""
    from transformers import masking_utils

    original = getattr(masking_utils, TRANSFORMERS_MASK_CHECK)
    setattr(masking_utils, TRANSFORMERS_MASK_CHECK, lambda *args, **kwargs: False)
    try:
        yield
    finally:
        setattr(masking_utils, TRANSFORMERS_MASK_CHECK, original)


def cuda_check(cfg: Any, again: Any) -> dict[str, Any]:
    """Train `cfg` on the GPU with every non-logging step under set_sync_debug_mode("error"), transformers' own mask
    check switched off (TRANSFORMERS_MASK_CHECK); then `again` (the same run in another directory) in "warn" mode
    with the check on, counting the synchronizations it adds."""
    from uegr_dist.engine.train_loop import train

    steps: list[int] = []
    result: dict[str, Any] = {"ok": True}
    try:
        with _without_transformers_mask_check(), watched_steps(_cuda_sync_errors, steps.append):
            train(cfg)
    except RuntimeError as error:  # the first synchronizing call in a step
        result = {"ok": False, "error": str(error)[:2000], "trace": traceback.format_exc()[-6000:]}
    result["steps_run"] = len(steps)
    found: list[str] = []
    with watched_steps(lambda: _cuda_sync_warnings(found)):
        train(again)
    result["synchronizations_with_transformers_check"] = len(found)
    result["messages"] = sorted(set(found))[:5]
    return result


def build_config(root: Path, args: argparse.Namespace, method: str) -> Any:
    """A run config of `args.steps` steps of `method` (logging only at the last one)."""
    from uegr_dist.config import load_config

    section: dict[str, Any] = {"name": method}
    if method == "uegr" and args.adaptive:
        section["dropout"] = {"schedule": "adaptive"}
    raw = run_config(
        root / method,
        args.config,
        section,
        seq=args.seq,
        batch_size=args.batch,
        steps=args.steps,
        mixed_precision="bf16" if args.dtype == "bf16" else "no",
    )
    raw["train"]["grad_accum"] = args.grad_accum
    return load_config(None, raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sync_check", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["vanilla", "uegr"])
    parser.add_argument("--config", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--adaptive", action="store_true", help="UEGR with the adaptive dropout-rate controller")
    parser.add_argument("--fixed-shapes", action="store_true", help="CPU: force the masker's GPU path and count it")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--tag", default=None)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and len(args.methods) > 1:
        parser.error("under a launcher give one method per launch (train() ends the process group)")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="uegr_sync_check_") as tmp:
        for method in args.methods:
            cfg = build_config(Path(tmp), args, method)
            if args.device == "cuda":
                result = cuda_check(cfg, build_config(Path(tmp) / "again", args, method))
                results[method] = result
                print(f"{method}: {'no synchronization in a step' if result['ok'] else result['error']}")
                print(f"{method}: {result['synchronizations_with_transformers_check']} with transformers' mask check")
            else:
                events = count_reads(cfg, fixed_shapes=args.fixed_shapes)
                ours = [e for e in events if not e.in_transformers]
                results[method] = {
                    "ok": not ours,
                    "events": [{**e.__dict__, "in_transformers": e.in_transformers} for e in events],
                    "in_transformers": len(events) - len(ours),
                }
                print(
                    f"{method}: {len(ours)} counted calls in uegr-dist's steps ({args.steps} steps watched); "
                    f"{len(events) - len(ours)} in transformers' SDPA mask check"
                )
                for event in ours[:5]:
                    print(f"  step {event.step}: {event.kind}\n{event.stack}")
    record = {
        "args": {**vars(args), "out_dir": str(args.out_dir)},
        "results": results,
        "machine": machine_info(args.device),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"{args.device}-{args.config}"
    if "RANK" in os.environ:  # one record per process of a launch
        tag += f"-rank{os.environ['RANK']}"
    (args.out_dir / f"sync_check_{tag}.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
