import json
import pytest
from tests.test_methods_gradient_distributed import HELPER, PER_RANK_BATCH, STEPS, REPO, launch, reloaded_state, write_config
from tests import test_methods_gradient_distributed as g
from uegr_dist.config import load_config
from uegr_dist.engine.train_loop import train

MAT = {"name": "mat", "rng": "keyed", "mat": {"eta_theta": 0.05, "sigma_theta": 1e-3, "sigma_delta": 1e-3, "init_std": 1e-2, "eta_delta": 0.5}}

@pytest.mark.parametrize("stage", ["cpu-2proc-ddp.yaml", "cpu-2proc-zero1.yaml", "cpu-2proc-zero2.yaml"])
def test_mat(stage, reference, tmp_path):
    root = reference["root"]
    ref = tmp_path / "ref"
    ref.mkdir()
    train(load_config(write_config(root, ref, "mat", 2 * PER_RANK_BATCH, MAT)))
    want = reloaded_state(ref / "mat")
    cfg = write_config(root, tmp_path, "mat", PER_RANK_BATCH, MAT)
    done = launch(REPO / "configs/accelerate" / stage, [str(HELPER), str(cfg)], timeout=400)
    assert (tmp_path / "mat" / "metrics.json").is_file(), done.stderr[-4000:]
    params = reloaded_state(tmp_path / "mat")
    init = reloaded_state(root / "init")
    moved = max(float((params[k] - v).abs().max()) for k, v in init.items())
    diff = max(float((params[k] - v).abs().max()) for k, v in want.items())
    print(stage, "moved", moved, "diff", diff)
    assert diff < 1e-5




@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from tests.conftest import TINY_MODELS
    from tests.test_zero_masking import write_fixed_length_task
    from uegr_dist.engine.train_loop import load_task
    from uegr_dist.modeling import load_model
    root = tmp_path_factory.mktemp("mat")
    write_fixed_length_task(root / "train.jsonl", 32, seed=0)
    write_fixed_length_task(root / "val.jsonl", 8, seed=1)
    bootstrap = {"model": {"init": "random", "architecture": "bert", "config": {**TINY_MODELS["bert"], **g.NO_DROPOUT}, "tokenizer": "word_level"},
                 "data": {"train_file": str(root / "train.jsonl"), "validation_file": str(root / "val.jsonl")}}
    cfg = load_config(None, bootstrap)
    tokenizer, task = load_task(cfg)
    model = load_model(cfg.model, tokenizer, task.num_labels, task.id2label, seed=0)
    model.save_pretrained(root / "init")
    tokenizer.save_pretrained(root / "init")
    return {"root": root}


def test_mat_bf16_and_resume(reference, tmp_path):
    import os, yaml
    root = reference["root"]
    stage = REPO / "configs/accelerate/cpu-2proc-zero2.yaml"
    # bf16
    cfg = write_config(root, tmp_path, "bf16", PER_RANK_BATCH, MAT)
    raw = yaml.safe_load(cfg.read_text()); raw["train"]["mixed_precision"] = "bf16"; cfg.write_text(yaml.safe_dump(raw))
    done = launch(stage, [str(HELPER), str(cfg)], timeout=400)
    assert (tmp_path / "bf16" / "metrics.json").is_file(), done.stderr[-4000:]
    m = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    print("bf16 losses", m["train_loss"])
    # resume: continuous vs signal at step 2 then resume
    cont = write_config(root, tmp_path, "cont", PER_RANK_BATCH, MAT)
    raw = yaml.safe_load(cont.read_text()); raw["train"]["save_every"] = 2; cont.write_text(yaml.safe_dump(raw))
    launch(stage, [str(HELPER), str(cont)], timeout=400)
    cut = write_config(root, tmp_path, "cut", PER_RANK_BATCH, MAT)
    raw = yaml.safe_load(cut.read_text()); raw["train"]["save_every"] = 2; cut.write_text(yaml.safe_dump(raw))
    d1 = launch(stage, [str(HELPER), str(cut)], timeout=400, UEGR_DEBUG_SIGNAL_AT="2:TERM")
    print("cut rc", d1.returncode, sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()))
    raw["train"]["resume"] = "auto"; cut.write_text(yaml.safe_dump(raw))
    d2 = launch(stage, [str(HELPER), str(cut)], timeout=400)
    a, b = reloaded_state(tmp_path / "cont"), reloaded_state(tmp_path / "cut")
    diff = max(float((a[k] - v).abs().max()) for k, v in b.items())
    print("resume diff", diff, d2.stderr[-1500:])
    assert diff < 1e-6
