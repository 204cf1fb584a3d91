"""The library API: `SelectiveAdamW` (mask -> clip -> update in its step), `RobustLoss`, `uegr_dist.prepare`, and the
two front-ends built on them, examples/accelerate_loop.py and `RobustTrainer`, which train the same model as
`uegr-train` on the same config: one process, 2-process DDP and 2-process ZeRO-2."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import NEGATIVE_WORDS, POSITIVE_WORDS, TINY_MODELS, method_context, tiny_dropout_free_model
from tests.test_zero_masking import REPO, launch, reloaded_state
from uegr_dist import MaskOptions, RobustLoss, SelectiveAdamW, decay_groups
from uegr_dist.backward import GradientMasker, MaskedAdamW
from uegr_dist.config import ConfigError, load_config
from uegr_dist.methods.uegr import UEGR

pytestmark = pytest.mark.usefixtures("one_thread")

HELPER = REPO / "tests" / "distributed" / "library_run.py"
ROWS, EPOCHS = 16, 4  # one global batch of all 16 rows per step: 4 steps
UEGR_METHOD = {"name": "uegr", "rng": "keyed", "adversary": {"eps": 0.01, "step_size": 0.01}}
PEER_METHOD = {"name": "childtuning_f", "childtuning": {"p_f": 0.5}}
RUNS = [
    {"name": "train-uegr", "via": "uegr-train", "method": UEGR_METHOD},
    {"name": "example-uegr", "via": "example", "method": UEGR_METHOD},
    {"name": "trainer-uegr", "via": "trainer", "method": UEGR_METHOD},
    {"name": "train-peer", "via": "uegr-train", "method": PEER_METHOD},
    {"name": "trainer-peer", "via": "trainer", "method": PEER_METHOD},
]
# (front-end run, the uegr-train run it must equal)
PAIRS = [("example-uegr", "train-uegr"), ("trainer-uegr", "train-uegr"), ("trainer-peer", "train-peer")]
TOLERANCE = 1e-6  # fp32 max parameter difference


def _batch(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ids = torch.randint(5, 60, (4, 9), generator=gen) * mask
    labels = torch.randint(0, 3, (4,), generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "sample_id": torch.arange(4)}


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    return torch.nn.functional.cross_entropy(model(**inputs).logits, batch["labels"])


# ---------------------------------------------------------------- SelectiveAdamW


def test_selective_adamw_step_is_mask_then_clip_then_masked_update():
    """Three steps of SelectiveAdamW equal the obvious sequence: GradientMasker.apply_, clip_grad_norm_ of the masked
    gradient, MaskedAdamW with the keep masks (bit for bit); with a small max_grad_norm the clip is active."""
    fast, slow = tiny_dropout_free_model(), tiny_dropout_free_model()
    mask = MaskOptions(ratio=0.3, exclude=["classifier"])
    optimizer = SelectiveAdamW(decay_groups(fast.named_parameters(), 0.1), lr=1e-2, mask=mask, max_grad_norm=0.05)
    groups = decay_groups(slow.named_parameters(), 0.1)
    named = [pair for g in groups for pair in g["params"]]
    reference = MaskedAdamW([{**g, "params": [p for _, p in g["params"]]} for g in groups], lr=1e-2)
    masker = GradientMasker(named, mask)
    for step in range(3):
        batch = _batch(step)
        _loss(fast, batch).backward()
        optimizer.step()
        _loss(slow, batch).backward()
        masker.apply_(step)
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in named if p.grad is not None], 0.05)
        assert norm > 0.05  # the clip is not a no-op
        reference.set_update_masks(masker.update_masks())
        reference.step()
        for (name, p), q in zip(fast.named_parameters(), slow.parameters()):
            assert torch.equal(p, q), f"step {step}: {name}"
        fast.zero_grad(set_to_none=True)
        slow.zero_grad(set_to_none=True)
    assert optimizer.last_mask_stats.keep_fraction == pytest.approx(0.3, abs=0.01)


def test_clipping_sees_the_masked_gradient_not_the_full_one(monkeypatch):
    """The clip norm is that of the gradient after masking (ratio 0.1): well below the full gradient's norm."""
    model = tiny_dropout_free_model()
    _loss(model, _batch(0)).backward()
    full = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
    optimizer = SelectiveAdamW(model.named_parameters(), lr=0.0, mask=MaskOptions(ratio=0.1), max_grad_norm=1e9)
    seen = []
    original = torch.nn.utils.clip_grad_norm_

    def recording(params, max_norm, *args, **kwargs):
        seen.append(float(original(params, max_norm, *args, **kwargs)))
        return seen[-1]

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    optimizer.step()
    assert len(seen) == 1 and 0 < seen[0] < 0.9 * full


