"""Checkpoints, resume, preemption and the non-finite guard, on real training runs of a tiny model.

A run killed with SIGKILL and resumed with `--resume auto` must end with exactly the parameters, logs and
evaluations of the uninterrupted run (bitwise in one process, including UEGR's random draws in both rng modes;
within 1e-6 for 2-process ZeRO-2); SIGTERM checkpoints and exits 75; a NaN step is skipped on every process (also
inside a DeepSpeed ZeRO step: weights and every rank's optimizer shard unchanged) and N in a row stop the run
(exit 3) with the checkpoints intact; a corrupted checkpoint is skipped (auto) or refused (explicit path) without
being overwritten; a checkpoint of another configuration is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from tests.conftest import tiny_run_overrides
from uegr_dist.cli.train import main as cli_main
from uegr_dist.config import load_config
from uegr_dist.engine.checkpoint import (
    MANIFEST,
    CheckpointError,
    fingerprint,
    list_checkpoints,
    validate_checkpoint,
)
from uegr_dist.engine.guard import EXIT_NONFINITE, EXIT_PREEMPTED
from uegr_dist.engine.train_loop import train

REPO = Path(__file__).resolve().parents[1]
STEPS = 10  # 4 batches of 16 per epoch: the runs cross two epoch boundaries (each with an evaluation)
VARIANTS = {
    "vanilla": {"name": "vanilla"},
    "uegr-fast": {"name": "uegr", "rng": "fast"},
    "uegr-keyed": {"name": "uegr", "rng": "keyed"},
}


def write_config(easy_task: dict[str, Path], dest: Path, variant: str, **train: object) -> Path:
    """dest/run.yaml: STEPS steps of a tiny BERT on 64 samples with the variant's method, output dest/run."""
    cfg = tiny_run_overrides("bert", easy_task, dest / "run")
    cfg["data"].update({"max_train_samples": 64, "max_eval_samples": 32})
    cfg["train"].update({"max_steps": STEPS, "log_every": 1, "save_every": 3, "keep_last": 10, **train})
    cfg["method"].update(VARIANTS[variant])
    path = dest / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def run_cli(config: Path, *args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """`python -m uegr_dist.train` in a fresh process (one thread, like the in-process runs)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "uegr_dist.train", "--config", str(config), *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_same_run(run: Path, reference: Path) -> None:
    """Bitwise-equal final parameters, identical loss log and evaluations."""
    ours, ref = weights(run), weights(reference)
    assert ours.keys() == ref.keys()
    differing = [name for name in ref if not torch.equal(ours[name], ref[name])]
    assert not differing, differing
    ours_metrics = json.loads((run / "metrics.json").read_text())
    ref_metrics = json.loads((reference / "metrics.json").read_text())
    assert ours_metrics["train_loss"] == ref_metrics["train_loss"]
    assert ours_metrics["eval"] == ref_metrics["eval"]


@pytest.fixture(scope="module")
def references(easy_task, tmp_path_factory, one_thread) -> dict[str, Path]:
    """Uninterrupted in-process runs, made on first use (output dirs with metrics.json and model.safetensors)."""
    root = tmp_path_factory.mktemp("reference")

    class Lazy(dict):
        def __missing__(self, variant: str) -> Path:
            dest = root / variant
            dest.mkdir()
            self[variant] = train(load_config(write_config(easy_task, dest, variant))).output_dir
            return self[variant]

    return Lazy()


def test_sigkill_mid_epoch_then_resume_auto_equals_the_uninterrupted_run(references, easy_task, tmp_path, one_thread):
    # UEGR with torch-generator dropout and adversary draws; checkpoints 3 and 6, killed after step 7.
    config = write_config(easy_task, tmp_path, "uegr-fast")
    killed = run_cli(config, UEGR_DEBUG_SIGNAL_AT="7:KILL")
    assert killed.returncode == -9, killed.stderr[-2000:]
    out = tmp_path / "run"
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [6, 3]
    assert not (out / "metrics.json").exists()

    assert cli_main(["--config", str(config), "--resume", "auto"]) == 0
    assert_same_run(out, references["uegr-fast"])
    # Periodic checkpoints after the resume and one at the end, all complete.
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [10, 9, 6, 3]
    for _, path in list_checkpoints(out / "checkpoints"):
        validate_checkpoint(path)


def test_sigkill_at_an_epoch_boundary_then_resume_and_keep_last(references, easy_task, tmp_path, one_thread):
    # Checkpoint after step 4 = the last batch of epoch 1, before its evaluation; killed after step 6.
    config = write_config(easy_task, tmp_path, "vanilla", save_every=4, keep_last=1)
    killed = run_cli(config, UEGR_DEBUG_SIGNAL_AT="6:KILL")
    assert killed.returncode == -9, killed.stderr[-2000:]
    out = tmp_path / "run"
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [4]
    assert cli_main(["--config", str(config), "--resume", "auto"]) == 0
    assert_same_run(out, references["vanilla"])
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [10]


def test_sigterm_checkpoints_exits_75_and_resume_continues(references, easy_task, tmp_path, one_thread, capsys):
    # UEGR with keyed (counter-based) draws: the micro-step index must be restored exactly.
    config = write_config(easy_task, tmp_path, "uegr-keyed", save_every=0)
    os.environ["UEGR_DEBUG_SIGNAL_AT"] = "4:TERM"
    try:
        code = cli_main(["--config", str(config)])
    finally:
        del os.environ["UEGR_DEBUG_SIGNAL_AT"]
    assert code == EXIT_PREEMPTED == 75
    out = tmp_path / "run"
    assert "preempted: checkpoint of step 4" in capsys.readouterr().err
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [4]
    assert not (out / "metrics.json").exists()

    assert cli_main(["--config", str(config), "--resume", "auto"]) == 0
    assert_same_run(out, references["uegr-keyed"])


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_nan_step_is_skipped_and_the_run_continues(precision, easy_task, tmp_path, one_thread, monkeypatch):
    monkeypatch.setenv("UEGR_DEBUG_NAN_STEPS", "2")  # the third optimizer step
    config = write_config(easy_task, tmp_path, "uegr-fast", max_steps=5, save_every=1, mixed_precision=precision)
    # accelerate keeps one process-wide state: another precision needs a reset before and after.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        result = train(load_config(config))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert result.metrics["train"]["nonfinite_steps"] == 1
    ckpt = tmp_path / "run" / "checkpoints"
    # The skipped step moved nothing: weights and optimizer state after step 3 are those after step 2.
    before, skipped, after = (weights(ckpt / f"step-{n}") for n in (2, 3, 4))
    assert all(torch.equal(before[k], skipped[k]) for k in before)
    assert any(not torch.equal(skipped[k], after[k]) for k in before)
    opt_before, opt_skipped = (torch.load(ckpt / f"step-{n}" / "optimizer.bin", weights_only=True) for n in (2, 3))
    assert opt_before["state"][0]["step"] == opt_skipped["state"][0]["step"] == 2
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "run").values())
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in result.metrics["train_loss"])


def test_nonfinite_steps_in_a_row_stop_the_run_and_keep_the_checkpoints(
    easy_task, tmp_path, one_thread, monkeypatch, capsys
):
    monkeypatch.setenv("UEGR_DEBUG_NAN_STEPS", "3,4,5")
    config = write_config(easy_task, tmp_path, "vanilla", save_every=2, max_nonfinite_steps=3)
    code = cli_main(["--config", str(config)])
    assert code == EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "3 optimizer steps in a row (up to step 6) had a non-finite loss or gradient" in err
    assert "train.max_nonfinite_steps = 3" in err
    out = tmp_path / "run"
    ckpts = list_checkpoints(out / "checkpoints")
    assert [step for step, _ in ckpts] == [4, 2]
    for _, path in ckpts:
        validate_checkpoint(path)
    # Step 4's checkpoint holds the weights of the last good step (3): the skipped steps 4 and 5 changed nothing.
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()


def test_corrupted_checkpoints_are_skipped_and_kept(references, easy_task, tmp_path, one_thread, caplog):
    config = write_config(easy_task, tmp_path, "vanilla", max_steps=STEPS, save_every=3)
    out = tmp_path / "run"
    train(load_config(config))
    # A crash after the last periodic checkpoint: no final outputs, checkpoints 3, 6, 9 and 10 on disk.
    for name in ("metrics.json", "model.safetensors"):
        (out / name).unlink()
    ckpt = out / "checkpoints"
    truncated = ckpt / "step-10" / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    flipped = ckpt / "step-9" / "optimizer.bin"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    (ckpt / "step-6" / "checkpoint.json").unlink()  # as if killed before the manifest (cannot happen after rename)
    (ckpt / ".tmp-step-11").mkdir()  # a writer killed mid-save
    damaged = {p: p.read_bytes() for p in (truncated, flipped)}

    # An explicit path to a damaged checkpoint is an error naming the file; nothing changes on disk.
    code = cli_main(["--config", str(config), "--resume", str(ckpt / "step-10")])
    assert code == 2
    assert [s for s, _ in list_checkpoints(ckpt)] == [10, 9, 6, 3]

    with caplog.at_level("WARNING", logger="uegr_dist.engine.checkpoint"):
        assert cli_main(["--config", str(config), "--resume", "auto"]) == 0
    warnings = caplog.text
    assert "step-10: file model.safetensors has 1000 bytes" in warnings
    assert "step-9: file optimizer.bin is corrupted (sha256 mismatch)" in warnings
    assert "step-6: no checkpoint.json" in warnings
    assert_same_run(out, references["vanilla"])
    # The damaged checkpoints were set aside, not overwritten or deleted.
    for path, content in damaged.items():
        kept = ckpt / f"{path.parent.name}.invalid" / path.name
        assert kept.read_bytes() == content
    assert (ckpt / "step-6.invalid").is_dir()


def test_explicit_damaged_checkpoint_message(easy_task, tmp_path, one_thread, capsys):
    config = write_config(easy_task, tmp_path, "vanilla", max_steps=3, save_every=3)
    train(load_config(config))
    step = tmp_path / "run" / "checkpoints" / "step-3"
    (step / "scheduler.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="scheduler.bin has 0 bytes"):
        validate_checkpoint(step)
    other = tmp_path / "other"
    code = cli_main(["--config", str(config), "--train.output_dir", str(other), "--resume", str(step)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"train.resume = '{step}'" in err and "scheduler.bin has 0 bytes, expected" in err
    assert not other.exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--method.name", "uegr"], "method.name = 'uegr' (checkpoint: 'vanilla')"),
        (["--model.config.hidden_size", "64"], "model.config.hidden_size = 64 (checkpoint: 32)"),
        (["--train.batch_size", "8"], "train.batch_size = 8 (checkpoint: 16)"),
    ],
)
def test_checkpoint_of_another_config_is_refused(override, message, easy_task, tmp_path, one_thread, capsys):
    dest = tmp_path
    config = write_config(easy_task, dest, "vanilla", max_steps=3, save_every=3)
    out = dest / "run"
    assert cli_main(["--config", str(config)]) == 0
    for name in ("metrics.json", "model.safetensors"):
        (out / name).unlink()  # a crashed run, which --resume auto may continue
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    code = cli_main(["--config", str(config), "--resume", "auto", *override])
    assert code == 2
    err = capsys.readouterr().err
    assert "belongs to another run configuration" in err and message in err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before


def test_checkpoint_from_before_an_option_existed_resumes_at_its_default(easy_task, tmp_path, one_thread, capsys):
    """A checkpoint written by an older version, whose config lacked options added since (here: the AWP section and
    data.max_train_samples_seed), resumes when those options are at their defaults, and is refused when one is not."""
    config = write_config(easy_task, tmp_path, "vanilla", max_steps=4, save_every=2)
    out = tmp_path / "run"
    assert cli_main(["--config", str(config)]) == 0
    for name in ("metrics.json", "model.safetensors"):
        (out / name).unlink()  # as if the run had been cut off after its step-2 checkpoint
    shutil.rmtree(out / "checkpoints" / "step-4", ignore_errors=True)
    manifest_path = out / "checkpoints" / "step-2" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    del manifest["identity"]["method"]["awp"], manifest["identity"]["data"]["max_train_samples_seed"]
    manifest["fingerprint"] = fingerprint(manifest["identity"])
    manifest_path.write_text(json.dumps(manifest))
    before = manifest_path.read_bytes()
    assert cli_main(["--config", str(config), "--resume", "auto", "--method.awp.gamma", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "belongs to another run configuration" in err and "method.awp = {" in err
    assert manifest_path.read_bytes() == before
    assert cli_main(["--config", str(config), "--resume", "auto"]) == 0
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 4


def test_fresh_start_refuses_a_directory_with_checkpoints(easy_task, tmp_path, capsys):
    config = write_config(easy_task, tmp_path, "vanilla")
    (tmp_path / "run" / "checkpoints" / "step-3").mkdir(parents=True)
    assert cli_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints of an earlier run (newest: step-3)" in err and "--resume auto" in err
    assert cli_main(["--config", str(config), "--train.resume", "somewhere/else"]) == 2
    err = capsys.readouterr().err
    assert "train.resume = 'somewhere/else': checkpoint somewhere/else: not a directory" in err
    assert "(train.resume is none, auto, or a checkpoint directory)" in err


@pytest.mark.distributed
def test_zero2_two_processes_sigkill_then_resume_matches_the_one_process_run(tmp_path, one_thread, monkeypatch):
    from tests.test_zero_masking import STAGES, launch, write_fixed_length_task

    write_fixed_length_task(tmp_path / "train.jsonl", 64, seed=0)
    write_fixed_length_task(tmp_path / "val.jsonl", 16, seed=1)
    files = {"train": tmp_path / "train.jsonl", "validation": tmp_path / "val.jsonl"}

    def config(name: str, batch_size: int) -> Path:
        cfg = tiny_run_overrides("bert", files, tmp_path / name)
        cfg["train"].update({"max_steps": 6, "batch_size": batch_size, "log_every": 1, "save_every": 2})
        cfg["method"]["rng"] = "keyed"  # draws keyed by sample id: 2 processes reproduce 1 process
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        return path

    # Process 0's gradient partition is NaN at step index 4, after the resume: both ranks skip that step inside the
    # ZeRO step, as the 1-process run does (the guard counts steps from the checkpoint's step, not from 0).
    monkeypatch.setenv("UEGR_DEBUG_NAN_STEPS", "4")
    reference = train(load_config(config("reference", 8))).output_dir
    two = config("zero2", 4)
    killed = launch(STAGES["zero2"], ["-m", "uegr_dist.train", "--config", str(two)], UEGR_DEBUG_SIGNAL_AT="3:KILL")
    assert killed.returncode != 0
    out = tmp_path / "zero2"
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [2]
    assert not (out / "metrics.json").exists()

    resumed = launch(STAGES["zero2"], ["-m", "uegr_dist.train", "--config", str(two), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours, ref = weights(out), weights(reference)
    assert ours.keys() == ref.keys()
    worst = max((ours[k].float() - ref[k].float()).abs().max().item() for k in ref)
    assert worst <= 1e-6, worst
    manifest = validate_checkpoint(out / "checkpoints" / "step-6")
    assert {"method_state_0.pt", "method_state_1.pt", "random_states_1.pkl"} <= set(manifest["files"])
    # The loss log survived the kill: steps 1-2 from the checkpoint, 3-6 from the resumed run (step 5 skipped).
    log = json.loads((out / "metrics.json").read_text())["train_loss"]
    assert [(e["step"], e["nonfinite_steps"]) for e in log] == [(1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (6, 1)]


def _nan_step_config(
    easy_task: dict[str, Path], dest: Path, batch_size: int, variant: str = "uegr-keyed", **train: object
) -> Path:
    """4 steps with a checkpoint after each (fixed-length padding: with keyed draws, 2 processes of batch 8 equal
    1 process of batch 16)."""
    dest.mkdir()
    path = write_config(easy_task, dest, variant, max_steps=4, save_every=1, batch_size=batch_size, **train)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["padding"] = "max_length"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def nan_step_reference(easy_task, tmp_path_factory, one_thread) -> Path:
    """The 1-process run that skips optimizer step index 1 (UEGR_DEBUG_NAN_STEPS=1): its output directory."""
    config = _nan_step_config(easy_task, tmp_path_factory.mktemp("nan_reference") / "one", 16)
    os.environ["UEGR_DEBUG_NAN_STEPS"] = "1"
    try:
        return train(load_config(config)).output_dir
    finally:
        del os.environ["UEGR_DEBUG_NAN_STEPS"]


def _tensors(node: object, prefix: str) -> dict[str, torch.Tensor]:
    if torch.is_tensor(node):
        return {prefix: node}
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, (list, tuple)) else ()
    return {name: t for key, value in items for name, t in _tensors(value, f"{prefix}/{key}").items()}


def checkpoint_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's model and optimizer state, by file and key: accelerate's model.safetensors and
    optimizer.bin, or DeepSpeed's model states and every rank's ZeRO shard (fp32 master partition, Adam moments and
    step counts)."""
    found: dict[str, torch.Tensor] = {}
    for path in sorted(step_dir.rglob("*")):
        if path.suffix == ".safetensors":
            found.update({f"{path.name}/{k}": v for k, v in load_file(str(path)).items()})
        elif path.name == "optimizer.bin" or (path.parent.name == "pytorch_model" and path.suffix == ".pt"):
            # Written by this test's own run; DeepSpeed's files hold non-tensor objects (loss scaler, enums).
            found.update(_tensors(torch.load(path, map_location="cpu", weights_only=False), path.name))
    return found


# (stage, precision, method variant). bf16 ZeRO-1/2 is the case DeepSpeed itself would step through (it checks
# bf16 gradients only with bf16.check_grad_overflow); ZeRO-2 fp32 with UEGR is the kill / resume test above.
# ZeRO-3 (~75 s on a 2-core CPU) runs with UEGR_ALL_ZERO_STAGES=1, outside the default suite's time budget.
NAN_STEP_RUNS = [("ddp", "no", "uegr-keyed"), ("zero2", "bf16", "vanilla")] + (
    [("zero3", "bf16", "uegr-keyed")] if os.environ.get("UEGR_ALL_ZERO_STAGES") == "1" else []
)


@pytest.mark.distributed
@pytest.mark.parametrize(("stage", "precision", "variant"), NAN_STEP_RUNS)
def test_nan_on_one_process_skips_the_step_on_every_process(
    stage, precision, variant, nan_step_reference, easy_task, tmp_path, one_thread
):
    from tests.test_zero_masking import STAGES, launch

    # Process 0 alone sees a NaN gradient at step index 1 (under DeepSpeed: in its partition of the averaged
    # gradient, inside the ZeRO step); process 1's is finite. Both must skip that step: no parameter, fp32 master
    # weight, Adam moment or step count moves on any rank, and the scheduler does not advance.
    config = _nan_step_config(easy_task, tmp_path / "two", 8, variant, mixed_precision=precision)
    done = launch(STAGES[stage], ["-m", "uegr_dist.train", "--config", str(config)], UEGR_DEBUG_NAN_STEPS="1")
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "two" / "run"
    log = json.loads((out / "metrics.json").read_text())["train_loss"]
    assert [e["nonfinite_steps"] for e in log] == [0, 1, 1, 1]
    assert [e["lr"] for e in log] == pytest.approx([2.25e-3, 2.25e-3, 1.5e-3, 0.75e-3])  # linear decay from 3e-3

    ckpt = out / "checkpoints"
    first, skipped, after = (checkpoint_tensors(ckpt / f"step-{n}") for n in (1, 2, 3))
    assert first.keys() == skipped.keys() and any("exp_avg_sq" in name for name in first)
    assert [name for name in first if not torch.equal(first[name], skipped[name])] == []
    assert any(not torch.equal(skipped[name], after[name]) for name in first)
    ours = weights(out)
    assert all(torch.isfinite(t).all() for t in ours.values())
    if stage == "ddp":  # and the replicas stayed together: the 1-process run that skipped the same step
        ref = weights(nan_step_reference)
        worst = max((ours[k] - ref[k]).abs().max().item() for k in ref)
        assert worst <= 1e-6, worst
