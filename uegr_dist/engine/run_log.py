"""What a run reports while it trains: the loss curve, per-step method and mask logs, throughput, the progress bar and
the tracker (TensorBoard). Everything a step produces stays on the device until a logging step reads it."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from uegr_dist.config import Config, config_to_dict
from uegr_dist.engine.checkpoint import LoopState


class RunLog:
    """The loop's reporter: `micro_step` after each micro-batch, `step` after each optimizer step (logs every
    `train.log_every`), `flush` before a checkpoint, `epoch` after an evaluation, `summary` at the end."""

    def __init__(self, accelerator: Accelerator, cfg: Config, total_steps: int, state: LoopState) -> None:
        self.accelerator = accelerator
        self.cfg = cfg
        self.total_steps = total_steps
        self.tally = DeviceTally()
        self.progress = tqdm(
            total=total_steps,
            initial=min(state.step, total_steps),
            desc=f"{cfg.method.name}",
            disable=not (accelerator.is_local_main_process and cfg.train.progress),
        )
        if cfg.train.tracker != "none":
            accelerator.init_trackers("uegr", config=flat_hparams(cfg))
        self._tic = 0.0

    def start_micro_step(self) -> None:
        """Mark the start of a micro-batch (the throughput window times micro-batches)."""
        self._tic = time.perf_counter()

    def micro_step(self, state: LoopState, loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """Tally one micro-batch's loss and tokens (the first optimizer step is left out of the throughput window:
        allocations, lazy initialisation)."""
        counted = state.step > 0
        self.tally.add(loss, batch["attention_mask"] if counted else None)
        if counted:
            state.train_seconds += time.perf_counter() - self._tic
            state.samples += batch["labels"].shape[0]

    def logs_at(self, step: int) -> bool:
        """Whether `step` (steps done) writes a loss-curve entry (every `log_every` steps, and the last)."""
        return step % self.cfg.train.log_every == 0 or step == self.total_steps

    def step(self, state: LoopState, logs: dict[str, Any], lr: float) -> None:
        """After optimizer step `state.step`: the progress bar, and every `log_every` steps a loss-curve entry (the
        logs' 0-dim tensors are read then, all in one transfer)."""
        self.progress.update(1)
        if not self.logs_at(state.step):
            return
        self.tally.flush(state)
        finite = [x for x in state.window_loss if math.isfinite(x)]
        entry = {"step": state.step, "loss": float(np.mean(finite)) if finite else math.nan}
        entry.update(read_logs(logs))
        entry["lr"] = lr
        entry["nonfinite_steps"] = state.nonfinite_steps
        state.losses.append(entry)
        state.window_loss = []
        self.progress.set_postfix(loss=f"{entry['loss']:.4f}")
        self.accelerator.log({f"train/{k}": v for k, v in entry.items() if k != "step"}, step=state.step)

    def flush(self, state: LoopState) -> None:
        """Move the tallied losses and tokens into `state` (before it is checkpointed)."""
        self.tally.flush(state)

    def evaluation(self, state: LoopState, metrics: dict[str, float]) -> None:
        """Record an evaluation after epoch `state.epoch`."""
        state.history.append({"epoch": state.epoch, "step": state.step, **metrics})
        self.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
        if self.accelerator.is_local_main_process and self.cfg.train.progress:
            report = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            self.progress.write(f"epoch {state.epoch} step {state.step}: {report}")

    def close(self, state: LoopState) -> None:
        """End of training: the bar closes and the tally empties."""
        self.progress.close()
        self.tally.flush(state)

    def summary(self, state: LoopState, task_name: str | None, main_metric: str) -> dict[str, Any]:
        """What metrics.json holds: evaluations, the loss curve and throughput (summed over processes)."""
        acc = self.accelerator
        totals = acc.reduce(torch.tensor([state.samples, state.tokens], dtype=torch.float64, device=acc.device), "sum")
        seconds = acc.reduce(torch.tensor(state.train_seconds, device=acc.device), "mean").item()
        return {
            "method": self.cfg.method.name,
            "task": task_name,
            "main_metric": main_metric,
            "eval": state.history,
            "final": {k: v for k, v in state.history[-1].items() if k not in ("epoch", "step")},
            "train_loss": state.losses,
            "train": {
                "steps": state.step,
                "nonfinite_steps": state.nonfinite_steps,
                "num_processes": acc.num_processes,
                "seconds": seconds,
                "samples_per_second": float(totals[0]) / seconds if seconds > 0 else float("nan"),
                "tokens_per_second": float(totals[1]) / seconds if seconds > 0 else float("nan"),
            },
        }


class DeviceTally:
    """Per-micro-batch losses and token counts kept on the device until they are read (logging, a checkpoint, the
    end of the run), so that a training step needs no host synchronization for them (on a GPU each one stalls the
    queue of kernels the host has launched ahead)."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.tokens: torch.Tensor | None = None

    def add(self, loss: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        self.losses.append(torch.as_tensor(loss).detach().float().reshape(()))
        if attention_mask is not None:
            count = attention_mask.sum()
            self.tokens = count if self.tokens is None else self.tokens + count

    def flush(self, state: LoopState) -> None:
        """Move what was tallied into `state` (one synchronization)."""
        if self.losses:
            state.window_loss.extend(torch.stack([x.to(self.losses[0].device) for x in self.losses]).tolist())
            self.losses = []
        if self.tokens is not None:
            state.tokens += int(self.tokens)
            self.tokens = None


def read_logs(logs: dict[str, Any]) -> dict[str, float]:
    """Log values as floats: numbers as they are, tensors (0-dim, possibly on the device) read in one transfer."""
    out = {key: float(value) for key, value in logs.items() if not isinstance(value, torch.Tensor)}
    tensors = {key: value for key, value in logs.items() if isinstance(value, torch.Tensor)}
    if tensors:
        device = next(iter(tensors.values())).device
        stacked = torch.stack(
            [value.detach().to(device=device, dtype=torch.float64).reshape(()) for value in tensors.values()]
        )
        out.update(zip(tensors, stacked.tolist()))
    return {key: out[key] for key in logs}


def flat_hparams(cfg: Config) -> dict[str, Any]:
    """Scalar hyper-parameters for the tracker (TensorBoard accepts only scalars and strings)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            elif isinstance(value, (int, float, str, bool)):
                flat[f"{prefix}{key}"] = value
            elif value is not None:
                flat[f"{prefix}{key}"] = str(value)

    walk("", config_to_dict(cfg))
    return flat
