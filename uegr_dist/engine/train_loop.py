"""The training loop: Accelerate + a pluggable method. Reads top to bottom like accelerate's NLP example, with the
UEGR stages as two named calls (`method.loss`, `method.transform_gradients`). Checkpoints and exact resume live in
`engine/checkpoint.py` (`Checkpointer`), preemption signals and the non-finite step guard in `engine/guard.py`."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from uegr_dist.backward import MaskedAdamW, configure_deepspeed_clipping
from uegr_dist.config import Config, ConfigError, config_to_dict
from uegr_dist.data import LengthGroupedSampler, PaddingCollator, TaskData, load_raw_task, prepare_task
from uegr_dist.engine.checkpoint import (
    Checkpointer,
    LoopState,
    refuse_stale_checkpoints,
    select_resume_checkpoint,
)
from uegr_dist.engine.distributed import build_accelerator
from uegr_dist.engine.export import save_model
from uegr_dist.engine.guard import NonFiniteGuard, Preempted, PreemptionHandler
from uegr_dist.evaluation import classification_metrics, regression_metrics
from uegr_dist.methods import Method, MethodContext, build_method, model_inputs
from uegr_dist.modeling import load_model, load_tokenizer
from uegr_dist.modeling.loading import WORD_LEVEL

# A finished run: a crashed one (config.yaml, logs only) may be run again into the same directory.
RUN_OUTPUTS = ("metrics.json", "model.safetensors")


@dataclass
class RunResult:
    """What a finished run reports (also written to metrics.json)."""

    metrics: dict[str, Any]
    output_dir: Path


def _check_output_dir(cfg: Config) -> Path:
    out = Path(cfg.train.output_dir)
    existing = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if existing and not cfg.train.overwrite:
        raise ConfigError(
            f"train.output_dir = {str(out)!r} already holds a run ({', '.join(existing)}); "
            "choose another directory or pass --train.overwrite true"
        )
    refuse_stale_checkpoints(cfg)
    return out


def _optimizer(model: torch.nn.Module, cfg: Config) -> MaskedAdamW:
    """AdamW (masked-coordinate aware) with the usual no-decay group for biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # ZeRO-3 may partition parameters as the model is built (transformers' zero.Init): ds_shape is the real shape.
        ndim = len(getattr(param, "ds_shape", param.shape))
        (no_decay if ndim < 2 or "LayerNorm" in name or "layernorm" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return MaskedAdamW(groups, lr=cfg.train.lr)


def _named_in_optimizer_order(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, Any]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(p)], p) for group in optimizer.param_groups for p in group["params"]]


def load_task(cfg: Config, accelerator: Accelerator | None = None) -> tuple[Any, TaskData]:
    """Tokenizer and tokenized data for the run (a word-level tokenizer is trained on the training texts). The main
    process reads and tokenizes first, so the other processes reuse its `datasets` cache instead of racing on it."""
    with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
        raw = load_raw_task(cfg.data, cfg.train.seed)
        texts = raw.texts() if (cfg.model.tokenizer or cfg.model.name_or_path) == WORD_LEVEL else None
        tokenizer = load_tokenizer(cfg.model, texts)
        return tokenizer, prepare_task(raw, cfg.data, tokenizer)


def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader: DataLoader,
    task: TaskData,
    extra_loaders: dict[str, DataLoader] | None = None,
) -> dict[str, float]:
    """Metrics over the whole validation split (gathered across processes without duplicates); the metrics of an
    extra split (MNLI mismatched) are prefixed with its name."""
    metrics = _evaluate_split(accelerator, model, loader, task)
    for name, extra in (extra_loaders or {}).items():
        metrics.update({f"{name}_{k}": v for k, v in _evaluate_split(accelerator, model, extra, task).items()})
    return metrics


def _evaluate_split(
    accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader, task: TaskData
) -> dict[str, float]:
    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for batch in loader:
            logits = model(**model_inputs(batch)).logits
            out = logits[:, 0] if task.regression else logits.argmax(dim=-1)
            out, lab = accelerator.gather_for_metrics((out, batch["labels"]))
            preds.append(out.float().cpu().numpy())
            labels.append(lab.float().cpu().numpy())
    model.train()
    p, y = np.concatenate(preds), np.concatenate(labels)
    if task.regression:
        return regression_metrics(p, y)
    return classification_metrics(p.astype(np.int64), y.astype(np.int64), task.num_labels)


