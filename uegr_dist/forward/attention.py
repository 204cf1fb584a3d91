"""The one place that routes a model's attention through our own attention functions (per-chunk dropout, ASA).

transformers v5 looks the attention function up by the name in `config._attn_implementation`: registering a function
under a new name and pointing the model's configs at it changes how attention is computed without touching the
model's code. `route_attention` does both for every supported implementation and returns a handle that puts the
original implementation back; `original_attention` is what transformers would have called.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

SUPPORTED_ATTENTION = ("eager", "sdpa")

AttentionFunction = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def model_configs(model: nn.Module) -> list[PreTrainedConfig]:
    """Every distinct transformers config reachable from the model's modules, sub-configs included."""
    found: dict[int, PreTrainedConfig] = {}

    def visit(config: PreTrainedConfig) -> None:
        if id(config) in found:
            return
        found[id(config)] = config
        for sub_key in config.sub_configs:
            sub_config = getattr(config, sub_key, None)
            if isinstance(sub_config, PreTrainedConfig):
                visit(sub_config)

    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PreTrainedConfig):
            visit(config)
    return list(found.values())


def check_attention(model: nn.Module, who: str) -> None:
    """Fail, naming `who`, when a config of the model uses an attention implementation other than eager / sdpa."""
    for config in model_configs(model):
        implementation = config._attn_implementation
        if implementation is not None and implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"{who}: attn_implementation {implementation!r} is not supported; allowed: {SUPPORTED_ATTENTION}"
            )


def original_attention(module: nn.Module, implementation: str) -> AttentionFunction:
    """The function transformers would call for `implementation` on this attention module."""
    if implementation == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    # "eager" is not in the registry: each model file passes its own `eager_attention_forward` as the default.
    model_file = sys.modules.get(type(module).__module__)
    return getattr(model_file, "eager_attention_forward", eager_attention)


class AttentionRoute:
    """Handle of `route_attention`: `remove()` puts every config's original implementation back (idempotent)."""

    def __init__(self, configs: list[tuple[PreTrainedConfig, str]]) -> None:
        self._configs = configs

    def remove(self) -> None:
        for config, implementation in self._configs:
            config._attn_implementation_internal = implementation
        self._configs = []


def route_attention(model: nn.Module, prefix: str, make: Callable[[str], AttentionFunction]) -> AttentionRoute:
    """Register `make(implementation)` as attention function `prefix + implementation` (with transformers' mask
    builder for that implementation) for each supported implementation, and switch every config of `model` to it.
    The caller checks the implementations first (`check_attention`)."""
    for implementation in SUPPORTED_ATTENTION:
        name = prefix + implementation
        AttentionInterface.register(name, make(implementation))
        # Without a registered mask builder transformers passes no attention mask at all (padding ignored).
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
    switched = []
    for config in model_configs(model):
        implementation = config._attn_implementation
        if implementation is not None:
            switched.append((config, implementation))
            # The internal attribute: the public setter would also overwrite sub-configs with this config's value.
            config._attn_implementation_internal = prefix + implementation
    return AttentionRoute(switched)


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    drop: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention (softmax(q k^T * scaling + mask) v) with `drop` (default: F.dropout) on the probabilities.

    q, k, v [B, H, S, d]; mask: boolean (True = attend) or additive [B, 1, S, S], or None -> ([B, S, H, d], probs).
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1)
    probs = drop(probs) if drop is not None else F.dropout(probs, dropout, module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs
