"""Saving under DeepSpeed bf16: the saved model holds the fp32 master weights, not their bf16 copies.

tests/distributed/export_run.py trains a tiny BERT for 3 steps on 2 processes under DeepSpeed bf16 and checks the
exported state against the optimizer there (master partitions gathered the obvious way; the module's bf16 weights are
those weights rounded). Here: the checks passed, the weights are not bf16 numbers, and `from_pretrained` loads back
exactly the exported fp32 tensors with a float32 config.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from tests.test_zero_masking import REPO, STAGES, launch

# ZeRO-1 shares ZeRO-2's optimizer code (DeepSpeedZeroOptimizer); it runs with UEGR_ALL_ZERO_STAGES=1.
EXPORT_STAGES = ["zero2", "zero3"] + (["zero1"] if os.environ.get("UEGR_ALL_ZERO_STAGES") == "1" else [])


@pytest.mark.distributed
@pytest.mark.parametrize("stage", EXPORT_STAGES)
def test_deepspeed_bf16_saves_fp32_master_weights(stage, tmp_path):
    done = launch(STAGES[stage], [str(REPO / "tests/distributed/export_run.py"), str(tmp_path)], timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["stage"] == int(stage[-1]) and report["world_size"] == 2
    assert report["module_dtype"] == "torch.bfloat16"  # DeepSpeed's bf16: the module itself is 16-bit
    assert report["dtypes"] == ["torch.float32"]
    if stage != "zero3":
        assert report["master_checked"] > 0 and report["master_mismatches"] == [], report
    assert report["rounding_mismatches"] == [], report
    # The saved weights carry the fp32 master's extra bits (an upcast bf16 copy would give 0).
    print(f"{stage}: fraction of saved weights that are not bf16 numbers {report['not_bf16_fraction']:.3f}")
    assert report["not_bf16_fraction"] > 0.5, report

    state = torch.load(tmp_path / "state.pt")
    assert str(AutoConfig.from_pretrained(tmp_path / "model").dtype).endswith("float32")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert next(reloaded.parameters()).dtype == torch.float32
    reloaded_state = reloaded.state_dict()
    assert set(state) <= set(reloaded_state)
    for name, tensor in state.items():
        assert torch.equal(reloaded_state[name], tensor), name
