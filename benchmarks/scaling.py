"""Distributed scaling on CPU: one process vs two (gloo) under DDP and DeepSpeed ZeRO-1/2/3, same global batch.

    python -m benchmarks.scaling                                     # vanilla and uegr, small model, all launchers
    python -m benchmarks.scaling --config roberta-base --methods uegr --launchers single zero2 --batch 4

Each (method, launcher) pair is one launch of the real `train()` (instrumented as in benchmarks/throughput.py):
`single` runs one process with all `--threads` torch threads; the others run `accelerate launch --config_file
configs/accelerate/cpu-2proc-<launcher>.yaml` with the threads split between the two processes, each process taking
half of the global `--batch`. Reported per launch: the median step time over the measured steps (the slowest rank's
median), unique samples/s = global batch / step, the speed-up over the single process of the same method, the
communication time per step (see throughput.py: Python-visible collectives, and DDP's bucket all-reduces from issue
to completion, which overlap the backward), and per rank the peak RSS and the RSS the run added.
The launches run one after another, not interleaved: on a shared machine compare them with care.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks import report
from benchmarks.common import PRESETS, PeakMemory, StageTimer, machine_info, peak_rss_bytes, run_config
from uegr_dist.config.registry import METHOD_NAMES as METHODS

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = ("single", "ddp", "zero1", "zero2", "zero3")
README = Path(__file__).resolve().parent / "README.md"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(args: argparse.Namespace) -> None:
    """One process of a launch: train, then write this rank's step records and memory to --out/rank<r>.json."""
    from benchmarks.throughput import instrumented_train
    from uegr_dist.config import load_config

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    threads = args.single_threads if world == 1 and args.single_threads else args.threads // world
    torch.set_num_threads(max(1, threads))
    out = Path(args.out)
    cfg = run_config(
        out / f"data_rank{rank}",
        args.config,
        {"name": args.method, "dropout": {"k": args.k}},
        seq=args.seq,
        batch_size=args.batch // world,
        steps=args.warmup + args.steps + 1,
        world=world,
    )
    timer = StageTimer("cpu")
    with PeakMemory("cpu") as peak:
        instrumented_train(load_config(None, cfg), timer)
    records = timer.step_records(args.warmup)
    summary = {
        "rank": rank,
        "world": world,
        "threads": torch.get_num_threads(),
        "step_s": [r["step"] for r in records],
        "communication_s": [r.get("communication", 0.0) for r in records],
        "peak_rss_bytes": peak_rss_bytes(),
        "added_rss_bytes": peak.added_bytes,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(summary), encoding="utf-8")


def launch(args: argparse.Namespace, method: str, launcher: str, out: Path) -> dict[str, Any]:
    """Run one (method, launcher) launch; returns its row."""
    out.mkdir(parents=True, exist_ok=True)
    worker_args = ["-m", "benchmarks.scaling", "--worker", "--out", str(out), "--method", method]
    worker_args += ["--config", args.config, "--k", str(args.k), "--seq", str(args.seq), "--batch", str(args.batch)]
    worker_args += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if args.single_threads:
        worker_args += ["--single-threads", str(args.single_threads)]
    if launcher == "single":
        command = [sys.executable, *worker_args]
    else:
        accelerate = Path(sys.executable).with_name("accelerate")
        config = REPO / "configs" / "accelerate" / f"cpu-2proc-{launcher}.yaml"
        command = [str(accelerate), "launch", "--config_file", str(config), "--main_process_port", str(_free_port())]
        command += worker_args
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{launcher} / {method} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    ranks = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(out.glob("rank*.json"))]
    step_s = max(statistics.median(r["step_s"]) for r in ranks)
    return {
        "method": method,
        "launcher": launcher,
        "processes": len(ranks),
        "threads": ranks[0]["threads"],
        "global_batch": args.batch,
        "step_s": step_s,
        "samples_per_s": args.batch / step_s,
        "communication_s": statistics.mean(statistics.median(r["communication_s"]) for r in ranks),
        "peak_rss_bytes": [r["peak_rss_bytes"] for r in ranks],
        "added_rss_bytes": [r["added_rss_bytes"] for r in ranks],
        "ranks": ranks,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["vanilla", "uegr"], help=f"from {sorted(METHODS)}")
    parser.add_argument("--launchers", nargs="+", default=list(LAUNCHERS), choices=LAUNCHERS)
    parser.add_argument("--config", default="small", choices=sorted(PRESETS))
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="global batch (split over the processes)")
    parser.add_argument("--steps", type=int, default=4, help="measured steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all (split over the processes)")
    parser.add_argument(
        "--single-threads", type=int, default=None, help="torch threads of the single process (default: --threads)"
    )
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per launch")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="cpu", help="output names: scaling_<tag>.{json,md}")
    parser.add_argument("--update-readme", action="store_true", help="put the table into benchmarks/README.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods + ([args.method] if args.method else []) if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; known methods: {', '.join(sorted(METHODS))}")
    if args.batch % 2:
        parser.error(f"--batch {args.batch}: must be even (two processes share it)")
    if min(args.k, args.seq, args.steps, args.threads) < 1 or args.warmup < 0:
        parser.error("--k, --seq, --steps and --threads must be >= 1, --warmup >= 0")
    return args


def _write(args: argparse.Namespace, command: str, rows: list[dict[str, Any]], stem: Path) -> str:
    """Speed-ups over the single process, then scaling_<tag>.json / .md; returns the markdown."""
    for row in rows:
        single = next((r for r in rows if r["method"] == row["method"] and r["launcher"] == "single"), None)
        row["speedup"] = single["step_s"] / row["step_s"] if single else None
    result = {
        "kind": "scaling",
        "command": command.strip(),
        "machine": machine_info("cpu"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
    }
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    markdown = report.render(result)
    stem.with_suffix(".md").write_text(markdown, encoding="utf-8")
    return markdown


def main(argv: Sequence[str] | None = None) -> int:
    """Run every (method, launcher) launch; write scaling_<tag>.json / .md."""
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    command = "python -m benchmarks.scaling " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"scaling_{args.tag}"
    rows: list[dict[str, Any]] = []
    pairs = [(m, launcher) for m in args.methods for launcher in args.launchers]
    with tempfile.TemporaryDirectory(prefix="uegr_scaling_") as tmp:
        for method, launcher in tqdm(pairs, desc="launches"):
            rows.append(launch(args, method, launcher, Path(tmp) / f"{method}-{launcher}"))
            markdown = _write(args, command, rows, stem)  # after every launch: a long run keeps what it measured
    if args.update_readme:
        report.update_readme(README, markdown, section=f"scaling-{args.tag}")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
