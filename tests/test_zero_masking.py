"""UEGR under DeepSpeed ZeRO-1/2/3 and DDP on 2 CPU processes equals the 1-process run with the same global batch.

Every launch runs the real `train()` (tests/distributed/uegr_parity_run.py): parameters after 6 steps, the kept
coordinates of every step and the samples of every step must match the reference; the ZeRO masking code issues
only histogram-sized collectives; `uegr-train` exports a complete ZeRO-3 model; a crashing rank ends the job.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification

from tests.conftest import NEGATIVE_WORDS, POSITIVE_WORDS, TINY_MODELS, run_reaped
from uegr_dist.config import load_config
from uegr_dist.engine.setup import load_task
from uegr_dist.modeling import load_model

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "tests" / "distributed" / "uegr_parity_run.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")
STEPS, PER_RANK_BATCH = 6, 4
MAX_MASKING_COLLECTIVE = 4096  # S * 256 histogram counts (global scope: S = 1) and a 2-element norm/count sum


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_fixed_length_task(path: Path, n: int, seed: int) -> Path:
    """Cue-word rows of exactly 10 words: every batch pads to the same length, so a batch of 8 and two batches of
    4 see identical tensors (keyed attention-dropout draws depend on the padded length)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        own, other = (POSITIVE_WORDS, NEGATIVE_WORDS) if positive else (NEGATIVE_WORDS, POSITIVE_WORDS)
        words = [rng.choice(own if rng.random() < 0.8 else other) for _ in range(10)]
        rows.append(json.dumps({"text": " ".join(words), "label": "pos" if positive else "neg"}))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def run_config(root: Path, dest: Path, name: str, model: Path | None, batch_size: int, **train: object) -> Path:
    """dest/name.yaml: a UEGR run (keyed randomness, output dest/name) on the task in root; model None: random
    init (bootstrap)."""
    model_cfg = (
        {"init": "random", "architecture": "bert", "config": dict(TINY_MODELS["bert"]), "tokenizer": "word_level"}
        if model is None
        else {"name_or_path": str(model)}
    )
    cfg = {
        "model": model_cfg,
        "data": {"train_file": str(root / "train.jsonl"), "validation_file": str(root / "val.jsonl"), "max_length": 24},
        "train": {
            "output_dir": str(dest / name),
            "max_steps": STEPS,
            "batch_size": batch_size,
            "lr": 3e-3,
            "warmup_ratio": 0.0,
            "log_every": 1,
            "tracker": "none",
            "progress": False,
            "seed": 0,
            **train,
        },
        "method": {"name": "uegr", "rng": "keyed", "adversary": {"eps": 0.01, "step_size": 0.01}},
    }
    path = dest / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def launch(accelerate_config: Path, args: list[str], timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of 2 CPU processes on a fresh port, from the repository root (on timeout the ranks are
    killed too)."""
    command = [str(ACCELERATE), "launch", "--config_file", str(accelerate_config), "--main_process_port"]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", **env}
    return run_reaped([*command, str(free_port()), *args], cwd=REPO, env=full_env, timeout=timeout)


def reloaded_state(path: Path) -> dict[str, torch.Tensor]:
    """State dict of a saved model as transformers reloads it (a ZeRO-3 export may use legacy LayerNorm names)."""
    model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return {name: tensor.float() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def parity(tmp_path_factory) -> dict:
    """Task files, a saved random model (ZeRO-3 builds models under zero.Init, whose random init differs, so every
    run starts from the same saved weights) and the 1-process reference run (batch 2 * PER_RANK_BATCH)."""
    root = tmp_path_factory.mktemp("zero_parity")
    write_fixed_length_task(root / "train.jsonl", 64, seed=0)
    write_fixed_length_task(root / "val.jsonl", 17, seed=1)  # uneven over 2 ranks: gathered without duplicates
    cfg = load_config(run_config(root, root, "bootstrap", None, PER_RANK_BATCH))
    tokenizer, task = load_task(cfg)
    model = load_model(cfg.model, tokenizer, task.num_labels, task.id2label, seed=0)
    model.save_pretrained(root / "init")
    tokenizer.save_pretrained(root / "init")
    reference = run_config(root, root, "reference", root / "init", 2 * PER_RANK_BATCH)
    done = subprocess.run(
        [sys.executable, str(HELPER), str(reference), str(root / "reference.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((root / "reference.json").read_text())
    return {"root": root, "report": report, "params": reloaded_state(root / "reference")}


STAGES = {
    "ddp": REPO / "configs/accelerate/cpu-2proc-ddp.yaml",
    "zero1": REPO / "configs/accelerate/cpu-2proc-zero1.yaml",
    "zero2": REPO / "configs/accelerate/cpu-2proc-zero2.yaml",
    "zero3": REPO / "configs/accelerate/cpu-2proc-zero3.yaml",
    "zero3-offload": None,  # the zero3 launcher with configs/deepspeed/zero3-offload.json (written per test)
}


@pytest.mark.distributed
@pytest.mark.parametrize("stage", list(STAGES))
def test_two_process_run_equals_one_process_run(stage, parity, tmp_path):
    root = parity["root"]
    accelerate_config = STAGES[stage]
    if accelerate_config is None:
        launcher = yaml.safe_load(STAGES["zero3"].read_text())
        json_config = json.loads((REPO / "configs/deepspeed/zero3-offload.json").read_text())
        json_config["zero_optimization"]["offload_optimizer"]["pin_memory"] = False  # no pinned memory on CPU
        (tmp_path / "ds.json").write_text(json.dumps(json_config))
        launcher["deepspeed_config"]["deepspeed_config_file"] = str(tmp_path / "ds.json")
        accelerate_config = tmp_path / "launcher.yaml"
        accelerate_config.write_text(yaml.safe_dump(launcher))
    config = run_config(root, tmp_path, "run", root / "init", PER_RANK_BATCH)
    report_path = tmp_path / "report.json"
    extra = ["--check-threshold"] if stage == "zero2" else []
    done = launch(accelerate_config, [str(HELPER), str(config), str(report_path), *extra])
    assert report_path.is_file(), done.stderr[-4000:]  # rc alone is not trusted: rare SIGABRT at ZeRO-3 exit
    report, reference = json.loads(report_path.read_text()), parity["report"]

    assert len(report["steps"]) == STEPS
    for got, want in zip(report["steps"], reference["steps"]):
        assert got["samples"] == want["samples"], f"step {got['step']}: different samples"
        assert (got["kept"], got["sha256"]) == (want["kept"], want["sha256"]), f"step {got['step']}: other mask"
    params = reloaded_state(tmp_path / "run")
    assert params.keys() == parity["params"].keys()
    diff = max(float((params[k] - v).abs().max()) for k, v in parity["params"].items())
    print(f"{stage}: max |param - reference| = {diff:.3g}")
    assert diff < 1e-5
    # Same weights, same 17 validation rows (none counted twice by the uneven last batch): the same metrics.
    assert report["final"] == pytest.approx(reference["final"], abs=1e-6)
    if stage != "ddp":
        assert report["num_collectives"] >= STEPS
        assert report["max_collective_numel"] <= MAX_MASKING_COLLECTIVE
    if stage == "zero2":
        assert report["threshold_ok"] is True


@pytest.mark.distributed
def test_uegr_train_cli_zero3_exports_a_complete_model(parity, tmp_path):
    config = run_config(parity["root"], tmp_path, "run", parity["root"] / "init", PER_RANK_BATCH, max_steps=3)
    out = tmp_path / "run"
    launch(STAGES["zero3"], ["-m", "uegr_dist.train", "--config", str(config)])
    assert (out / "metrics.json").is_file() and len(list(out.glob("*.safetensors"))) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["num_processes"] == 2 and metrics["train"]["steps"] == 3
    model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    reference = AutoModelForSequenceClassification.from_pretrained(parity["root"] / "init")
    for (name, param), (_, initial) in zip(model.named_parameters(), reference.named_parameters()):
        assert param.shape == initial.shape and torch.isfinite(param).all(), name
    # Trained, gathered weights: every tensor is complete, and the masked run still moved some of them.
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


@pytest.mark.distributed
def test_crashing_rank_ends_the_job_quickly(parity, tmp_path):
    """Rank 1 raises at step 2 while rank 0 goes on into the next collective: the launcher must end the job soon
    after (not after train.collective_timeout, 600 s). Timed from the failure, not from the start (start-up time
    depends on the machine's load)."""
    config = run_config(parity["root"], tmp_path, "run", parity["root"] / "init", PER_RANK_BATCH)
    done = launch(
        STAGES["zero2"], [str(HELPER), str(config), str(tmp_path / "r.json")], timeout=180, UEGR_TEST_CRASH_AT_STEP="2"
    )
    ended = time.time()
    assert done.returncode != 0
    failure = re.search(r"injected failure on rank 1 at step 2 \(time ([0-9.]+)\)", done.stderr)
    assert failure, done.stderr[-3000:]
    after_failure = ended - float(failure.group(1))
    print(f"job ended {after_failure:.1f} s after the failure")
    assert after_failure < 45, after_failure
    assert not (tmp_path / "r.json").exists()


class _Plugin:
    def __init__(self, clipping: object) -> None:
        self.deepspeed_config = {"gradient_clipping": clipping}


class _Accelerator:
    def __init__(self, plugin: _Plugin | None) -> None:
        self.state = type("State", (), {"deepspeed_plugin": plugin})()


@pytest.mark.parametrize(("given", "masks", "expected"), [("auto", True, 0.0), (1.0, True, 0.0), ("auto", False, 0.5)])
def test_deepspeed_clipping_is_off_when_masking_and_max_grad_norm_otherwise(given, masks, expected):
    from uegr_dist.engine.backend import configure_deepspeed_clipping

    plugin = _Plugin(given)
    configure_deepspeed_clipping(_Accelerator(plugin), 0.5, masks_gradients=masks)
    assert plugin.deepspeed_config["gradient_clipping"] == expected
    configure_deepspeed_clipping(_Accelerator(None), 0.5, masks_gradients=masks)  # no DeepSpeed: nothing to do