def test_selective_adamw_refuses_partitions_it_was_not_built_with():
    """Stepped by DeepSpeed on flat partitions without uegr_dist.prepare, it says how to prepare it."""
    model = tiny_dropout_free_model()
    optimizer = SelectiveAdamW(model.named_parameters(), mask=MaskOptions(ratio=0.3))
    flat = torch.nn.Parameter(torch.zeros(10))
    flat.grad = torch.ones(10)
    optimizer.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match=r"uegr_dist.prepare\(accelerator"):
        optimizer.step()


def test_selective_adamw_bad_input_errors():
    model = tiny_dropout_free_model()
    with pytest.raises(TypeError, match="takes \\(name, parameter\\) pairs"):
        SelectiveAdamW(model.parameters())
    with pytest.raises(ValueError, match="include pattern 'nothing' matches no trainable parameter"):
        SelectiveAdamW(model.named_parameters(), mask=MaskOptions(include="nothing"))
    with pytest.raises(ValueError, match="max_grad_norm must be >= 0"):
        SelectiveAdamW(model.named_parameters(), max_grad_norm=-1.0)


# ---------------------------------------------------------------- RobustLoss


def test_robust_loss_is_the_methods_objective_and_counts_steps():
    model, twin = tiny_dropout_free_model(), tiny_dropout_free_model()
    options = {"rng": "keyed", "dropout": {"k": 2}, "adversary": {"eps": 0.01, "step_size": 0.01}}
    loss_fn = RobustLoss("uegr", seed=4, **options)
    assert isinstance(loss_fn.gradient_mask(), MaskOptions)
    method = UEGR(load_config(None, {"method": {"name": "uegr", **options}}).method)
    method.setup(method_context(twin, seed=4))
    for step in range(3):
        batch = _batch(step)
        got = loss_fn(model, batch)
        want = method.loss(twin, batch, step, step)
        assert torch.equal(got.loss, want.loss), step
    assert (loss_fn.step, loss_fn.micro_step) == (3, 3)  # outside an accumulation every call is a step
    loss_fn.remove()
    assert not any(type(m).__name__ == "ChunkedDropout" for m in model.modules())


@pytest.mark.parametrize("name", ["sam", "mat"])
def test_robust_loss_refuses_methods_without_a_loss(name):
    with pytest.raises(ConfigError, match=f"method.name = {name}: it updates the parameters in its own way"):
        RobustLoss(name)


def test_robust_loss_checks_options_like_a_config():
    with pytest.raises(ConfigError, match="method.dropout.k = 0"):
        RobustLoss("uegr", dropout={"k": 0})


# ---------------------------------------------------------------- front-ends equal uegr-train


