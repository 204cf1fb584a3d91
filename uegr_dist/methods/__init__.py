"""Fine-tuning methods: each an objective + gradient transform plugged into the same training loop."""

from uegr_dist.config import MethodConfig
from uegr_dist.methods.asa import ASA
from uegr_dist.methods.base import Method, MethodContext, StepOutput, model_inputs, task_loss
from uegr_dist.methods.childtuning_d import ChildTuningD
from uegr_dist.methods.childtuning_f import ChildTuningF
from uegr_dist.methods.freelb import FreeLB
from uegr_dist.methods.hype import HyPe
from uegr_dist.methods.mat import MAT
from uegr_dist.methods.rdrop import RDrop
from uegr_dist.methods.roast import RoAST
from uegr_dist.methods.sam import SAM
from uegr_dist.methods.smart import SMART
from uegr_dist.methods.uegr import UEGR
from uegr_dist.methods.vanilla import Vanilla

METHODS: dict[str, type[Method]] = {
    "vanilla": Vanilla,
    "uegr": UEGR,
    "rdrop": RDrop,
    "freelb": FreeLB,
    "smart": SMART,
    "hype": HyPe,
    "asa": ASA,
    "childtuning_d": ChildTuningD,
    "childtuning_f": ChildTuningF,
    "roast": RoAST,
    "sam": SAM,
    "mat": MAT,
}


def build_method(cfg: MethodConfig) -> Method:
    """The method object named by `cfg.name` (every method but vanilla reads its options from `cfg`)."""
    if cfg.name == "vanilla":
        return Vanilla()
    return METHODS[cfg.name](cfg)  # type: ignore[call-arg]


__all__ = [
    "ASA",
    "FreeLB",
    "HyPe",
    "METHODS",
    "ChildTuningD",
    "ChildTuningF",
    "MAT",
    "Method",
    "MethodContext",
    "RDrop",
    "SMART",
    "RoAST",
    "SAM",
    "StepOutput",
    "UEGR",
    "Vanilla",
    "build_method",
    "model_inputs",
    "task_loss",
]
