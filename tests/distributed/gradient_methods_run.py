"""Train several runs one after the other in one (possibly launched) process:
`python gradient_methods_run.py CONFIG...`.

One `accelerate launch` of this script covers several methods (the launch, not the training, is the slow part).
Every run saves its model through `train()` (gathered state dict), which the tests compare with one-process runs.
Runs may differ in `train.mixed_precision` (fp32 and bf16 runs share one launch); each run's output folder gets
`precision.json`, the precision accelerate actually used (DeepSpeed: its config's bf16 / fp16 switch).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState

from uegr_dist.config import load_config
from uegr_dist.engine.train_loop import train

if __name__ == "__main__":
    # train() ends with accelerator.end_training(), which destroys the process group; the runs of one launch share it.
    PartialState.destroy_process_group = lambda self, group=None: None  # type: ignore[method-assign]
    for path in sys.argv[1:]:
        # accelerate keeps one process-wide state whose precision cannot change: each run builds its own (the
        # process group, held by PartialState, stays).
        AcceleratorState._reset_state(reset_partial_state=False)
        cfg = load_config(path)
        train(cfg)
        if PartialState().is_main_process:
            used = {"mixed_precision": AcceleratorState().mixed_precision}
            (Path(cfg.train.output_dir) / "precision.json").write_text(json.dumps(used), encoding="utf-8")
