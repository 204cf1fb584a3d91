"""Train several runs one after the other in one (possibly launched) process:
`python gradient_methods_run.py CONFIG...`.

One `accelerate launch` of this script covers several methods (the launch, not the training, is the slow part).
Every run saves its model through `train()` (gathered state dict), which the tests compare with one-process runs.
"""

from __future__ import annotations

import sys

from accelerate.state import PartialState

from uegr_dist.config import load_config
from uegr_dist.engine.train_loop import train

if __name__ == "__main__":
    # train() ends with accelerator.end_training(), which destroys the process group; the runs of one launch share it.
    PartialState.destroy_process_group = lambda self, group=None: None  # type: ignore[method-assign]
    for path in sys.argv[1:]:
        train(load_config(path))
