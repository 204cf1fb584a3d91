"""Everything a run needs before its first step: accelerator, data, model, optimizer, scheduler, the prepared objects,
the method set up on them, the checkpointer and the non-finite guard (`set_up_run`)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import get_scheduler

from uegr_dist.backward import SelectiveAdamW, decay_groups
from uegr_dist.config import Config, ConfigError, config_to_dict
from uegr_dist.data import LengthGroupedSampler, PaddingCollator, TaskData, load_raw_task, prepare_task
from uegr_dist.engine.averaging import WeightAverager, with_swa_schedule
from uegr_dist.engine.backend import Backend, prepare
from uegr_dist.engine.checkpoint import Checkpointer, LoopState, refuse_stale_checkpoints, select_resume_checkpoint
from uegr_dist.engine.distributed import build_accelerator
from uegr_dist.engine.guard import NonFiniteGuard
from uegr_dist.methods import Method, MethodContext, TrainingData, build_method
from uegr_dist.modeling import load_model, load_tokenizer
from uegr_dist.modeling.loading import WORD_LEVEL

# A finished run: a crashed one (config.yaml, logs only) may be run again into the same directory.
RUN_OUTPUTS = ("metrics.json", "model.safetensors")


@dataclass
class Run:
    """A run after set-up: prepared objects (as the loop uses them) and what the loop reads."""

    cfg: Config
    out: Path
    accelerator: Accelerator
    tokenizer: Any
    task: TaskData
    model: torch.nn.Module
    """Prepared: DDP / DeepSpeed wrapper, or the module itself."""
    optimizer: Any
    """Prepared (accelerate's wrapper around `selective`)."""
    selective: SelectiveAdamW
    """The optimizer object itself: its gradient mask's logs and state."""
    scheduler: Any
    method: Method
    backend: Backend
    train_loader: DataLoader
    eval_loader: DataLoader
    extra_loaders: dict[str, DataLoader]
    total_steps: int
    checkpoints: Checkpointer
    guard: NonFiniteGuard
    state: LoopState
    averager: WeightAverager
    """train.average (SWA / EMA; does nothing with kind none)."""


def check_output_dir(cfg: Config) -> Path:
    """train.output_dir, refused when it holds a finished run (unless overwrite) or stale checkpoints."""
    out = Path(cfg.train.output_dir)
    existing = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if existing and not cfg.train.overwrite:
        raise ConfigError(
            f"train.output_dir = {str(out)!r} already holds a run ({', '.join(existing)}); "
            "choose another directory or pass --train.overwrite true"
        )
    refuse_stale_checkpoints(cfg)
    return out


def load_task(cfg: Config, accelerator: Accelerator | None = None) -> tuple[Any, TaskData]:
    """Tokenizer and tokenized data for the run (a word-level tokenizer is trained on the training texts). The main
    process reads and tokenizes first, so the other processes reuse its `datasets` cache instead of racing on it."""
    with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
        raw = load_raw_task(cfg.data, cfg.train.seed)
        texts = raw.texts() if (cfg.model.tokenizer or cfg.model.name_or_path) == WORD_LEVEL else None
        tokenizer = load_tokenizer(cfg.model, texts)
        return tokenizer, prepare_task(raw, cfg.data, tokenizer)


def build_optimizer(model: torch.nn.Module, cfg: Config, method: Method) -> SelectiveAdamW:
    """AdamW with the usual no-decay group (biases, LayerNorm weights), the method's gradient mask and clipping."""
    try:
        return SelectiveAdamW(
            decay_groups(model.named_parameters(), cfg.train.weight_decay),
            lr=cfg.train.lr,
            mask=method.gradient_mask(cfg.train.seed),
            max_grad_norm=cfg.train.max_grad_norm,
        )
    except ValueError as err:
        raise ConfigError(f"method.name = {cfg.method.name}: {err}") from None


def set_up_run(cfg: Config, accelerator: Accelerator | None = None) -> Run:
    """Build, prepare and resume everything; write config.yaml. Nothing is written before the inputs are checked."""
    out = check_output_dir(cfg)
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

    method = build_method(cfg.method)
    selective = build_optimizer(model, cfg, method)
    # The prepared scheduler advances num_processes times per optimizer step (accelerate's convention).
    scheduler = get_scheduler(
        cfg.train.lr_schedule,
        selective,
        num_warmup_steps=int(cfg.train.warmup_ratio * total_steps) * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    scheduler = with_swa_schedule(scheduler, cfg.train, total_steps, accelerator.num_processes)
    model, optimizer, train_loader, eval_loader, scheduler = prepare(
        accelerator, model, selective, train_loader, eval_loader, scheduler
    )
    backend = selective.backend
    assert isinstance(backend, Backend)
    method.setup(
        MethodContext(
            model=model,
            base_model=accelerator.unwrap_model(model),
            named_parameters=selective.named_parameters,
            backend=backend,
            seed=cfg.train.seed,
            data=TrainingData(task.train, collate, steps_per_epoch),
        )
    )
    averager = WeightAverager(cfg.train, backend, selective.named_parameters, total_steps)
    checkpoints = Checkpointer(accelerator, cfg, method, selective, generator, resume_from, averager)
    state = checkpoints.resume()
    # After method.setup: under DeepSpeed the guard's hook must wrap the method's hooks on the ZeRO step.
    guard_engine = model if method.steps_optimizer else None  # MAT's engine never steps: nothing to hook
    guard = NonFiniteGuard(accelerator, cfg.train.max_nonfinite_steps, guard_engine, first_step=state.step)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    return Run(
        cfg=cfg,
        out=out,
        accelerator=accelerator,
        tokenizer=tokenizer,
        task=task,
        model=model,
        optimizer=optimizer,
        selective=selective,
        scheduler=scheduler,
        method=method,
        backend=backend,
        train_loader=train_loader,
        eval_loader=eval_loader,
        extra_loaders=extra_loaders,
        total_steps=total_steps,
        checkpoints=checkpoints,
        guard=guard,
        state=state,
        averager=averager,
    )