def write_int_label_task(path: Path, n: int, seed: int) -> Path:
    """Cue-word rows of exactly 10 words with integer labels (the example and the Trainer read them as they are)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = int(rng.random() < 0.5)
        own, other = (POSITIVE_WORDS, NEGATIVE_WORDS) if label else (NEGATIVE_WORDS, POSITIVE_WORDS)
        words = [rng.choice(own if rng.random() < 0.8 else other) for _ in range(10)]
        rows.append(json.dumps({"text": " ".join(words), "label": label}))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def library_task(tmp_path_factory) -> Path:
    """Task files and a saved dropout-free tiny BERT with its word-level tokenizer."""
    from uegr_dist.engine.setup import load_task
    from uegr_dist.modeling import load_model

    root = tmp_path_factory.mktemp("library")
    write_int_label_task(root / "train.jsonl", ROWS, seed=0)
    write_int_label_task(root / "val.jsonl", 8, seed=1)
    config = {**TINY_MODELS["bert"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    cfg = load_config(
        None,
        {
            "model": {"init": "random", "architecture": "bert", "config": config, "tokenizer": "word_level"},
            "data": {"train_file": str(root / "train.jsonl"), "validation_file": str(root / "val.jsonl")},
        },
    )
    tokenizer, task = load_task(cfg)
    model = load_model(cfg.model, tokenizer, task.num_labels, task.id2label, seed=0)
    model.save_pretrained(root / "init")
    tokenizer.save_pretrained(root / "init")
    return root


def write_spec(root: Path, dest: Path, processes: int, deepspeed: str | None = None, runs: list | None = None) -> Path:
    base = {
        "model": {"name_or_path": str(root / "init")},
        "data": {
            "train_file": str(root / "train.jsonl"),
            "validation_file": str(root / "val.jsonl"),
            "max_length": 16,
            "padding": "max_length",
        },
        "train": {
            "output_dir": str(dest),
            "epochs": EPOCHS,
            "batch_size": ROWS // processes,
            "lr": 3e-3,
            "weight_decay": 0.01,
            "warmup_ratio": 0.0,
            "max_grad_norm": 1.0,
            "tracker": "none",
            "progress": False,
            "save_every": 0,
            "seed": 0,
        },
    }
    spec = dest / "spec.json"
    dest.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps({"base": base, "runs": runs or RUNS, "deepspeed": deepspeed}), encoding="utf-8")
    return spec


def assert_front_ends_equal_uegr_train(dest: Path, pairs: list[tuple[str, str]] = PAIRS) -> None:
    for run, reference in pairs:
        got, want = reloaded_state(dest / run), reloaded_state(dest / reference)
        assert got.keys() == want.keys(), run
        worst = max(float((got[k] - want[k]).abs().max()) for k in want)
        assert worst <= TOLERANCE, f"{run} vs {reference}: max parameter difference {worst:.3g}"


def assert_trained(dest: Path, init: Path, runs: list | None = None) -> None:
    """The comparison is not vacuous: every run moved the weights."""
    start = reloaded_state(init)
    for run in runs or RUNS:
        state = reloaded_state(dest / run["name"])
        assert max(float((state[k] - start[k]).abs().max()) for k in start) > 1e-3, run["name"]


@pytest.mark.slow
def test_front_ends_equal_uegr_train_in_one_process(library_task, tmp_path):
    dest = tmp_path / "one"
    spec = write_spec(library_task, dest, processes=1)
    done = subprocess.run(
        [sys.executable, str(HELPER), str(spec)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert_trained(dest, library_task / "init")
    assert_front_ends_equal_uegr_train(dest)
    card = (dest / "trainer-uegr" / "README.md").read_text(encoding="utf-8")
    assert "uegr" in card and "method.mask.ratio" in card


ACCUMULATION_RUNS = [
    # Two micro-batches of 8 rows per step. Which rows share a micro-batch differs between the front-ends' samplers,
    # so the runs compared exactly are those whose draws do not depend on the micro-batch: ChildTuning-F on the
    # dropout-free model (its mask is keyed by step and position).
    {"name": "train-peer-ga", "via": "uegr-train", "method": PEER_METHOD, "train": {"grad_accum": 2, "batch_size": 8}},
    {"name": "trainer-peer-ga", "via": "trainer", "method": PEER_METHOD, "train": {"grad_accum": 2, "batch_size": 8}},
    {"name": "trainer-uegr-bf16", "via": "trainer", "method": UEGR_METHOD, "train": {"mixed_precision": "bf16"}},
]


@pytest.mark.slow
def test_trainer_gradient_accumulation_equals_uegr_train_and_bf16_trains(library_task, tmp_path):
    dest = tmp_path / "ga"
    spec = write_spec(library_task, dest, processes=1, runs=ACCUMULATION_RUNS)
    done = subprocess.run(
        [sys.executable, str(HELPER), str(spec)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert_trained(dest, library_task / "init", ACCUMULATION_RUNS)
    assert_front_ends_equal_uegr_train(dest, [("trainer-peer-ga", "train-peer-ga")])
    losses = json.loads((dest / "trainer-uegr-bf16" / "losses.json").read_text())
    assert len(losses) == EPOCHS and all(math.isfinite(x) for x in losses)
    config = json.loads((dest / "trainer-uegr-bf16" / "config.json").read_text())
    assert config.get("dtype", "float32") == "float32"  # bf16 autocast: the weights stay float32


BACKENDS = [("ddp", "cpu-2proc-ddp.yaml", None), ("zero2", "cpu-2proc-zero2.yaml", "configs/deepspeed/zero2.json")]
# ZeRO-3 (parameters partitioned; the Trainer loads the model under zero.Init) costs a launch of its own: it runs with
# UEGR_ALL_ZERO_STAGES=1, outside the default suite's time budget.
if os.environ.get("UEGR_ALL_ZERO_STAGES") == "1":
    BACKENDS.append(("zero3", "cpu-2proc-zero3.yaml", "configs/deepspeed/zero3.json"))


@pytest.mark.distributed
@pytest.mark.parametrize(("backend", "accelerate_config", "deepspeed"), BACKENDS)
def test_front_ends_equal_uegr_train_on_two_processes(library_task, tmp_path, backend, accelerate_config, deepspeed):
    dest = tmp_path / backend
    spec = write_spec(library_task, dest, processes=2, deepspeed=deepspeed)
    done = launch(REPO / "configs" / "accelerate" / accelerate_config, [str(HELPER), str(spec)], timeout=420)
    assert done.returncode == 0, done.stderr[-4000:]
    assert_trained(dest, library_task / "init")
    assert_front_ends_equal_uegr_train(dest)
