"""Fine-tuning methods: each an objective + gradient transform plugged into the same training loop."""

from uegr_dist.config import MethodConfig
from uegr_dist.methods.base import Method, MethodContext, StepOutput, model_inputs, task_loss
from uegr_dist.methods.childtuning_d import ChildTuningD
from uegr_dist.methods.childtuning_f import ChildTuningF
from uegr_dist.methods.mat import MAT
from uegr_dist.methods.roast import RoAST
from uegr_dist.methods.sam import SAM
from uegr_dist.methods.uegr import UEGR
from uegr_dist.methods.vanilla import Vanilla

METHODS: dict[str, type[Method]] = {
    "vanilla": Vanilla,
    "uegr": UEGR,
    "childtuning_d": ChildTuningD,
    "childtuning_f": ChildTuningF,
    "roast": RoAST,
    "sam": SAM,
    "mat": MAT,
}
# Methods whose constructor takes the MethodConfig (the others take no argument).
_CONFIGURED = {"uegr", "childtuning_d", "childtuning_f", "roast", "sam", "mat"}


def build_method(cfg: MethodConfig) -> Method:
    """The method object named by `cfg.name`."""
    if cfg.name in _CONFIGURED:
        return METHODS[cfg.name](cfg)  # type: ignore[call-arg]
    return METHODS[cfg.name]()


__all__ = [
    "METHODS",
    "ChildTuningD",
    "ChildTuningF",
    "MAT",
    "Method",
    "MethodContext",
    "RoAST",
    "SAM",
    "StepOutput",
    "UEGR",
    "Vanilla",
    "build_method",
    "model_inputs",
    "task_loss",
]
