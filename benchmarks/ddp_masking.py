"""UEGR's gradient mask under DDP: every process masking the whole averaged gradient vs the processes splitting it.

    accelerate launch --config_file configs/accelerate/cpu-2proc-ddp.yaml -m benchmarks.ddp_masking \\
        --config roberta-base --rounds 4 --before a186ead

Every process holds the parameters of a random-init model preset and the same gradient (what DDP's all-reduce leaves
in `.grad`), and runs the gradient mask (`GradientMasker.apply_`: taylor saliency, global hard top-30 %, zeroing the
dropped gradients) in these variants, interleaved round by round (a barrier before each call):

- `whole`: each process scores and selects over the whole gradient (no collective; the path before the split);
- `split-bits` / `split-bytes`: each process scores and selects its 1 / N slice, the thresholds come from
  all-reduced histograms and the kept sets are all-gathered as bits / bytes (`SplitMasking`, the default);
- `before-REV` (with `--before REV`): the masker as it was at git revision REV (whole gradient, bool mask).

All variants must keep the same coordinates (checked every round). Reports the median time per call of each variant
(the slowest process), the speed-up of the split over `whole` and over `before-REV`, and the same on one process
(`whole` there is what a 1-process run does). Writes results/ddp_masking_<tag>.json from process 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.common import PRESETS, machine_info, module_at_revision, random_classifier
from uegr_dist.backward import GradientMasker, MaskOptions
from uegr_dist.backward.masking import SplitMasking

RESULTS = Path(__file__).resolve().parent / "results"


def _model_params(preset: str) -> list[tuple[str, torch.nn.Parameter]]:
    spec = PRESETS[preset]
    model = random_classifier(spec["architecture"], {**spec["config"], "vocab_size": spec["vocab"]})
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ddp_masking", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", choices=sorted(PRESETS))
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds (after one warm-up round)")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--before", default=None, metavar="REV", help="also the masker as it was at git REV")
    parser.add_argument("--tag", default=None)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    named = _model_params(args.config)
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=generator) * 1e-3 for _, p in named]
    options = MaskOptions(ratio=args.ratio)

    def all_reduce_sum(tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor)

    def all_gather(output: torch.Tensor, local: torch.Tensor) -> None:
        dist.all_gather_into_tensor(output, local)

    maskers: dict[str, Any] = {"whole": GradientMasker(named, options)}
    if distributed:
        for label, packed in (("split-bits", True), ("split-bytes", False)):
            split = SplitMasking(rank, world, all_reduce_sum, all_gather, packed)
            maskers[label] = GradientMasker(named, options, split=split)
    if args.before:
        old = module_at_revision(args.before, "uegr_dist/backward/masking.py", "before_masking")
        maskers[f"before-{args.before}"] = old.GradientMasker(named, options)
    times: dict[str, list[float]] = {label: [] for label in maskers}
    for round_index in range(args.rounds + 1):
        reference = None
        for label, masker in maskers.items():
            for (_, param), grad in zip(named, grads):
                param.grad = grad.clone()
            if distributed:
                dist.barrier()
            tic = time.perf_counter()
            masker.apply_()
            elapsed = torch.tensor([time.perf_counter() - tic], dtype=torch.float64)
            if distributed:
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest process sets the pace
            if round_index > 0:
                times[label].append(float(elapsed))
            kept = torch.cat([m.reshape(-1) for m in masker.update_masks().values()])
            if reference is None:
                reference = kept
            elif not torch.equal(kept, reference):
                raise SystemExit(f"{label} kept another set than {next(iter(maskers))}")
    medians = {label: statistics.median(values) for label, values in times.items()}
    record: dict[str, Any] = {
        "command": "python -m benchmarks.ddp_masking " + " ".join(sys.argv[1:] if argv is None else argv),
        "processes": world,
        "threads_per_process": args.threads,
        "parameters": sum(p.numel() for _, p in named),
        "median_s": medians,
        "times_s": times,
        "machine": machine_info("cpu"),
    }
    if "split-bits" in medians:
        record["split_speedup_vs_whole"] = medians["whole"] / medians["split-bits"]
        if args.before:
            record["split_speedup_vs_before"] = medians[f"before-{args.before}"] / medians["split-bits"]
    if rank == 0:
        print(json.dumps({k: v for k, v in record.items() if k not in ("times_s", "machine")}, indent=1))
        args.out_dir.mkdir(parents=True, exist_ok=True)
        tag = args.tag or f"{args.config}-{world}proc"
        (args.out_dir / f"ddp_masking_{tag}.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
