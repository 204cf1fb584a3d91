"""The training loop. Reads top to bottom like accelerate's NLP example: set-up (`engine/setup.py`), then per batch
one `train_step` (the method's forward and backward stage, then the optimizer step, which masks, clips and updates),
evaluation after each epoch (`engine/evaluation.py`), checkpoints (`engine/checkpoint.py`) and logging
(`engine/run_log.py`); preemption signals and the non-finite guard live in `engine/guard.py`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from uegr_dist.config import Config
from uegr_dist.engine.evaluation import evaluate
from uegr_dist.engine.export import save_model
from uegr_dist.engine.guard import Preempted, PreemptionHandler
from uegr_dist.engine.model_card import write_model_card
from uegr_dist.engine.run_log import RunLog
from uegr_dist.engine.setup import Run, set_up_run
from uegr_dist.methods import StepOutput


@dataclass
class RunResult:
    """What a finished run reports (also written to metrics.json)."""

    metrics: dict[str, Any]
    output_dir: Path


def train_step(run: Run, batch: dict[str, torch.Tensor]) -> tuple[StepOutput, bool]:
    """One micro-batch: the method's forward and backward, then, at an accumulation boundary, the optimizer step
    (mask -> clip -> update; under DeepSpeed it already ran inside the backward) unless the non-finite guard skips
    it on every process. Returns the method's output and whether the step was finite (always True when the guard
    decides on the device: the step then moves nothing if it was not, and the guard steps the scheduler once it
    knows). No value is read on the host here."""
    accelerator, state = run.accelerator, run.state
    finite = True
    with accelerator.accumulate(run.model):
        result = run.method.forward_backward(accelerator, run.model, batch, state.step, state.micro_step)
        if accelerator.sync_gradients:
            finite = run.guard.step_is_finite(result.loss, run.model.parameters(), state.step)
        if finite:
            run.optimizer.step()
            if not (accelerator.sync_gradients and run.guard.deferred):
                run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return result, finite


def train(cfg: Config, accelerator: Any = None) -> RunResult:
    """Fine-tune `cfg.model` on `cfg.data` with `cfg.method`; write model, tokenizer, metrics.json, config.yaml and a
    model card (README.md)."""
    run = set_up_run(cfg, accelerator)
    state, accelerator = run.state, run.accelerator
    log = RunLog(accelerator, cfg, run.total_steps, state)
    if run.method.steps_optimizer:  # MAT updates the parameters itself: its guard keeps reading the loss
        run.guard.bind(run.selective, run.scheduler, state)
    run.model.train()
    with PreemptionHandler(accelerator) as preemption:
        while state.step < run.total_steps:
            for batch in run.checkpoints.epoch_batches(run.train_loader, state):
                log.start_micro_step()
                result, finite = train_step(run, batch)
                state.micro_step += 1
                log.micro_step(state, result.loss, batch)
                if not accelerator.sync_gradients:
                    continue
                run.guard.record(finite, state, state.step)
                state.step += 1
                run.averager.after_step(state.step)
                if log.logs_at(state.step) or state.step >= run.total_steps:
                    run.guard.settle()  # the LR and the skipped-step counts this step's log reports
                log.step(state, {**result.logs, **mask_logs(run)}, run.scheduler.get_last_lr()[0])
                if state.step >= run.total_steps:
                    break
                # The last step goes on to the final evaluation and save, even when a signal came.
                if preemption.requested(state.step):
                    run.guard.settle()
                    log.flush(state)
                    raise Preempted(str(run.checkpoints.save(state)), state.step)
                if run.checkpoints.due(state, run.total_steps):
                    run.guard.settle()
                    log.flush(state)
                    run.checkpoints.save(state)
            state.epoch += 1
            if cfg.train.eval_every_epoch or state.step >= run.total_steps:
                log.evaluation(state, evaluate_run(run))
    run.guard.settle()
    log.close(state)
    return finish(run, log)


def evaluate_run(run: Run) -> dict[str, float]:
    """The validation metrics of the model now (extra splits prefixed with their name); with train.average, of the
    averaged weights."""
    with run.averager.applied():
        return evaluate(run.accelerator, run.model, run.eval_loader, run.task, run.extra_loaders)


def mask_logs(run: Run) -> dict[str, float | torch.Tensor]:
    """The share of covered coordinates the last step's gradient mask kept (nothing without a mask; a 0-dim tensor
    where it was counted on the device, read only when logged)."""
    stats = run.selective.last_mask_stats
    return {} if stats is None else {"mask_kept_fraction": stats.lazy_keep_fraction}


def finish(run: Run, log: RunLog) -> RunResult:
    """The final evaluation and checkpoint, metrics.json, the saved model and its model card."""
    state, accelerator, cfg = run.state, run.accelerator, run.cfg
    if not state.history or state.history[-1]["step"] != state.step:
        log.evaluation(state, evaluate_run(run))
    if cfg.train.save_every > 0 and run.checkpoints.last_saved_step != state.step:
        run.checkpoints.save(state)
    task_name = run.task.task.name if run.task.task else cfg.data.train_file
    summary = {**log.summary(state, task_name, run.task.main_metric), **run.averager.summary()}
    run.method.teardown()
    accelerator.wait_for_everyone()
    if cfg.train.save_model:
        if cfg.train.average.keep_raw and cfg.train.average.kind != "none":
            save_model(accelerator, run.model, run.out / "raw", run.tokenizer)
        run.averager.install()  # train.average: the averaged weights are the model from here on
        save_model(accelerator, run.model, run.out, run.tokenizer)  # fp32: DeepSpeed bf16 saves its master weights
    if accelerator.is_main_process:
        (run.out / "metrics.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        write_model_card(run.out, cfg, summary)
    accelerator.end_training()
    return RunResult(summary, run.out)
