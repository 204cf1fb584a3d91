"""The benchmarks' naive reference UEGR computes what the fast UEGR computes (so timing one against the other is
fair), and `python -m benchmarks.throughput` writes its JSON, CSV, markdown and PNG."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import throughput
from benchmarks.common import flops_per_token, model_shape
from benchmarks.naive_uegr import NaiveUEGR, no_weight_decay
from tests.conftest import method_context, tiny_dropout_free_model
from uegr_dist.backward import SelectiveAdamW
from uegr_dist.config import load_config
from uegr_dist.methods.uegr import UEGR

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (4, 9), generator=gen)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    labels = torch.randint(0, 3, (4,), generator=gen)
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels, "sample_id": torch.arange(4)}


@pytest.mark.parametrize(
    ("arch", "scope", "saliency", "exclude"),
    # Attention key biases get a gradient that is 0 up to rounding (softmax ignores a per-query shift): per tensor,
    # their top 30% is a ranking of rounding noise, which two correct orders of summation need not agree on.
    [("bert", "global", "taylor", []), ("roberta", "per_tensor", "grad_sq", ["classifier", r"key\.bias"])],
)
def test_naive_reference_matches_fast_uegr(arch, scope, saliency, exclude):
    """Same losses, same kept coordinates and the same parameters after 3 steps, with dropout at rate 0 (sub-model
    rates p_min = p_max = 0) so that both draw the same random numbers (the adversary's start only)."""
    method_cfg = load_config(
        None,
        {
            "method": {
                "dropout": {"k": 2, "p_min": 0.0, "p_max": 0.0},
                "adversary": {"steps": 1, "eps": 0.05, "step_size": 0.05, "init_scale": 0.01},
                "alpha": 0.7,
                "beta": 2.0,
                "mask": {"ratio": 0.3, "scope": scope, "saliency": saliency, "exclude": exclude},
            }
        },
    ).method
    lr, weight_decay, clip = 1e-2, 0.1, 0.5
    fast_model, naive_model = tiny_dropout_free_model(arch), tiny_dropout_free_model(arch)
    named = list(fast_model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not no_weight_decay(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if no_weight_decay(n, p)], "weight_decay": 0.0},
    ]
    fast = UEGR(method_cfg)
    order = {id(p): n for n, p in named}
    named_groups = [{**g, "params": [(order[id(p)], p) for p in g["params"]]} for g in groups]
    optimizer = SelectiveAdamW(named_groups, lr=lr, mask=fast.gradient_mask(3), max_grad_norm=clip)
    fast.setup(method_context(fast_model, optimizer, seed=3, named=optimizer.named_parameters))
    naive = NaiveUEGR(naive_model, method_cfg, lr=lr, weight_decay=weight_decay, max_grad_norm=clip, seed=3)

    for step in range(3):
        batch = _batch(step)
        torch.manual_seed(100 + step)
        fast_loss = fast.loss(fast_model, batch, step, step).loss
        fast_loss.backward()
        optimizer.step()  # mask -> clip -> update
        fast_model.zero_grad(set_to_none=True)
        torch.manual_seed(100 + step)
        naive_loss = naive.step(batch, step)

        assert math.isclose(fast_loss.item(), naive_loss, rel_tol=1e-5), step
        fast_masks = {order[id(p)]: m for p, m in optimizer.masker.update_masks().items()}
        assert sorted(fast_masks) == sorted(naive.last_masks)
        differing = sum(int((fast_masks[n] != naive.last_masks[n]).sum()) for n in fast_masks)
        assert differing == 0, f"step {step}: {differing} coordinates kept by one implementation only"
        for (name, p_fast), (_, p_naive) in zip(fast_model.named_parameters(), naive_model.named_parameters()):
            torch.testing.assert_close(p_fast, p_naive, rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")
    # The comparison is not vacuous: the parameters moved, and the mask froze most coordinates.
    start = tiny_dropout_free_model(arch).parameters()
    moved = sum(int((p != q).sum()) for p, q in zip(fast_model.parameters(), start))
    total = sum(p.numel() for p in fast_model.parameters())
    assert 0 < moved < 0.9 * total


def test_flops_formula():
    model = tiny_dropout_free_model("bert")
    shape = model_shape(model)
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    assert shape["non_embedding_params"] == sum(p.numel() for p in model.parameters()) - embedding
    n, layers, d = shape["non_embedding_params"], 2, 32
    assert flops_per_token(shape, seq=16) == 6 * n + 12 * layers * d * 16
    assert flops_per_token(shape, seq=16, backward=False) == 2 * n + 4 * layers * d * 16


@pytest.mark.slow
def test_throughput_cli_writes_every_output(tmp_path):
    """`python -m benchmarks.throughput` (its main(), in this process to spare the imports) on the tiny config."""
    argv = ["--configs", "tiny", "--batch", "4", "--seq", "16", "--rounds", "1", "--steps", "2"]
    argv += ["--profile", "--profile-rows", "5"]  # one more, profiled round: not among the measured steps
    assert throughput.main([*argv, "--out-dir", str(tmp_path), "--tag", "smoke"]) == 0
    result = json.loads((tmp_path / "throughput_smoke.json").read_text(encoding="utf-8"))
    assert result["machine"]["torch"] == torch.__version__
    assert result["command"].startswith("python -m benchmarks.throughput --configs tiny")
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"plain-accelerate", "vanilla", "uegr", "naive-uegr"}
    for row in rows.values():
        assert row["measured_steps"] == 2
        assert row["step_s"] > 0 and row["tflops"] > 0 and row["peak_memory_mb"] >= 0
        assert row["samples_per_s"] == pytest.approx(4 / row["step_s"])
        assert row["tokens_per_s"] == pytest.approx(4 * 16 / row["step_s"])
        # "other" is the step minus the timed stages: negative would mean a stage was counted twice.
        assert row["stages_s"]["other"] >= 0
    stages = rows["uegr"]["stages_s"]
    assert stages["adversary"] > 0 and stages["forward"] > 0 and stages["backward"] > 0
    assert stages["saliency_mask"] > 0 and stages["optimizer"] > 0 and stages["communication"] == 0
    assert rows["vanilla"]["stages_s"]["adversary"] == 0
    # K + 1 = 3 passes plus the adversary's 2/3 pass against vanilla's one, at the same batch.
    flops = {v: rows[v]["tflops"] * rows[v]["step_s"] for v in rows}
    assert flops["uegr"] == pytest.approx((3 + 2 / 3) * flops["vanilla"])
    ratios = result["ratios"][0]
    assert ratios["uegr_over_naive_speedup"] == pytest.approx(rows["naive-uegr"]["step_s"] / rows["uegr"]["step_s"])
    assert ratios["uegr_over_floor"] == pytest.approx(rows["uegr"]["step_s"] / (4 * rows["vanilla"]["step_s"]))
    with open(tmp_path / "throughput_smoke.csv", encoding="utf-8") as f:
        assert {row["variant"] for row in csv.DictReader(f)} == set(rows)
    markdown = (tmp_path / "throughput_smoke.md").read_text(encoding="utf-8")
    assert result["command"] in markdown and "| uegr |" in markdown and "| naive-uegr |" in markdown
    assert (tmp_path / "throughput_smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    profile = (tmp_path / "profile_smoke.txt").read_text(encoding="utf-8")
    titles = [line for line in profile.splitlines() if line.startswith("## ")]
    assert [title.split()[5] for title in titles] == ["plain-accelerate", "vanilla", "uegr", "naive-uegr"]
    assert profile.count("aten::") >= 4 * 3  # operator rows in every table


def test_throughput_cli_rejects_unknown_method(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        throughput.main(["--methods", "vanilla", "nonexistent", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "unknown nonexistent" in error and "vanilla" in error and "uegr" in error
    assert not list(tmp_path.iterdir())


def test_readme_section_is_replaced_and_nothing_else(tmp_path):
    from benchmarks.report import update_readme

    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nhand-written text\n", encoding="utf-8")
    update_readme(readme, "| a |\n", section="throughput-cpu")
    update_readme(readme, "| b |\n", section="scaling-cpu")
    update_readme(readme, "| c |\n", section="throughput-cpu")
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n\nhand-written text\n")
    assert "| a |" not in text and text.count("| c |") == 1 and text.count("| b |") == 1
    assert text.index("| c |") < text.index("| b |")  # replaced in place, not appended again


@pytest.mark.distributed
def test_scaling_one_vs_two_ddp_processes(tmp_path):
    """`python -m benchmarks.scaling` launches the single process and the 2-process DDP run and reports both."""
    from benchmarks import scaling

    argv = ["--config", "tiny", "--methods", "vanilla", "--launchers", "single", "ddp", "--batch", "4", "--seq", "16"]
    assert scaling.main([*argv, "--steps", "2", "--out-dir", str(tmp_path), "--tag", "smoke"]) == 0
    result = json.loads((tmp_path / "scaling_smoke.json").read_text(encoding="utf-8"))
    rows = {row["launcher"]: row for row in result["rows"]}
    assert rows["single"]["processes"] == 1 and rows["ddp"]["processes"] == 2
    assert [len(rows[launcher]["peak_rss_bytes"]) for launcher in ("single", "ddp")] == [1, 2]
    assert rows["single"]["speedup"] == 1.0
    for row in rows.values():
        assert row["samples_per_s"] == pytest.approx(4 / row["step_s"])
        assert all(len(rank["step_s"]) == 2 for rank in row["ranks"])
    # DDP's gradient all-reduce was seen by the comm hook; one process communicates nothing.
    assert rows["ddp"]["communication_s"] > 0 and rows["single"]["communication_s"] == 0
    assert "| vanilla | ddp | 2 |" in (tmp_path / "scaling_smoke.md").read_text(encoding="utf-8")


def test_stage_breakdown_of_loop_and_naive_records():
    # Our loop times the whole objective (adversary inside it); the naive reference times its forward on its own.
    loop = [{"step": 1.0, "objective": 0.5, "adversary": 0.2, "backward": 0.3}, {"step": 3.0, "objective": 0.5}]
    naive = [{"step": 1.0, "adversary": 0.2, "forward": 0.3, "backward": 0.3, "communication": 0.1}]
    for records, forward in ((loop[:1], 0.3), (naive, 0.3)):
        stages = throughput.stage_breakdown(records)
        assert stages["forward"] == pytest.approx(forward) and stages["other"] == pytest.approx(0.2)
        assert stages["step"] == 1.0 and stages["saliency_mask"] == 0.0
    assert throughput.stage_breakdown(naive)["communication"] == pytest.approx(0.1)
    assert throughput.stage_breakdown(loop)["step"] == 2.0  # medians over the steps


def test_optimizer_step_benchmark_writes_its_record(tmp_path):
    """`python -m benchmarks.optimizer_step` on the tiny preset: every variant timed (and MaskedAdamW at a git
    revision, side by side), ratios to torch AdamW."""
    from benchmarks import optimizer_step

    argv = ["--config", "tiny", "--steps", "1", "--threads", "1", "--before", "HEAD", "--out-dir", str(tmp_path)]
    record = json.loads(optimizer_step.main(argv).read_text())
    mine = ["unmasked", "unmasked-gated", "masked", "masked-float", "masked-float-gated"]
    assert set(record["rows"]) == {
        "torch-adamw",
        *(f"masked-adamw-{name}" for name in mine),
        "before-HEAD-unmasked",
        "before-HEAD-masked",
    }
    assert record["rows"]["torch-adamw"]["vs_torch_adamw"] == 1.0
    assert all(row["median_s"] > 0 for row in record["rows"].values())
    assert record["parameters"] > 0


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """`bash benchmarks/gpu_check.sh --dry-run`: every default section's command, shrunk to tiny sizes on the CPU."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sync = json.loads((tmp_path / "sync_check_cpu.json").read_text())
    assert all(result["ok"] for result in sync["results"].values())
    bench = json.loads((tmp_path / "throughput_cpu.json").read_text())
    assert {row["variant"] for row in bench["rows"]} == {"floor", "plain-accelerate", "vanilla", "uegr"}
    ratios = bench["ratios"][0]
    assert {"vanilla_over_floor", "vanilla_mfu", "uegr_utilisation", "mask_fraction"} <= set(ratios)
    assert json.loads((tmp_path / "stacked_forward_b4.json").read_text())["sequential_over_stacked"] > 0
    assert "== done" in done.stdout
