"""A method's forward stage as a loss object for any training loop: `loss_fn(model, batch)` -> loss, logits, logs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from uegr_dist.config import ConfigError, MethodConfig, load_config
from uegr_dist.methods.base import Method, MethodContext, StepOutput, TrainingData


def method_config(method: str | MethodConfig, options: dict[str, Any] | None = None) -> MethodConfig:
    """A checked MethodConfig from a method name and its options as nested dicts (the `method:` section of a config
    file, e.g. {"dropout": {"k": 3}}), or the given config itself (then without options)."""
    if isinstance(method, MethodConfig):
        if options:
            raise ValueError("method_config(): options go with a method name, not with a MethodConfig")
        return method
    return load_config(None, {"method": {"name": method, **(options or {})}}).method


class RobustLoss:
    """The forward stage of a method (UEGR, R-Drop, FreeLB, SMART, HyPe, ASA, vanilla; ChildTuning and RoAST are
    vanilla here, their work is the optimizer's mask) as a loss object: `loss_fn(model, batch)` returns the method's
    `StepOutput`: `.loss` to backpropagate, the clean `.logits`, and `.logs` (0-dim tensors or floats).

    The batch is a dict with `input_ids`, `attention_mask`, `labels` (and `sample_id`, the row's index in the
    training set, when the method's draws are keyed: `rng="keyed"`, which makes N processes reproduce one). The
    method is set up on the model at the first call (or by `uegr_dist.prepare`, which also gives it the accelerator:
    the call then runs under `accelerator.autocast()`); `gradient_mask()` is what `SelectiveAdamW(mask=...)` needs
    for the method's backward stage. `remove()` undoes the method's changes to the model (before saving it).

    Step counting: the n-th call is micro-batch n; the optimizer-step index advances after a call made at an
    accumulation boundary (accelerate's `sync_gradients`), as in `uegr-train`. Pass step= / micro_step= to override.
    SAM and MAT update the parameters their own way (two passes; SGLD): use `uegr-train` or `RobustTrainer`.
    """

    def __init__(
        self,
        method: str | MethodConfig = "uegr",
        *,
        seed: int = 0,
        data: TrainingData | None = None,
        **options: Any,
    ) -> None:
        self.config = method_config(method, options)
        self.method: Method = _build(self.config)
        if type(self.method).forward_backward is not Method.forward_backward:
            raise ConfigError(
                f"method.name = {self.config.name}: it updates the parameters in its own way, not through a loss; "
                "use uegr-train or uegr_dist.integrations.RobustTrainer"
            )
        self.seed = seed
        self.data = data
        self.accelerator: Any = None
        self.micro_step = 0
        self.step = 0
        self._ready = False

    def gradient_mask(self) -> Any:
        """The method's backward stage for `SelectiveAdamW(mask=...)` (None: update every coordinate)."""
        return self.method.gradient_mask(self.seed)

    def setup(self, model: nn.Module, accelerator: Any = None, backend: Any = None) -> None:
        """Set the method up on `model` (prepared or not); `uegr_dist.prepare` calls this, else the first call does."""
        from uegr_dist.engine.backend import build_backend

        self.accelerator = accelerator
        base = accelerator.unwrap_model(model) if accelerator is not None else getattr(model, "module", model)
        backend = backend or build_backend(model, accelerator=accelerator)
        named = [(n, p) for n, p in base.named_parameters() if p.requires_grad]
        self.method.setup(MethodContext(model, base, named, backend, self.seed, self.data))
        self._ready = True

    def __call__(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        *,
        step: int | None = None,
        micro_step: int | None = None,
    ) -> StepOutput:
        """The method's objective on one micro-batch (under the accelerator's autocast when it has one)."""
        if not self._ready:
            self.setup(model)
        step = self.step if step is None else step
        micro_step = self.micro_step if micro_step is None else micro_step
        if self.accelerator is not None:
            with self.accelerator.autocast():
                out = self.method.loss(model, batch, step, micro_step)
        else:
            out = self.method.loss(model, batch, step, micro_step)
        self.micro_step = micro_step + 1
        self.step = step + 1 if _at_boundary() else step
        return out

    def remove(self) -> None:
        """Undo the method's changes to the model (chunked dropout, attention routing, hooks)."""
        if self._ready:
            self.method.teardown()
            self._ready = False

    def state_dict(self) -> dict[str, Any]:
        """Counters and the method's state (e.g. UEGR's adaptive dropout-rate controller), for a checkpoint."""
        return {"step": self.step, "micro_step": self.micro_step, "method": self.method.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` (after the first call or `setup`)."""
        self.step, self.micro_step = int(state["step"]), int(state["micro_step"])
        self.method.load_state_dict(state["method"])


def _build(cfg: MethodConfig) -> Method:
    from uegr_dist.methods import build_method

    return build_method(cfg)


def _at_boundary() -> bool:
    """accelerate's `sync_gradients` for the current micro-batch (True outside any accumulation)."""
    from accelerate.state import GradientState

    return bool(GradientState().sync_gradients)
