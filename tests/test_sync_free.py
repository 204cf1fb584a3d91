"""A training step reads no value into Python: counted during the steps of real `train()` runs.

On a CPU nothing can synchronize, so `benchmarks.sync_check` counts what would on a GPU (its docstring lists it):
tensor values read into Python (`.item()`, `bool()`, `int()`, `float()`, `.tolist()`, `.numpy()`, `torch.equal`),
host data sent to an explicit device, and, with the masker's GPU path forced on, operations whose output size
depends on values. Reads of host data by construction go through `uegr_dist.backward.host` and are not counted.
transformers' SDPA mask builder reads whether anything is padded in every forward (in the plain Accelerate loop too):
that read is reported apart and must be the only one. A control run with the guard's old host decision shows the
counter sees reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.sync_check import TRANSFORMERS_MASK_CHECK, count_reads
from tests.conftest import tiny_run_overrides
from uegr_dist.config import load_config

VARIANTS = {
    "vanilla": ({"name": "vanilla"}, {}, False),
    "uegr": ({"name": "uegr"}, {}, False),
    # keyed randomness, the adaptive controller, two micro-batches per step and the masker's GPU path
    "uegr-keyed-adaptive-accum-fixed": (
        {"name": "uegr", "rng": "keyed", "dropout": {"schedule": "adaptive"}, "mask": {"scope": "per_layer"}},
        {"grad_accum": 2},
        True,
    ),
    # the flat-minima family: two forwards per step (at w and at the perturbed weights)
    "sam": ({"name": "sam"}, {}, False),
    "delta_sam": ({"name": "delta_sam"}, {}, False),
    "fisher_sam": ({"name": "fisher_sam"}, {}, False),
    "awp": ({"name": "awp"}, {}, False),
}


def config(easy_task: dict[str, Path], dest: Path, method: dict, train: dict):
    cfg = tiny_run_overrides("bert", easy_task, dest)
    cfg["data"].update({"max_train_samples": 64, "max_eval_samples": 8})
    cfg["train"].update({"max_steps": 5, "log_every": 1000, "save_every": 0, "eval_every_epoch": False, **train})
    cfg["method"].update(method)
    return load_config(None, cfg)


def describe(events) -> str:
    return "\n".join(f"step {e.step}: {e.kind}\n{e.stack}" for e in events[:3])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_value_is_read_during_a_step(variant, easy_task, tmp_path, one_thread) -> None:
    method, train, fixed_shapes = VARIANTS[variant]
    events = count_reads(config(easy_task, tmp_path / "run", method, train), fixed_shapes=fixed_shapes)
    ours = [e for e in events if not e.in_transformers]
    assert ours == [], describe(ours)
    # transformers' own read: once per model forward (UEGR: the adversary's and the stacked one), nothing else.
    assert all(TRANSFORMERS_MASK_CHECK in e.stack and "_local_scalar_dense" in e.kind for e in events)
    forwards = (1 if method["name"] == "vanilla" else 2) * train.get("grad_accum", 1)
    assert len(events) == 5 * forwards


def test_the_counter_sees_a_synchronizing_guard(easy_task, tmp_path, one_thread, monkeypatch) -> None:
    """Control: with the non-finite guard deciding on the host (as before), every step reads its decision."""
    from uegr_dist.engine.guard import NonFiniteGuard

    monkeypatch.setattr(NonFiniteGuard, "bind", lambda self, *args: None)
    events = count_reads(config(easy_task, tmp_path / "run", {"name": "vanilla"}, {}))
    ours = [e for e in events if not e.in_transformers]
    assert len(ours) == 5 and all("step_is_finite" in e.stack for e in ours)


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["vanilla", "uegr"])
def test_no_value_is_read_during_a_ddp_step(method, tmp_path) -> None:
    """Two DDP processes (gloo): the split masker's collectives, the guard's all-reduced decision and the
    preemption check (over a host group) read nothing on either process."""
    from tests.test_zero_masking import STAGES, launch

    done = launch(
        STAGES["ddp"],
        ["-m", "benchmarks.sync_check", "--methods", method, "--steps", "4", "--out-dir", str(tmp_path)],
        timeout=300,
    )
    records = sorted(tmp_path.glob("sync_check_*-rank*.json"))
    assert len(records) == 2, done.stderr[-3000:]
    for record in records:
        results = json.loads(record.read_text())["results"]
        for method, result in results.items():
            ours = [e for e in result["events"] if not e["in_transformers"]]
            assert ours == [], (record.name, method, ours[:2])
