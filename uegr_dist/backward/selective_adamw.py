"""The backward stage as an optimizer: `SelectiveAdamW.step()` scores, selects, clips and updates, in that order."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from torch import nn

from uegr_dist.backward.masked_adamw import MaskedAdamW
from uegr_dist.backward.masking import GradientMasker, MaskOptions, MaskStats, covered_parameters

NamedParameters = Iterable[tuple[str, nn.Parameter]]


class Masker(Protocol):
    """What the optimizer needs of a gradient masker (`GradientMasker`, or `ZeroGradientMasker` inside a ZeRO step)."""

    last_stats: MaskStats | None

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class MaskingBackend(Protocol):
    """Where the mask runs (uegr_dist.engine.backend.Backend): in `step()` itself, or inside the ZeRO step."""

    steps_in_backward: bool

    def masker(
        self, named_params: list[tuple[str, nn.Parameter]], options: MaskOptions, max_grad_norm: float
    ) -> Masker: ...


def decay_groups(named_params: NamedParameters, weight_decay: float) -> list[dict[str, Any]]:
    """Two parameter groups of (name, parameter) pairs: weight decay for matrices, none for biases and LayerNorm
    weights (the usual fine-tuning rule, as transformers' Trainer); frozen parameters are left out."""
    decay, no_decay = [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        # ZeRO-3 may partition parameters as the model is built (transformers' zero.Init): ds_shape is the real shape.
        ndim = len(getattr(param, "ds_shape", param.shape))
        (no_decay if ndim < 2 or "LayerNorm" in name or "layernorm" in name else decay).append((name, param))
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class SelectiveAdamW(MaskedAdamW):
    """AdamW whose `step()` is UEGR's backward stage: score the reduced gradient, keep the selected coordinates
    (`mask`), clip the masked gradient to `max_grad_norm`, then update (dropped coordinates keep their value and Adam
    moments when `mask.freeze_masked`). Without a mask: clip, then a plain AdamW step.

    params: (name, parameter) pairs (e.g. `model.named_parameters()`, frozen ones are skipped) or parameter-group
    dicts whose "params" are such pairs (`decay_groups` builds the usual two); the names key the mask's include /
    exclude / scope rules, and the order of the pairs is the canonical order of the mask's coordinates (ties and
    keyed random draws follow it), so keep it the same across runs that must agree.

    Where the work runs depends on the backend, chosen once by `attach` (`uegr_dist.prepare` attaches):
    one process or DDP: all of it in `step()`, on gradients already averaged over processes (without `attach` the
    optimizer masks that way by itself; under DDP the processes split the scoring and selection, `SplitMasking`).
    A step gate (`set_step_gate`, MaskedAdamW) also reaches the mask: a gated step is neither checked for non-finite
    scores nor read back, so with a gate and a hard mask a step reads no tensor value on the host.
    DeepSpeed ZeRO-1/2/3: DeepSpeed calls `step()` per partition on its flat fp32
    partitions, inside `accelerator.backward`; the scoring, selection and clipping run at the ZeRO step's entry
    (`ZeroGradientMasker`, on this rank's partition of the averaged gradient) and `step()` only updates.
    """

    def __init__(
        self,
        params: NamedParameters | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        mask: MaskOptions | None = None,
        max_grad_norm: float = 0.0,
    ) -> None:
        entries = list(params)
        groups = [dict(g) for g in entries] if entries and isinstance(entries[0], dict) else [{"params": entries}]
        named: list[tuple[str, nn.Parameter]] = []
        for group in groups:
            pairs = [_named(entry) for entry in group["params"]]
            pairs = [(name, param) for name, param in pairs if param.requires_grad]
            group["params"] = [param for _, param in pairs]
            named.extend(pairs)
        if not named:
            raise ValueError("SelectiveAdamW: no trainable parameter given")
        if not max_grad_norm >= 0.0:
            raise ValueError(f"max_grad_norm must be >= 0, got {max_grad_norm}")
        if mask is not None:
            covered_parameters(named, mask)  # a mask that covers nothing fails here, before any training
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.named_parameters = named
        """Trainable (name, parameter) pairs in canonical order, as given (before DeepSpeed replaces them)."""
        self.mask = mask
        self.max_grad_norm = float(max_grad_norm)
        self.masker: Any = None
        self.backend: MaskingBackend | None = None
        self.zero = False
        self._before_update: list[Callable[[], None]] = []
        self._known = {id(param) for _, param in named}

    @property
    def masks_gradients(self) -> bool:
        """Whether `step()` masks coordinates (DeepSpeed must then not clip: the mask comes first)."""
        return self.mask is not None

    def attach(self, backend: MaskingBackend) -> None:
        """Bind to the run's backend after `accelerator.prepare`: build the masker where the step runs (a
        `ZeroGradientMasker` hooked into the ZeRO step under DeepSpeed, which then also clips)."""
        self.backend = backend
        self.zero = backend.steps_in_backward
        if self.mask is not None:
            self.masker = backend.masker(self.named_parameters, self.mask, self.max_grad_norm)

    def before_update(self, callback: Callable[[], None]) -> None:
        """Run `callback` at the start of every `step()` (one process / DDP), before masking and clipping."""
        self._before_update.append(callback)

    def undo_last_step(self) -> None:
        """Take back the bookkeeping of the last `step()` after its step gate turned out False (the non-finite
        guard's device-side skip): the step counts and the masker's step index. Nothing else moved."""
        self.undo_step_counts()
        if self.masker is not None and not self.zero and hasattr(self.masker, "step"):
            self.masker.step -= 1

    @property
    def last_mask_stats(self) -> MaskStats | None:
        """What the last step's mask kept (None before the first masked step or without a mask)."""
        return None if self.masker is None else self.masker.last_stats

    def mask_state_dict(self) -> dict[str, Any] | None:
        """The masker's state (step count, saliency EMA); None without a mask. Per process under ZeRO."""
        return None if self.masker is None else self.masker.state_dict()

    def load_mask_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore `mask_state_dict()` (same parameters; under ZeRO the same sharding)."""
        if state is not None and self.mask is not None:
            if self.masker is None:
                self.masker = GradientMasker(self.named_parameters, self.mask)
            self.masker.load_state_dict(state)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Mask -> clip -> update (see the class docstring); under ZeRO only the update (the rest ran before)."""
        if self.zero:
            return super().step(closure)
        if not all(id(p) in self._known for group in self.param_groups for p in group["params"]):
            raise RuntimeError(
                "SelectiveAdamW is stepping parameters it was not built with (DeepSpeed ZeRO's flat partitions): "
                "prepare it with uegr_dist.prepare(accelerator, model, optimizer, ...) instead of "
                "accelerator.prepare, so the mask and the clipping run inside the ZeRO step"
            )
        for callback in self._before_update:
            callback()
        gate = self._gate  # MaskedAdamW.step consumes it
        if self.mask is not None:
            if self.masker is None:
                self.masker = GradientMasker(self.named_parameters, self.mask)
            # A gated step may hold non-finite gradients (then nothing is updated): no check, no host read.
            self.masker.apply_(gate=gate, validate=gate is None)
            if self.mask.freeze_masked:
                self.set_update_masks(_as_update_masks(self.masker))
        if self.max_grad_norm > 0:
            grads = [p for _, p in self.named_parameters if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
        return super().step(closure)


def _as_update_masks(masker: Any) -> dict[nn.Parameter, torch.Tensor]:
    """The masker's keep mask per parameter as MaskedAdamW takes it: its 0 / 1 factors in the parameter's dtype
    (no conversion), or bool."""
    factors = masker.update_factors() if hasattr(masker, "update_factors") else masker.update_masks()
    return {p: m if m.dtype in (torch.bool, p.dtype) else m.bool() for p, m in factors.items()}


def _named(entry: Any) -> tuple[str, nn.Parameter]:
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str):
        return entry
    raise TypeError(
        "SelectiveAdamW takes (name, parameter) pairs, e.g. model.named_parameters() (the names key the mask's "
        f"rules and order), got {type(entry).__name__}"
    )
