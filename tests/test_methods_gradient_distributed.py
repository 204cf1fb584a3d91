"""ChildTuning-D, ChildTuning-F, RoAST, SAM (with ASAM and mSAM), MAT, Delta-SAM, Fisher SAM, AWP (alone and around
UEGR's and FreeLB's objectives) and weight averaging (SWA, EMA) on 2 CPU processes (DDP, DeepSpeed ZeRO-1/2;
ChildTuning-F also ZeRO-3 with UEGR_ALL_ZERO_STAGES=1) equal the 1-process run with the same global batch: every
method here is deterministic given the data (dropout off, keyed masks and keyed draws, Fisher pre-pass split across
ranks and summed, Delta-SAM's weights normalised over the global batch). One `accelerate launch` trains all runs of a
stage, fp32 and bf16 (`train.mixed_precision: bf16`, DDP and ZeRO-1/2 (mSAM: DDP only; the flatness family: AWP and
SWA, DDP and ZeRO-2): finite, and close to the 1-process bf16 run within BF16_TOLERANCE, not equal). MAT and SWA under
ZeRO-2 are also cut and resumed. (The ZeRO-3 start-up refusals are unit tests in test_methods_gradient.py and
test_averaging.py.)"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from tests.conftest import TINY_MODELS
from tests.test_zero_masking import REPO, launch, reloaded_state, write_fixed_length_task
from uegr_dist.config import load_config
from uegr_dist.config.loading import merge
from uegr_dist.engine.setup import load_task
from uegr_dist.engine.train_loop import train
from uegr_dist.modeling import load_model

HELPER = REPO / "tests" / "distributed" / "methods_run.py"
STEPS, PER_RANK_BATCH = 5, 4  # 32 rows: 4 steps per epoch, so RoAST refreshes its keep probabilities once
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
METHODS = {
    "childtuning_d": {"childtuning": {"fisher_batch_size": 4, "reserve_p": 0.3}},
    "childtuning_f": {"childtuning": {"p_f": 0.5}},
    "roast": {"roast": {"alpha": 0.5, "beta": 5.0, "scale": True}},
    "sam": {"sam": {"rho": 0.05}},
}
# The flatness family (runs named after the method, or the method and its objective). Delta-SAM's small temperature
# makes its weights differ across the batch (a softmax normalised per process would then differ from 1 process);
# Fisher SAM's eta makes 1 + eta g^2 differ from 1 at this model's gradient sizes.
FLAT = {
    "delta_sam": {"name": "delta_sam", "delta_sam": {"rho": 0.05, "temperature": 0.05}},
    "fisher_sam": {"name": "fisher_sam", "fisher_sam": {"rho": 0.05, "eta": 1e4}},
    "awp": {"name": "awp", "awp": {"gamma": 0.01}},
    # With an input adversary: keyed draws (UEGR's sub-model dropout and start, FreeLB's start), so 2 = 1 process.
    "awp_uegr": {
        "name": "awp",
        "rng": "keyed",
        "awp": {"objective": "uegr", "gamma": 0.01},
        "adversary": {"eps": 0.01, "step_size": 0.01},
        "dropout": {"k": 1},
    },
    "awp_freelb": {
        "name": "awp",
        "rng": "keyed",
        "awp": {"objective": "freelb", "gamma": 0.01},
        "freelb": {"steps": 2, "init_mag": 0.003, "adv_lr": 0.003},
    },
}
# Weight averaging (train.average) around vanilla fine-tuning: SWA with its cyclic learning rate (averaging points 3
# and 5, the run cut at 3 in the resume test) and an EMA; evaluated after each epoch (the average swapped in and the
# raw weights put back mid-run), the raw weights saved too (raw/) and compared as well.
AVERAGE = {
    "swa": {"kind": "swa", "start": 1, "every": 2, "lr_schedule": "cyclic", "swa_lr": 2e-3, "keep_raw": True},
    "ema": {"kind": "ema", "start": 2, "ema_decay": 0.5, "keep_raw": True},
}


BF16 = "-bf16"  # run-name suffix: the same method with train.mixed_precision bf16


def run_config(root: Path, output_dir: Path, batch_size: int, method: dict, bf16: bool = False) -> dict:
    """STEPS steps of `method` from the saved tiny model root/init on the fixed-length task, into output_dir."""
    return {
        "model": {"name_or_path": str(root / "init")},
        "data": {
            "train_file": str(root / "train.jsonl"),
            "validation_file": str(root / "val.jsonl"),
            "max_length": 16,
            "padding": "max_length",
        },
        "train": {
            "output_dir": str(output_dir),
            "max_steps": STEPS,
            "batch_size": batch_size,
            "lr": 3e-3,
            "warmup_ratio": 0.0,
            "log_every": 1,
            "mixed_precision": "bf16" if bf16 else "no",
            "tracker": "none",
            "progress": False,
            "eval_every_epoch": False,
            "seed": 0,
        },
        "method": method,
    }


def run_overrides(run: str, processes: int) -> dict:
    """A run's own settings on top of `run_config`: its method (mSAM's shards for `processes`), precision (bf16
    when the run's name ends in BF16) and weight averaging (the AVERAGE runs)."""
    train: dict = {"mixed_precision": "bf16" if run.endswith(BF16) else "no"}
    if run.removesuffix(BF16) in AVERAGE:
        train.update({"average": AVERAGE[run.removesuffix(BF16)], "eval_every_epoch": True})
    return {"method": method_config(run, shards(run, processes)), "train": train}


def write_spec(root: Path, dest: Path, runs: list[str], processes: int) -> Path:
    """dest/spec.json for tests/distributed/methods_run.py: `runs` one after the other, each into dest/<run>, the
    global batch 2 * PER_RANK_BATCH split over `processes`."""
    base = run_config(root, dest, 2 * PER_RANK_BATCH // processes, {"name": "vanilla"})
    path = dest / "spec.json"
    path.write_text(json.dumps({"base": base, "runs": {run: run_overrides(run, processes) for run in runs}}))
    return path


def method_config(run: str, m_shards: int = 1) -> dict:
    run = run.removesuffix(BF16)
    if run in FLAT:
        return FLAT[run]
    if run in AVERAGE:
        return {"name": "vanilla"}
    name = "sam" if run in ("sam", "msam", "asam") else run
    method = {"name": name, **METHODS.get(run, {})}
    if run == "asam":
        method["sam"] = {"rho": 0.5, "adaptive": True}  # ASAM's larger radius (its perturbation is scaled by |w|)
    if run == "mat":
        # Keyed delta draws: 2 processes reproduce 1 (with Langevin noise on delta and theta, so the keyed and the
        # seeded streams are both exercised).
        method["rng"] = "keyed"
        method["mat"] = {
            "eta_theta": 0.05,
            "sigma_theta": 1e-3,
            "eta_delta": 0.5,
            "sigma_delta": 1e-3,
            "init_std": 1e-2,
        }
    if m_shards > 1:
        method["sam"] = {"rho": 0.05, "m_shards": m_shards}
    return method


# bf16 runs: every gradient method under DDP and ZeRO-1/2 (DeepSpeed bf16: bf16 model, fp32 master partition), except
# mSAM under ZeRO: its eps comes from each 2-row shard's own gradient, which DeepSpeed's pure bf16 (bf16 weights and
# gradients) moves so far that this comparison cannot tell right from wrong there. Measured (seed 0): the 1-process
# bf16 (autocast) run is 0.25 from the fp32 one, ZeRO-2 with 2 processes 0.32 from it, a run on the wrong batches
# 0.55; ZeRO-2 with 2 processes against a 1-process ZeRO-2 bf16 run: 0.052.
BF16_RUNS = [run + BF16 for run in [*METHODS, "asam", "msam", "mat"]]
ZERO_BF16_RUNS = [run for run in BF16_RUNS if run != "msam" + BF16]
# The flatness family and averaging, kept to the suite's time budget: every method and both averages under DDP and
# ZeRO-2 in fp32; bf16 under ZeRO-2 for AWP (its perturbation of DeepSpeed's 16-bit module weights) and SWA (the
# average of DeepSpeed's fp32 master weights); ZeRO-1 (DeepSpeed's stage-1/2 code, as ZeRO-2) in an opt-in launch;
# the other bf16 runs are one-process unit tests.
FLAT_RUNS = [*FLAT, "swa", "ema"]
FLAT_BF16_RUNS = ["awp" + BF16, "swa" + BF16]
STAGES = {
    "ddp": ("cpu-2proc-ddp.yaml", [*METHODS, "asam", "msam", "mat", *BF16_RUNS, *FLAT_RUNS]),
    "zero1": ("cpu-2proc-zero1.yaml", [*METHODS, "asam", "msam", "mat", *ZERO_BF16_RUNS]),
    "zero2": ("cpu-2proc-zero2.yaml", [*METHODS, "asam", "msam", "mat", *ZERO_BF16_RUNS, *FLAT_RUNS, *FLAT_BF16_RUNS]),
    # ChildTuning-F is the one gradient method allowed under ZeRO-3 (the others refuse it at start-up).
    "zero3": ("cpu-2proc-zero3.yaml", ["childtuning_f", "childtuning_f" + BF16]),
    "zero1-flat": ("cpu-2proc-zero1.yaml", FLAT_RUNS),
}
# ZeRO-3 costs a whole launch (~45 s on a 2-core CPU) for one run, the flatness family's ZeRO-1 runs another: they run
# with UEGR_ALL_ZERO_STAGES=1, outside the default suite's time budget.
DEFAULT_STAGES, OPT_IN_STAGES = ["ddp", "zero1", "zero2"], ["zero3", "zero1-flat"]
STAGES_TO_RUN = DEFAULT_STAGES + (OPT_IN_STAGES if os.environ.get("UEGR_ALL_ZERO_STAGES") == "1" else [])
REFERENCE_RUNS = list(dict.fromkeys(r for s in STAGES_TO_RUN for r in STAGES[s][1]))


def shards(run: str, processes: int) -> int:
    """mSAM's m_shards for `processes` processes: 2 per process (1 process with 4 = 2 processes with 2 each)."""
    return 2 * (2 // processes) if run.removesuffix(BF16) == "msam" else 1


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """Task files, a saved dropout-free random BERT and the 1-process runs (batch 2 * PER_RANK_BATCH)."""
    root = tmp_path_factory.mktemp("methods_parity")
    write_fixed_length_task(root / "train.jsonl", 32, seed=0)
    write_fixed_length_task(root / "val.jsonl", 8, seed=1)
    bootstrap = {
        "model": {
            "init": "random",
            "architecture": "bert",
            "config": {**TINY_MODELS["bert"], **NO_DROPOUT},
            "tokenizer": "word_level",
        },
        "data": {"train_file": str(root / "train.jsonl"), "validation_file": str(root / "val.jsonl")},
    }
    cfg = load_config(None, bootstrap)
    tokenizer, task = load_task(cfg)
    model = load_model(cfg.model, tokenizer, task.num_labels, task.id2label, seed=0)
    model.save_pretrained(root / "init")
    tokenizer.save_pretrained(root / "init")
    params, averages = {}, {}
    try:
        for run in REFERENCE_RUNS:
            # accelerate keeps one process-wide state whose precision cannot change: a fresh one per run.
            AcceleratorState._reset_state(reset_partial_state=True)
            train(load_config(None, merge(run_config(root, root / run, 2 * PER_RANK_BATCH, {}), run_overrides(run, 1))))
            params[run] = reloaded_state(root / run)
            if run.removesuffix(BF16) in AVERAGE:
                params[run + "/raw"] = reloaded_state(root / run / "raw")
                averages[run] = json.loads((root / run / "metrics.json").read_text())["average"]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return {"root": root, "params": params, "averages": averages}


# fp32: max |2-process - 1-process| parameter difference after STEPS steps; float summation order only (measured
# <= 1.2e-6).
FP32_TOLERANCE = 1e-5
# bf16: ||update_2 - update_1|| / ||update_1||, update = parameters after STEPS steps - initial parameters. The max
# parameter difference is no measure here: AdamW moves every coordinate by ~lr per step whatever its gradient's size,
# so a coordinate whose gradient is near zero (rare token embeddings) moves by ~lr in a direction that bf16 rounding
# decides, and the max difference reaches the size of the whole update (measured, seeds 0 and 1: DDP 8e-5 to 6.9e-3,
# ZeRO-2 6.8e-3 to 1.2e-2, for a largest move of 9e-3). The relative update difference measured: DDP (autocast on
# both sides; only batch-size-dependent kernels and the all-reduce order differ) 0.001 to 0.037; ZeRO-2 (DeepSpeed
# bf16 casts the model to bf16: bf16 weights in both passes, against fp32 weights under autocast; the saved model is
# its fp32 master weights) 0.034 to 0.075 at seed 0 (0.039 to 0.083 over seeds 0 and 1 when it saved the bf16 copy),
# the same as 1-process bf16 against 1-process fp32 (0.03 to 0.06, seed 0). A run that sees other batches (1 process,
# batch PER_RANK_BATCH, seed 0) is 0.38 to 0.75 away: 0.15 leaves ~2x either side.
BF16_TOLERANCE = 0.15


def update_difference(params: dict, want: dict, init: dict) -> float:
    """||(params - init) - (want - init)|| / ||want - init|| over all parameters."""
    diff = torch.cat([(params[k] - want[k]).flatten() for k in want])
    update = torch.cat([(want[k] - init[k]).flatten() for k in want])
    return float(diff.norm() / update.norm())


@pytest.mark.distributed
@pytest.mark.parametrize("stage", STAGES_TO_RUN)
def test_two_processes_equal_one_process(stage, reference, tmp_path):
    accelerate_config, runs = STAGES[stage]
    spec = write_spec(reference["root"], tmp_path, runs, processes=2)
    report_path = tmp_path / "report.json"
    done = launch(
        REPO / "configs/accelerate" / accelerate_config, [str(HELPER), str(spec), str(report_path)], timeout=500
    )
    assert report_path.is_file(), done.stderr[-4000:]
    report = json.loads(report_path.read_text())
    init = reloaded_state(reference["root"] / "init")
    diffs = {}
    for run in runs:
        assert (tmp_path / run / "metrics.json").is_file(), (run, done.stderr[-4000:])
        metrics = json.loads((tmp_path / run / "metrics.json").read_text())
        assert metrics["train"]["num_processes"] == 2 and metrics["train"]["steps"] == STEPS
        used = report[run]["mixed_precision"]
        assert used == ("bf16" if run.endswith(BF16) else "no"), (run, used)
        # Logged losses are rank 0's half of the batch: only their count and finiteness are comparable.
        losses = [entry["loss"] for entry in metrics["train_loss"]]
        assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), (run, losses)
        params = reloaded_state(tmp_path / run)
        assert all(bool(t.isfinite().all()) for t in params.values()), run
        moved = max(float((params[k] - v).abs().max()) for k, v in init.items())
        assert moved > 1e-3, run
        want = reference["params"][run]
        assert params.keys() == want.keys(), run
        max_diff = max(float((params[k] - v).abs().max()) for k, v in want.items())
        if run.removesuffix(BF16) in AVERAGE:  # the saved model is the average; raw/ holds the last raw weights
            assert metrics["average"] == reference["averages"][run], run
            raw, raw_want = reloaded_state(tmp_path / run / "raw"), reference["params"][run + "/raw"]
            assert max(float((raw[k] - params[k]).abs().max()) for k in raw) > 1e-5, run  # averaged != raw
            if run.endswith(BF16):
                raw_diff = update_difference(raw, raw_want, init)
                assert raw_diff < BF16_TOLERANCE, (run, raw_diff)
            else:
                raw_diff = max(float((raw[k] - v).abs().max()) for k, v in raw_want.items())
                assert raw_diff < FP32_TOLERANCE, (run, raw_diff)
            print(f"{stage} {run}: raw weights {raw_diff:.3g} from the reference's")
        if run.endswith(BF16):
            diffs[run] = update_difference(params, want, init)
            print(
                f"{stage} {run}: relative update difference {diffs[run]:.3g}, max |param - reference| = "
                f"{max_diff:.3g} (moved {moved:.3g})"
            )
        else:
            diffs[run] = max_diff
            print(f"{stage} {run}: max |param - reference| = {max_diff:.3g} (moved {moved:.3g})")
    bad = {r: d for r, d in diffs.items() if d >= (BF16_TOLERANCE if r.endswith(BF16) else FP32_TOLERANCE)}
    assert not bad, (stage, bad)


CUT_RUNS = ["mat", "swa"]


@pytest.mark.distributed
def test_mat_and_swa_under_zero2_cut_and_resumed_equal_one_process(reference, tmp_path):
    """MAT writes its SGLD result into the ZeRO master partitions (the engine never steps), SWA keeps its average per
    partition of them: 2-process ZeRO-2 runs preempted after step 3 (checkpoint, exit; SWA has averaged step 3) and
    resumed end where the uninterrupted 1-process runs do (SWA: the average and the raw weights)."""
    zero2 = REPO / "configs/accelerate/cpu-2proc-zero2.yaml"
    spec = write_spec(reference["root"], tmp_path, CUT_RUNS, processes=2)
    report_path = tmp_path / "report.json"
    cut = launch(zero2, [str(HELPER), str(spec), str(report_path)], timeout=300, UEGR_DEBUG_SIGNAL_AT="3:TERM")
    assert report_path.is_file(), cut.stderr[-3000:]
    assert json.loads(report_path.read_text()) == {run: {"preempted": 3} for run in CUT_RUNS}
    for run in CUT_RUNS:
        assert not (tmp_path / run / "metrics.json").exists()
        assert [p.name for p in (tmp_path / run / "checkpoints").iterdir()] == ["step-3"]
    spec_data = json.loads(spec.read_text())
    spec_data["base"]["train"]["resume"] = "auto"
    spec.write_text(json.dumps(spec_data))
    done = launch(zero2, [str(HELPER), str(spec), str(report_path)], timeout=300)
    for run, saved in (("mat", "mat"), ("swa", "swa"), ("swa", "swa/raw")):
        assert (tmp_path / saved / "model.safetensors").is_file(), done.stderr[-4000:]
        key = run if saved == run else run + "/raw"
        params, want = reloaded_state(tmp_path / saved), reference["params"][key]
        max_diff = max(float((params[k] - v).abs().max()) for k, v in want.items())
        print(f"zero2 {saved}, cut at step 3 and resumed: max |param - reference| = {max_diff:.3g}")
        assert max_diff < FP32_TOLERANCE, saved
    metrics = json.loads((tmp_path / "swa" / "metrics.json").read_text())
    assert metrics["average"] == reference["averages"]["swa"]
