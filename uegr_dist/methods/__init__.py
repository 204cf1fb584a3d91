"""Fine-tuning methods: each an objective (forward stage) and a gradient mask (backward stage) on the same engine."""

import importlib

from uegr_dist.config import MethodConfig
from uegr_dist.config.registry import METHOD_CLASSES
from uegr_dist.methods.base import Method, MethodContext, StepOutput, TrainingData, model_inputs, task_loss


def method_class(name: str) -> type[Method]:
    """The class registered for method `name` (uegr_dist/config/registry.py)."""
    module, _, cls = METHOD_CLASSES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_method(cfg: MethodConfig) -> Method:
    """The method object named by `cfg.name` (every method but vanilla reads its options from `cfg`)."""
    if cfg.name == "vanilla":
        return method_class("vanilla")()
    return method_class(cfg.name)(cfg)  # type: ignore[call-arg]


__all__ = [
    "Method",
    "MethodContext",
    "StepOutput",
    "TrainingData",
    "build_method",
    "method_class",
    "model_inputs",
    "task_loss",
]