def train(cfg: Config, accelerator: Accelerator | None = None) -> RunResult:
    """Fine-tune `cfg.model` on `cfg.data` with `cfg.method`; write model, tokenizer, metrics.json, config.yaml."""
    out = _check_output_dir(cfg)
    accelerator = accelerator or build_accelerator(cfg)
    resume_from = select_resume_checkpoint(cfg, accelerator.num_processes)
    set_seed(cfg.train.seed)
    tokenizer, task = load_task(cfg, accelerator)
    model = load_model(cfg.model, tokenizer, task.num_labels, task.id2label, cfg.train.seed)

    fixed_width = cfg.data.max_length if cfg.data.padding == "max_length" else None
    collate = PaddingCollator(tokenizer, task.regression, max_length=fixed_width)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    if cfg.data.group_by_length:
        # The order is a function of (seed, epoch): the loop sets the epoch, so a resumed run redraws it.
        lengths = [len(ids) for ids in task.train["input_ids"]]
        sampler = LengthGroupedSampler(lengths, cfg.train.batch_size * accelerator.num_processes, cfg.train.seed)
        train_loader = DataLoader(task.train, batch_size=cfg.train.batch_size, sampler=sampler, collate_fn=collate)
    else:
        train_loader = DataLoader(
            task.train, batch_size=cfg.train.batch_size, shuffle=True, collate_fn=collate, generator=generator
        )
    eval_loader = DataLoader(task.validation, batch_size=cfg.train.eval_batch_size, collate_fn=collate)
    extra_loaders = {
        name: accelerator.prepare(DataLoader(ds, batch_size=cfg.train.eval_batch_size, collate_fn=collate))
        for name, ds in task.extra_validation.items()
    }
    # Optimizer steps per process: the prepared loader gives each process 1 / num_processes of the batches.
    batches_per_process = math.ceil(len(train_loader) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_process / cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))

    optimizer = _optimizer(model, cfg)
    # The prepared scheduler advances num_processes times per optimizer step (accelerate's convention).
    scheduler = get_scheduler(
        cfg.train.lr_schedule,
        optimizer,
        num_warmup_steps=int(cfg.train.warmup_ratio * total_steps) * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    # Before prepare: ZeRO replaces the optimizer's parameter lists with flat partitions.
    named_parameters = _named_in_optimizer_order(model, optimizer)
    method: Method = build_method(cfg.method)
    configure_deepspeed_clipping(accelerator, cfg.train.max_grad_norm, masks_gradients=method.masks_gradients)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    method.setup(
        MethodContext(
            model=model,
            base_model=accelerator.unwrap_model(model),
            optimizer=optimizer,
            named_parameters=named_parameters,
            seed=cfg.train.seed,
            num_processes=accelerator.num_processes,
            reduce_mean=lambda x: accelerator.reduce(torch.tensor(x, device=accelerator.device), "mean").item(),
            max_grad_norm=cfg.train.max_grad_norm,
            process_index=accelerator.process_index,
            device=accelerator.device,
            train_dataset=task.train,
            collate_fn=collate,
            steps_per_epoch=steps_per_epoch,
            all_reduce_sum=_all_reduce_sum if accelerator.num_processes > 1 else None,
        )
    )

    checkpoints = Checkpointer(accelerator, cfg, method, generator, resume_from)
    state = checkpoints.resume()
    # After method.setup: under DeepSpeed the guard's hook must wrap the method's hooks on the ZeRO step.
    guard_engine = model if method.steps_optimizer else None  # MAT's engine never steps: nothing to hook
    guard = NonFiniteGuard(accelerator, cfg.train.max_nonfinite_steps, guard_engine, first_step=state.step)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    if cfg.train.tracker != "none":
        accelerator.init_trackers("uegr", config=_flat_hparams(cfg))

    progress = tqdm(
        total=total_steps,
        initial=min(state.step, total_steps),
        desc=f"{cfg.method.name}",
        disable=not (accelerator.is_local_main_process and cfg.train.progress),
    )
    model.train()
    tally = _DeviceTally()
    with PreemptionHandler(accelerator) as preemption:
        while state.step < total_steps:
            for batch in checkpoints.epoch_batches(train_loader, state):
                tic = time.perf_counter()
                with accelerator.accumulate(model):
                    result = method.forward_backward(accelerator, model, batch, state.step, state.micro_step)
                    logs: dict[str, float] = {}
                    finite = True
                    if accelerator.sync_gradients:
                        finite = guard.step_is_finite(result.loss, model.parameters(), state.step)
                        if finite:
                            logs = method.transform_gradients(state.step)
                            if cfg.train.max_grad_norm > 0:
                                accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                    if finite:
                        optimizer.step()
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                state.micro_step += 1
                # The first optimizer step (allocations, lazy init) is left out of the throughput window.
                tally.add(result.loss, batch["attention_mask"] if state.step > 0 else None)
                if state.step > 0:
                    state.train_seconds += time.perf_counter() - tic
                    state.samples += batch["labels"].shape[0]
                if not accelerator.sync_gradients:
                    continue
                guard.record(finite, state, state.step)
                state.step += 1
                progress.update(1)
                if state.step % cfg.train.log_every == 0 or state.step == total_steps:
                    tally.flush(state)
                    finite_losses = [x for x in state.window_loss if math.isfinite(x)]
                    entry = {"step": state.step, "loss": float(np.mean(finite_losses)) if finite_losses else math.nan}
                    entry.update({k: float(v) for k, v in {**result.logs, **logs}.items()})
                    entry["lr"] = scheduler.get_last_lr()[0]
                    entry["nonfinite_steps"] = state.nonfinite_steps
                    state.losses.append(entry)
                    state.window_loss = []
                    progress.set_postfix(loss=f"{entry['loss']:.4f}")
                    accelerator.log({f"train/{k}": v for k, v in entry.items() if k != "step"}, step=state.step)
                if state.step >= total_steps:
                    break
                # The last step goes on to the final evaluation and save, even when a signal came.
                if preemption.requested(state.step):
                    tally.flush(state)
                    raise Preempted(str(checkpoints.save(state)), state.step)
                if checkpoints.due(state, total_steps):
                    tally.flush(state)
                    checkpoints.save(state)
            state.epoch += 1
            if cfg.train.eval_every_epoch or state.step >= total_steps:
                metrics = evaluate(accelerator, model, eval_loader, task, extra_loaders)
                state.history.append({"epoch": state.epoch, "step": state.step, **metrics})
                accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
                if accelerator.is_local_main_process and cfg.train.progress:
                    report = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                    progress.write(f"epoch {state.epoch} step {state.step}: {report}")
    progress.close()
    tally.flush(state)
    if not state.history or state.history[-1]["step"] != state.step:
        metrics = evaluate(accelerator, model, eval_loader, task, extra_loaders)
        state.history.append({"epoch": state.epoch, "step": state.step, **metrics})
    if cfg.train.save_every > 0 and checkpoints.last_saved_step != state.step:
        checkpoints.save(state)

    history = state.history
    totals = accelerator.reduce(
        torch.tensor([state.samples, state.tokens], dtype=torch.float64, device=accelerator.device), "sum"
    )
    seconds = accelerator.reduce(torch.tensor(state.train_seconds, device=accelerator.device), "mean").item()
    method.teardown()
    summary = {
        "method": cfg.method.name,
        "task": task.task.name if task.task else cfg.data.train_file,
        "main_metric": task.main_metric,
        "eval": history,
        "final": {k: v for k, v in history[-1].items() if k not in ("epoch", "step")},
        "train_loss": state.losses,
        "train": {
            "steps": state.step,
            "nonfinite_steps": state.nonfinite_steps,
            "num_processes": accelerator.num_processes,
            "seconds": seconds,
            "samples_per_second": float(totals[0]) / seconds if seconds > 0 else float("nan"),
            "tokens_per_second": float(totals[1]) / seconds if seconds > 0 else float("nan"),
        },
    }
    accelerator.wait_for_everyone()
    if cfg.train.save_model:
        save_model(accelerator, model, out, tokenizer)  # fp32: DeepSpeed bf16 saves its fp32 master weights
    if accelerator.is_main_process:
        (out / "metrics.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    accelerator.end_training()
    return RunResult(summary, out)


class _DeviceTally:
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


def _all_reduce_sum(tensor: torch.Tensor) -> None:
    """In-place sum over all processes of the run."""
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)


def _flat_hparams(cfg: Config) -> dict[str, Any]:
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
