"""Start-up checks of the process-group set-up (no processes launched here)."""

from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from uegr_dist.engine.distributed import DistributedSetupError, check_world_size, process_group_backend


def test_cpu_machine_uses_gloo():
    assert process_group_backend() == "gloo"


def test_launched_processes_must_all_shard_the_data(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    # What accelerate reports when CPU processes are launched without cpu=True: two processes, no data parallelism.
    unsharded = SimpleNamespace(num_processes=2, distributed_type=DistributedType.NO)
    with pytest.raises(DistributedSetupError, match="launcher started 2 processes .* 1 data-parallel process"):
        check_world_size(unsharded)
    check_world_size(SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU))
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_world_size(SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO))
