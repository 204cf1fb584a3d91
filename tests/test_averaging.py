"""Weight averaging (`train.average`, uegr_dist/engine/averaging.py) on real one-process runs of a tiny model: the saved
model is the SWA mean / the EMA of the raw weights at the averaging points (read back from per-step checkpoints),
SWA's learning rate follows its schedule, evaluation sees the average and leaves the raw weights exactly as they were,
a run cut and resumed ends with the uninterrupted run's average, bitwise; bad settings fail at start-up. The 2-process
runs (DDP, ZeRO-1/2) are in tests/test_methods_gradient_distributed.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import method_context, method_preset, tiny_dropout_free_model, tiny_run_overrides, zero3_backend
from uegr_dist.cli.train import main as cli_main
from uegr_dist.config import ConfigError, load_config
from uegr_dist.engine.averaging import WeightAverager, start_step, with_swa_schedule
from uegr_dist.engine.guard import EXIT_PREEMPTED
from uegr_dist.engine.train_loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8


def run_config(easy_task: dict[str, Path], out: Path, average: dict, **train: object) -> dict:
    """STEPS steps of vanilla fine-tuning of a tiny BERT on 64 samples (4 steps per epoch), a checkpoint after every
    step (their model files are the raw weights), train.average as given."""
    cfg = tiny_run_overrides("bert", easy_task, out)
    cfg["data"].update({"max_train_samples": 64, "max_eval_samples": 32})
    cfg["train"].update({"max_steps": STEPS, "log_every": 1, "save_every": 1, "keep_last": 100, **train})
    cfg["train"]["average"] = average
    cfg["method"] = {"name": "vanilla"}
    return cfg


def raw_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    weights = load_file(str(out / "checkpoints" / f"step-{step}" / "model.safetensors"))
    return {k: v.double() for k, v in weights.items()}


def saved(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_close(ours: dict[str, torch.Tensor], want: dict[str, torch.Tensor], ulps: int) -> None:
    """float32 averages against float64 references: within `ulps` float32 roundings of each value."""
    for k in want:
        torch.testing.assert_close(ours[k].double(), want[k], rtol=ulps * 2.0**-24, atol=1e-10, msg=k)


def test_swa_is_the_mean_of_the_weights_at_the_averaging_points(easy_task, tmp_path):
    # S = 3, every 2: the weights after steps 5 and 7 (the last step, 8, is not an averaging point); cyclic lr.
    average = {"kind": "swa", "start": 3, "every": 2, "lr_schedule": "cyclic", "swa_lr": 2e-3, "swa_lr_min": 1e-4}
    result = train(load_config(None, run_config(easy_task, tmp_path / "run", {**average, "keep_raw": True})))
    out = result.output_dir
    assert result.metrics["average"] == {"kind": "swa", "start_step": 3, "averaged": 2}
    snapshots = [raw_weights(out, step) for step in (5, 7)]
    mean = {k: sum(s[k] for s in snapshots) / len(snapshots) for k in snapshots[0]}
    ours = saved(out)
    assert ours.keys() == mean.keys()
    assert_close(ours, mean, ulps=4)
    # keep_raw: the last step's raw weights, which the final checkpoint also holds.
    raw = saved(out / "raw")
    assert all(torch.equal(raw[k].double(), v) for k, v in raw_weights(out, STEPS).items())
    assert max(float((ours[k] - raw[k]).abs().max()) for k in raw) > 1e-4  # the average is not the raw model
    # The logged lr (after step s: the next step's): the run's linear schedule up to S, then the cycle of 2 steps
    # from 2e-3 down to 1e-4 (t = 1/2, 1).
    lrs = {entry["step"]: entry["lr"] for entry in result.metrics["train_loss"]}
    assert lrs[1] == pytest.approx(3e-3 * (1 - 1 / STEPS))
    for step in range(3, STEPS + 1):
        t = ((step - 3) % 2 + 1) / 2  # the step after `step` is the (step - 2)-th after S
        assert lrs[step] == pytest.approx((1 - t) * 2e-3 + t * 1e-4), step


def test_ema_is_the_recursion_from_the_start_step(easy_task, tmp_path):
    decay = 0.6
    average = {"kind": "ema", "start": 0.25, "ema_decay": decay}  # S = 2, every step from 3 on
    result = train(load_config(None, run_config(easy_task, tmp_path / "run", average, lr_schedule="constant")))
    out = result.output_dir
    assert result.metrics["average"] == {"kind": "ema", "start_step": 2, "averaged": STEPS - 1}
    ema = raw_weights(out, 2)
    for step in range(3, STEPS + 1):
        ema = {k: decay * v + (1 - decay) * w for (k, v), w in zip(ema.items(), raw_weights(out, step).values())}
    assert_close(saved(out), ema, ulps=4 * STEPS)
    # EMA does not change the learning rate.
    assert {entry["lr"] for entry in result.metrics["train_loss"]} == {3e-3}
    assert not (out / "raw").exists()


def test_evaluation_uses_the_average_and_puts_the_raw_weights_back_exactly():
    model = tiny_dropout_free_model()
    named = list(model.named_parameters())
    cfg = load_config(None, {"train": {"average": {"kind": "swa", "start": 0, "every": 1}}})
    averager = WeightAverager(cfg.train, method_context(model).backend, named, total_steps=4)
    first = {n: p.detach().clone() for n, p in named}
    averager.after_step(1)
    with torch.no_grad():
        for _, p in named:
            p.mul_(1.5)
    averager.after_step(2)
    raw = {n: p.detach().clone() for n, p in named}
    with averager.applied():
        for n, p in named:
            torch.testing.assert_close(p.detach(), (first[n] + raw[n]) / 2, rtol=0, atol=1e-7)
    assert all(torch.equal(p.detach(), raw[n]) for n, p in named)
    averager.install()
    for n, p in named:
        torch.testing.assert_close(p.detach(), (first[n] + raw[n]) / 2, rtol=0, atol=1e-7)


def test_a_cut_and_resumed_run_ends_with_the_uninterrupted_average(easy_task, tmp_path):
    """SIGTERM after step 5 (2 SWA points folded in, checkpoint, exit 75), then --resume auto: the same averaged and raw
    weights, bitwise, and the same evaluations (epoch 1's ran on the average before the cut)."""
    average = {"kind": "swa", "start": 2, "every": 1, "lr_schedule": "constant", "keep_raw": True}
    whole = train(load_config(None, run_config(easy_task, tmp_path / "whole", average, save_every=0))).output_dir

    config = tmp_path / "cut.json"
    config.write_text(json.dumps(run_config(easy_task, tmp_path / "cut", average, save_every=0)), encoding="utf-8")
    os.environ["UEGR_DEBUG_SIGNAL_AT"] = "5:TERM"
    try:
        assert cli_main(["--config", str(config)]) == EXIT_PREEMPTED
    finally:
        del os.environ["UEGR_DEBUG_SIGNAL_AT"]
    assert cli_main(["--config", str(config), "--resume", "auto"]) == 0
    cut = tmp_path / "cut"
    for name in ("", "raw"):
        ours, want = saved(cut / name), saved(whole / name)
        assert [k for k in want if not torch.equal(ours[k], want[k])] == [], name
    metrics, want = (json.loads((path / "metrics.json").read_text()) for path in (cut, whole))
    assert metrics["eval"] == want["eval"] and metrics["average"] == want["average"]
    assert metrics["train_loss"] == want["train_loss"]


def test_swa_schedule_counts_optimizer_steps_of_several_processes():
    """The prepared scheduler advances num_processes times per optimizer step: the SWA factor follows the steps."""
    cfg = load_config(
        None, {"train": {"lr": 1.0, "average": {"kind": "swa", "start": 2, "every": 3, "lr_schedule": "cyclic"}}}
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda count: 0.5)
    with_swa_schedule(scheduler, cfg.train, total_steps=10, num_processes=2)
    seen = []
    for _ in range(8):  # 8 optimizer steps
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        scheduler.step()
    low = 0.1  # swa_lr_min default: swa_lr (= train.lr) / 10
    cycle = [(1 - t) * 1.0 + t * low for t in (1 / 3, 2 / 3, 1)]
    assert seen == pytest.approx([0.5, 0.5, *cycle, *cycle])


@pytest.mark.parametrize(
    ("average", "message"),
    [
        ({"kind": "swa", "start": 2.5}, "train.average.start = 2.5: below 1 a fraction"),
        ({"kind": "swa", "lr_schedule": "cyclic", "every": 1}, "train.average.every = 1: a cyclic"),
        ({"kind": "swa", "lr_schedule": "cyclic", "every": 2, "swa_lr_min": 1.0}, "swa_lr_min = 1.0 > the cycle's"),
        ({"kind": "ema", "ema_decay": 1.0}, "train.average.ema_decay = 1.0: must be in [0.0, 1.0)"),
        ({"kind": "mean"}, "train.average.kind = 'mean': must be one of none, swa, ema"),
    ],
)
def test_bad_average_settings_fail_at_load(average, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, {"train": {"average": average}})
    assert message in str(error.value)


def test_a_start_beyond_the_run_fails_before_writing(easy_task, tmp_path):
    cfg = run_config(easy_task, tmp_path / "run", {"kind": "swa", "start": 7, "every": 2})
    with pytest.raises(ConfigError, match="takes its first weights at step 9, beyond the run's 8 optimizer steps"):
        train(load_config(None, cfg))
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert start_step(load_config(None, {"train": {"average": {"start": 0.3}}}).train.average, 8) == 2


ZERO3_REFUSED = ["swa", "ema"]


@pytest.mark.parametrize("kind", ZERO3_REFUSED)
def test_zero3_is_refused_at_setup(kind):
    cfg = load_config(None, {"train": {"average": {"kind": kind}}})
    model = tiny_dropout_free_model()
    with pytest.raises(ConfigError, match=f"train.average.kind = {kind}: DeepSpeed ZeRO-3 partitions"):
        WeightAverager(cfg.train, zero3_backend(), list(model.named_parameters()), total_steps=8)


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state whose precision cannot change: reset it around a bf16 run."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# Run name (as in docs/methods.md's support table) -> train.average, trained one process with bf16 autocast.
BF16_ONE_PROCESS = {"swa": {"kind": "swa", "start": 2}, "ema": {"kind": "ema", "start": 0.5, "ema_decay": 0.5}}


@pytest.mark.parametrize("run", sorted(BF16_ONE_PROCESS))
def test_average_runs_under_bf16_autocast(run, easy_task, tmp_path, fresh_accelerator_state):
    cfg = run_config(easy_task, tmp_path / "run", BF16_ONE_PROCESS[run], max_steps=4, save_every=0)
    cfg["train"]["mixed_precision"] = "bf16"
    result = train(load_config(None, cfg))
    assert result.metrics["average"]["averaged"] >= 2
    assert all(torch.isfinite(t).all() for t in saved(result.output_dir).values())


# configs/methods preset -> its train.average (the method is vanilla with its defaults).
AVERAGE_PRESETS = {"swa": {"kind": "swa"}, "ema": {"kind": "ema", "start": 0.0}}


@pytest.mark.parametrize("preset", sorted(AVERAGE_PRESETS))
def test_average_presets_load_and_train(preset, easy_task, tmp_path, fresh_accelerator_state):
    """Each ready config is train.average's documented defaults plus what its comment says, and trains."""
    cfg = method_preset(preset, easy_task, tmp_path / "run", save_model=False, max_steps=4)
    assert cfg.method == load_config(None, {"method": {"name": "vanilla"}}).method
    assert cfg.train.average == load_config(None, {"train": {"average": AVERAGE_PRESETS[preset]}}).train.average
    result = train(cfg)
    assert result.metrics["average"]["kind"] == preset and result.metrics["average"]["averaged"] >= 1
