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


def test_run_reaped_kills_what_a_timed_out_command_started():
    """The test launcher's timeout also ends processes the command started in sessions of their own (as torch's
    elastic agent starts the ranks), not only the command itself."""
    import subprocess
    import sys
    import time

    import psutil

    from tests.conftest import run_reaped

    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True,\n"
        "                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        run_reaped([sys.executable, "-c", script], timeout=3)
    assert time.monotonic() - start < 30
    child = int(caught.value.output.split()[0])
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"process {child} still runs"
        time.sleep(0.1)
