"""Fine-tuning methods: each an objective + gradient transform plugged into the same training loop."""

from uegr_dist.config import MethodConfig
from uegr_dist.methods.base import Method, MethodContext, StepOutput, model_inputs, task_loss
from uegr_dist.methods.uegr import UEGR
from uegr_dist.methods.vanilla import Vanilla

METHODS: dict[str, type[Method]] = {"vanilla": Vanilla, "uegr": UEGR}


def build_method(cfg: MethodConfig) -> Method:
    """The method object named by `cfg.name`."""
    if cfg.name == "uegr":
        return UEGR(cfg)
    return METHODS[cfg.name]()


__all__ = [
    "METHODS",
    "Method",
    "MethodContext",
    "StepOutput",
    "UEGR",
    "Vanilla",
    "build_method",
    "model_inputs",
    "task_loss",
]
