"""HyPe: small random noise on the hidden states entering every transformer layer, during training only.

Yuan et al., "HyPe: Better Pre-trained Language Model Fine-tuning with Hidden Representation Perturbation",
ACL 2023 (arXiv 2212.08853).

Deviations: none in the perturbation (normal or uniform noise on every layer's input, training only); the paper's
combinations of HyPe with other regularizers are not built in, and under bf16 the noise is added in the hidden
states' dtype (see `HyPe`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from uegr_dist.config import ConfigError, MethodConfig
from uegr_dist.methods.base import Method, MethodContext, StepOutput, model_inputs, task_loss
from uegr_dist.methods.noise import normal_noise, uniform_noise
from uegr_dist.rng import mix_key


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a BERT / RoBERTa / DeBERTa-v2 style model (`<base>.encoder.layer`)."""
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ConfigError(
            f"method.name = hype: {type(model).__name__} has no `encoder.layer` list of transformer layers "
            "(supported: BERT, RoBERTa, DeBERTa-v2 and models laid out like them)"
        )
    return layers


class HyPe(Method):
    """L = task(f~(x), y) where layer l of f~ sees h_{l-1} + n_l, n_l ~ N(0, sigma^2) (HyPe-N, default) or
    U(-sigma, sigma) (HyPe-U), sigma = `method.hype.scale` (default 1e-5), for every layer l = 1..L (the first
    layer's input is the embedding output). The noise is added only inside the method's training forward: evaluation
    and the saved model are the plain network (the hooks are removed at teardown). Composes with dropout.
    Randomness: with `method.rng: keyed` n_l of sample i is keyed by (seed, micro-batch index, layer, sample id), so a
    2-process run equals the 1-process run (with dropout off or keyed); `fast` draws from torch's generator.
    The noise is added in the hidden states' dtype: under bf16 a scale far below the value's resolution (~1e-2
    relative) mostly rounds away; hidden states out of LayerNorm are float32 under autocast on CPU and GPU.
    """

    name = "hype"

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg
        self.options = cfg.hype
        self._draw: tuple[int, torch.Tensor | None] | None = None
        self._handles: list[Any] = []

    def setup(self, ctx: MethodContext) -> None:
        """A forward pre-hook on every transformer layer of the unwrapped model."""
        super().setup(ctx)
        for index, layer in enumerate(encoder_layers(ctx.base_model)):
            self._handles.append(layer.register_forward_pre_hook(self._hook(index), with_kwargs=True))

    def layer_noise(self, index: int, hidden: torch.Tensor, key: int, row_keys: torch.Tensor | None) -> torch.Tensor:
        """Noise [B, S, D] for layer `index` (float32): sigma * N(0, 1) or sigma * U(-1, 1)."""
        layer_key = mix_key(key, index)
        shape = tuple(hidden.shape)
        if self.options.noise == "normal":
            return self.options.scale * normal_noise(shape, row_keys, layer_key, hidden.device)
        return self.options.scale * (2.0 * uniform_noise(shape, row_keys, layer_key, hidden.device) - 1.0)

    def _hook(self, index: int):
        def add_noise(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self._draw is None or not module.training:
                return None
            key, row_keys = self._draw
            if args:
                hidden = args[0]
                noisy = hidden + self.layer_noise(index, hidden, key, row_keys).to(hidden.dtype)
                return (noisy, *args[1:]), kwargs
            hidden = kwargs["hidden_states"]
            noisy = hidden + self.layer_noise(index, hidden, key, row_keys).to(hidden.dtype)
            return args, {**kwargs, "hidden_states": noisy}

        return add_noise

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int, micro_step: int) -> StepOutput:
        """Task loss of one forward with noisy layer inputs."""
        row_keys = batch["sample_id"] if self.cfg.rng == "keyed" else None
        self._draw = (mix_key(self.ctx.seed, micro_step), row_keys)
        try:
            logits = model(**model_inputs(batch)).logits
        finally:
            self._draw = None
        loss = task_loss(logits, batch["labels"])
        return StepOutput(loss, logits.detach(), {"task_loss": loss.detach()})

    def teardown(self) -> None:
        """Remove the hooks: the model is the plain network again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
