"""Saving the trained model at full precision, whatever backend trained it.

Under DeepSpeed with bf16 (or fp16) the module holds 16-bit copies of the weights; the weights the optimizer
updates are the fp32 master copies, partitioned over the ranks (ZeRO-1/2/3). `accelerator.get_state_dict` returns the
16-bit copies, so a model saved from it has every weight rounded to bf16 (8 bits of mantissa): a fine-tuning update
smaller than a weight's bf16 spacing is lost at save time, and the same run under DDP (autocast, fp32 weights) would
save different numbers. `full_precision_state_dict` saves the fp32 master weights instead: what the next step would
have started from, and what a resumed run continues from.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from uegr_dist.deepspeed_internals import is_deepspeed_engine

logger = logging.getLogger(__name__)


def fp32_master_weights(engine: Any) -> dict[str, torch.Tensor] | None:
    """Full fp32 master copy of every trainable parameter of a DeepSpeed engine, by parameter name.

    Collective: every rank of the engine's data-parallel group must call it (one all-reduce or all-gather per
    parameter); every rank gets the full tensors, on the CPU. None when the engine keeps no separate fp32 copy
    (fp32 training: the module's parameters are the master weights).
    """
    from deepspeed.utils import safe_get_full_fp32_param

    if not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        return None
    weights: dict[str, torch.Tensor] = {}
    by_param: dict[int, torch.Tensor] = {}
    missing = []
    # Every name of a tied parameter gets the same tensor; each parameter is gathered once, in module order (the
    # same on every rank, as the collectives need).
    for name, param in engine.module.named_parameters(remove_duplicate=False):
        if not param.requires_grad:
            continue
        if id(param) not in by_param:
            full = safe_get_full_fp32_param(param)
            if full is None:
                missing.append(name)
                continue
            by_param[id(param)] = full.detach().to("cpu", torch.float32).clone()
        weights[name] = by_param[id(param)]
    if missing:
        logger.warning(
            "%s keeps no fp32 master copy of %d trainable parameters (%s...): they are saved from their 16-bit copies",
            type(engine.optimizer).__name__,
            len(missing),
            ", ".join(missing[:3]),
        )
    return weights


def full_precision_state_dict(accelerator: Any, model: Any) -> dict[str, torch.Tensor]:
    """The model's state dict for saving, every floating-point tensor in float32.

    Without DeepSpeed this is `accelerator.get_state_dict` (autocast keeps fp32 weights). Under DeepSpeed bf16/fp16 the
    trainable parameters come from the fp32 master weights (`fp32_master_weights`), the rest (buffers, frozen
    parameters) from the 16-bit state dict, cast up. Collective under DeepSpeed: call it on every rank; under ZeRO-3
    only the main process gets a non-empty dict (as with `get_state_dict`).
    """
    state = accelerator.get_state_dict(model)
    if not is_deepspeed_engine(model):
        return state
    master = fp32_master_weights(model)
    if master is None or not state:
        return state
    out = {}
    for key, tensor in state.items():
        if key in master:
            if tuple(master[key].shape) != tuple(tensor.shape):
                raise RuntimeError(
                    f"fp32 master weight {key} has shape {tuple(master[key].shape)}, the model {tuple(tensor.shape)}"
                )
            out[key] = master[key]
        else:
            out[key] = tensor.float() if tensor.is_floating_point() else tensor
    unused = sorted(set(master) - set(state))
    if unused:
        raise RuntimeError(f"fp32 master weights with no entry in the model's state dict: {', '.join(unused[:5])}")
    return out


def save_model(accelerator: Any, model: Any, out: Any, tokenizer: Any = None) -> None:
    """`save_pretrained` of the unwrapped model with `full_precision_state_dict`, config dtype float32."""
    state = full_precision_state_dict(accelerator, model)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(
        out, is_main_process=accelerator.is_main_process, save_function=accelerator.save, state_dict=state
    )
    if accelerator.is_main_process:
        if unwrapped.config.dtype != torch.float32 and str(unwrapped.config.dtype) != "float32":
            # save_pretrained wrote the module's dtype (16-bit under DeepSpeed bf16/fp16); from_pretrained would load
            # the fp32 weights back in it. The config names the dtype the weights were saved in.
            unwrapped.config.dtype = torch.float32
            unwrapped.config.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
