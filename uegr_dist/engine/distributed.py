"""The one place that picks the process-group backend and builds the Accelerator.

GPU: NCCL. CPU: gloo, with DeepSpeed's CPU accelerator (docs/design.md §3): without `backend="gloo"` accelerate
reports one process while DeepSpeed runs several, and every rank then sees all the data — so start-up checks the world
size.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from uegr_dist.config import Config


class DistributedSetupError(RuntimeError):
    """The launched processes and the Accelerator disagree (world size, backend)."""


def process_group_backend() -> str:
    """nccl when CUDA is usable, else gloo."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def build_accelerator(cfg: Config) -> Accelerator:
    """Accelerator for this run, with the right backend and a bounded collective timeout; checks the world size."""
    backend = process_group_backend()
    # DeepSpeed always needs a process group, even for one process.
    distributed = launched_processes() > 1 or deepspeed_requested()
    if backend == "gloo":
        # Read by DeepSpeed when it first picks its accelerator; harmless when DeepSpeed is not used.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    accelerator = Accelerator(
        # accelerate makes CPU processes data-parallel (MULTI_CPU) only with cpu=True, but cpu=True silently turns
        # DeepSpeed off: so ask for it exactly when several CPU processes run without DeepSpeed.
        cpu=backend == "gloo" and not deepspeed_requested() and distributed,
        gradient_accumulation_steps=cfg.train.grad_accum,
        mixed_precision=cfg.train.mixed_precision,
        log_with=None if cfg.train.tracker == "none" else cfg.train.tracker,
        project_dir=cfg.train.output_dir,
        # A single process gets no process group (accelerate would ask an uninitialised group for its size).
        kwargs_handlers=[
            InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=cfg.train.collective_timeout))
        ]
        if distributed
        else [],
    )
    check_world_size(accelerator)
    return accelerator


def launched_processes() -> int:
    """How many processes the launcher started (WORLD_SIZE; 1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_requested() -> bool:
    """True when `accelerate launch` was told to use DeepSpeed (config file or --use_deepspeed)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_world_size(accelerator: Accelerator) -> None:
    """Fail if the launcher started more processes than the Accelerator shards data over (each would train on all
    the data and the replicas would silently diverge)."""
    launched = launched_processes()
    sharded = accelerator.num_processes if accelerator.distributed_type != DistributedType.NO else 1
    if sharded != launched:
        raise DistributedSetupError(
            f"the launcher started {launched} processes (WORLD_SIZE) but the Accelerator sees "
            f"{sharded} data-parallel process(es) ({accelerator.distributed_type}): every process would train on "
            "all the data. On CPU use the gloo backend and do not pass --cpu with DeepSpeed "
            "(see configs/accelerate/cpu-2proc-*.yaml)."
        )
