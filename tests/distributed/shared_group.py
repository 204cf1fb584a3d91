"""One process group shared by several runs of one launch (the launch scripts in this folder).

`train()` and the example end with `accelerator.end_training()`, which destroys the process group that accelerate's
state (a singleton) will not create again: `keep()` makes that a no-op, so the runs of one launch share the group,
and `close()` destroys it at the end, on every process together. Left to interpreter exit, the group's gloo
threads can outlive it: a process then aborts ("terminate called without an active exception") after every run
has finished and saved.
"""

from __future__ import annotations

import torch.distributed as dist
from accelerate.state import PartialState


def keep() -> None:
    PartialState.destroy_process_group = lambda self, group=None: None  # type: ignore[method-assign]


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
