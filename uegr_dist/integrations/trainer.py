"""`RobustTrainer`: transformers' `Trainer` running any uegr-dist method, `TrainingArguments` as users write them."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from transformers import Trainer

from uegr_dist.backward import SelectiveAdamW, decay_groups
from uegr_dist.config import ConfigError, MethodConfig
from uegr_dist.config.loading import ONE_UPDATE_PER_BATCH
from uegr_dist.engine.backend import build_backend, configure_deepspeed_clipping
from uegr_dist.engine.distributed import DistributedSetupError
from uegr_dist.engine.model_card import CARD, CardInfo, flatten, read_robustness, render_model_card
from uegr_dist.methods import Method, MethodContext, StepOutput, TrainingData, build_method
from uegr_dist.methods.robust_loss import method_config

SAMPLE_ID = "sample_id"


class RobustTrainer(Trainer):
    """A `transformers.Trainer` whose training step is a uegr-dist method's (UEGR or any peer, by name).

        trainer = RobustTrainer(model=model, args=TrainingArguments(...), train_dataset=train, eval_dataset=dev,
                                method="uegr", method_options={"dropout": {"k": 2}, "mask": {"ratio": 0.3}})
        trainer.train()

    Everything else is the Trainer's: `TrainingArguments` (learning rate, AdamW betas / eps, weight decay, warm-up and
    schedule, gradient accumulation, bf16, `max_grad_norm`, `deepspeed=` ZeRO-1/2/3 JSONs), `accelerate launch` or
    torchrun, evaluation, checkpoints, callbacks. What changes:

    - the optimizer is a `SelectiveAdamW` built from those arguments and the method's gradient mask (a DeepSpeed
      JSON must not define its own "optimizer": the mask needs ours). Its `step()` masks, then clips to
      `max_grad_norm`, then updates; the Trainer's own clipping (which would run before the mask) is turned off, and
      under DeepSpeed its `gradient_clipping` is set to 0 when the method masks (the ZeRO masker clips);
    - each training step is the method's `forward_backward` (SAM's two passes, MAT's SGLD included);
    - the rows keep a `sample_id` column (their index in the training set; added when missing) for methods with
      `rng: keyed` draws;
    - `train()` and `save_model()` write a model card (README.md) in the output directory.
    """

    def __init__(
        self,
        *args: Any,
        method: str | MethodConfig = "uegr",
        method_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.method_config = method_config(method, method_options)
        self.method: Method = build_method(self.method_config)
        train_dataset = kwargs.get("train_dataset")
        if train_dataset is not None and hasattr(train_dataset, "column_names"):
            if SAMPLE_ID not in train_dataset.column_names:
                kwargs["train_dataset"] = train_dataset.add_column(SAMPLE_ID, list(range(len(train_dataset))))
        super().__init__(*args, **kwargs)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.args.world_size:
            raise DistributedSetupError(
                f"the launcher started {launched} processes (WORLD_SIZE) but the Trainer runs "
                f"{self.args.world_size} data-parallel process(es): every process would train on all the data. "
                "Without GPUs pass TrainingArguments(use_cpu=True) for DDP, or ddp_backend='gloo' with deepspeed="
            )
        if self.args.gradient_accumulation_steps > 1 and self.method_config.name in ONE_UPDATE_PER_BATCH:
            raise ConfigError(
                f"gradient_accumulation_steps = {self.args.gradient_accumulation_steps}: method "
                f"{self.method_config.name} is defined per optimizer step; use 1"
            )
        self._method_ready = False
        self._micro_step = 0

    # -- the optimizer: the method's backward stage ---------------------------------------------------------------

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """A SelectiveAdamW with the method's gradient mask and `max_grad_norm` (clipping after the mask)."""
        if self.optimizer is None:
            args = self.args
            self.optimizer = SelectiveAdamW(
                decay_groups(self.model.named_parameters(), args.weight_decay),
                lr=args.learning_rate,
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
                weight_decay=args.weight_decay,
                mask=self.method.gradient_mask(args.seed),
                max_grad_norm=args.max_grad_norm,
            )
            plugin = self.accelerator.state.deepspeed_plugin
            if plugin is not None and "optimizer" in plugin.deepspeed_config:
                raise ConfigError(
                    "the DeepSpeed config defines an optimizer: RobustTrainer needs its own (SelectiveAdamW) for the "
                    "method's backward stage; remove the config's \"optimizer\" section"
                )
            configure_deepspeed_clipping(self.accelerator, args.max_grad_norm, self.optimizer.masks_gradients)
        return self.optimizer

    def _clip_grad_norm(self, model: Any) -> Any:
        """No clipping here: it would clip the gradient before the mask. SelectiveAdamW's step (or, under DeepSpeed,
        the ZeRO step) clips the masked gradient."""
        return None

    # -- the training step: the method's forward stage ------------------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if SAMPLE_ID not in self._signature_columns:
            self._signature_columns.append(SAMPLE_ID)

    def _set_up_method(self, model: Any) -> None:
        """After the Trainer's `accelerator.prepare`: the optimizer attached to the run's backend, the method set up."""
        optimizer = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        if isinstance(optimizer, SelectiveAdamW):
            selective = optimizer
        else:  # under DeepSpeed the Trainer holds DeepSpeed's wrapper; ours is inside the ZeRO optimizer
            selective = self.model_wrapped.optimizer.optimizer
        if not isinstance(selective, SelectiveAdamW):
            raise TypeError(f"RobustTrainer needs its SelectiveAdamW, the run has {type(selective).__name__}")
        backend = build_backend(self.model_wrapped, selective, self.accelerator)
        selective.attach(backend)
        data = None
        if self.train_dataset is not None:
            data = TrainingData(
                self._remove_unused_columns(self.train_dataset, "training")
                if hasattr(self.train_dataset, "column_names")
                else self.train_dataset,
                self.data_collator,
                steps_per_epoch=max(1, len(self.get_train_dataloader()) // self.args.gradient_accumulation_steps),
            )
        base = self.accelerator.unwrap_model(self.model_wrapped)
        self.method.setup(
            MethodContext(self.model_wrapped, base, selective.named_parameters, backend, self.args.seed, data)
        )
        self._method_ready = True

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """One micro-batch of the method (forward stage and backward); returns the loss the Trainer logs."""
        if not self._method_ready:
            self._set_up_method(model)
        model.train()
        inputs = self._prepare_inputs(inputs)
        result: StepOutput = self.method.forward_backward(
            _TrainerAccelerator(self), model, inputs, self.state.global_step, self._micro_step
        )
        self._micro_step += 1
        return result.loss.detach() / self.current_gradient_accumulation_steps

    # -- what a run leaves behind ---------------------------------------------------------------------------------

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's training, then the method's changes to the model undone and the model card written."""
        try:
            return super().train(*args, **kwargs)
        finally:
            if self._method_ready:
                self.method.teardown()
                self._method_ready = False
            if self.is_world_process_zero():
                self.write_model_card(self.args.output_dir)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's save, plus the model card."""
        super().save_model(output_dir, _internal_call)
        if self.is_world_process_zero() and not _internal_call:
            self.write_model_card(output_dir or self.args.output_dir)

    def write_model_card(self, output_dir: str) -> Path:
        """README.md in `output_dir`: base model, method and hyper-parameters, data, last evaluation metrics."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        evals = [entry for entry in self.state.log_history if any(k.startswith("eval_") for k in entry)]
        metrics = {
            key.removeprefix("eval_"): float(value)
            for key, value in (evals[-1] if evals else {}).items()
            if key.startswith("eval_")
            and isinstance(value, (int, float))
            and not key.endswith(("runtime", "per_second"))
        }
        hyper = flatten({"method": json.loads(json.dumps(asdict(self.method_config), default=str))})
        for key in ("learning_rate", "weight_decay", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                    "gradient_accumulation_steps", "warmup_steps", "lr_scheduler_type", "max_grad_norm", "seed",
                    "bf16", "fp16"):  # fmt: skip
            hyper[f"args.{key}"] = getattr(self.args, key)
        if self.args.deepspeed:
            hyper["args.deepspeed"] = str(self.args.deepspeed) if not isinstance(self.args.deepspeed, dict) else "dict"
        base = getattr(self.accelerator.unwrap_model(self.model).config, "_name_or_path", "") or "unknown"
        info = CardInfo(
            name=out.name,
            base_model=str(base),
            method=self.method_config.name,
            hyperparameters=hyper,
            data={"train": f"{len(self.train_dataset)} rows" if self.train_dataset is not None else "none"},
            dataset_id=None,
            metrics=metrics,
            steps=self.state.global_step,
            num_processes=self.args.world_size,
            robustness=read_robustness(out),
        )
        path = out / CARD
        path.write_text(render_model_card(info), encoding="utf-8")
        return path


class _TrainerAccelerator:
    """What a method's `forward_backward` needs of an accelerator, with the Trainer's loss scaling: the loss divided
    by the micro-batches of this accumulation (the Trainer gives accelerate no accumulation of its own), and under
    DeepSpeed no second scaling by the engine."""

    def __init__(self, trainer: RobustTrainer) -> None:
        self.trainer = trainer

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.trainer.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        trainer = self.trainer
        kwargs = {"scale_wrt_gas": False} if trainer.accelerator.distributed_type == DistributedType.DEEPSPEED else {}
        trainer.accelerator.backward(loss / trainer.current_gradient_accumulation_steps, **kwargs)
