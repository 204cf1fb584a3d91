"""The one list of method names: each name a config may give, and the class that implements it (imported only when
a run builds it, so that reading and checking a config stays fast)."""

from __future__ import annotations

METHOD_CLASSES: dict[str, str] = {
    "uegr": "uegr_dist.methods.uegr:UEGR",
    "vanilla": "uegr_dist.methods.vanilla:Vanilla",
    "rdrop": "uegr_dist.methods.rdrop:RDrop",
    "freelb": "uegr_dist.methods.freelb:FreeLB",
    "smart": "uegr_dist.methods.smart:SMART",
    "hype": "uegr_dist.methods.hype:HyPe",
    "asa": "uegr_dist.methods.asa:ASA",
    "childtuning_d": "uegr_dist.methods.childtuning_d:ChildTuningD",
    "childtuning_f": "uegr_dist.methods.childtuning_f:ChildTuningF",
    "roast": "uegr_dist.methods.roast:RoAST",
    "sam": "uegr_dist.methods.sam:SAM",
    "mat": "uegr_dist.methods.mat:MAT",
    "delta_sam": "uegr_dist.methods.delta_sam:DeltaSAM",
    "fisher_sam": "uegr_dist.methods.fisher_sam:FisherSAM",
    "awp": "uegr_dist.methods.awp:AWP",
}
"""Method name -> "module:Class"."""

METHOD_NAMES = tuple(METHOD_CLASSES)
