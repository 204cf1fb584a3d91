"""One optimizer step of `MaskedAdamW` (masked, as UEGR uses it, and unmasked) against `torch.optim.AdamW`, on the
parameter shapes of a model preset, interleaved in one run; time and peak memory added by the step.

    python -m benchmarks.optimizer_step --config roberta-base --steps 5 --threads 2 --before a186ead

The masked variants keep a random 30 % of every parameter (UEGR's default ratio), given as bool masks or as the
0 / 1 float masks the gradient masker hands over; "gated" variants run with a True step gate (the non-finite guard's
device-side decision: same bits, the gradients sanitized first). `--before REV`: the same steps of MaskedAdamW as it
was at git revision REV, side by side. Reports the median step time of each variant, its ratio to torch AdamW
(foreach), and the largest RSS growth during one step (the step's temporaries; CPU only, sampled every 2 ms). Writes
results/optimizer_step_<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import PRESETS, PeakMemory, machine_info, module_at_revision, random_classifier
from uegr_dist.backward import MaskedAdamW

RESULTS = Path(__file__).resolve().parent / "results"


def _params(preset: str) -> list[torch.nn.Parameter]:
    spec = PRESETS[preset]
    config = {**spec["config"], "vocab_size": spec["vocab"]}
    model = random_classifier(spec["architecture"], config)
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    return params


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="small", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=5, help="measured steps per variant (after one warm-up step)")
    parser.add_argument("--ratio", type=float, default=0.3, help="kept fraction of the masked variant")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tag", default=None)
    parser.add_argument("--before", default=None, metavar="REV", help="also MaskedAdamW as it was at git REV")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    params = _params(args.config)
    numel = sum(p.numel() for p in params)
    generator = torch.Generator().manual_seed(1)
    masks = {p: torch.rand(p.shape, generator=generator) < args.ratio for p in params}
    factors = {p: m.float() for p, m in masks.items()}
    variants: dict[str, Any] = {
        "torch-adamw": torch.optim.AdamW(params, lr=1e-5, foreach=True),
        "masked-adamw-unmasked": MaskedAdamW(params, lr=1e-5),
        "masked-adamw-unmasked-gated": MaskedAdamW(params, lr=1e-5),
        "masked-adamw-masked": MaskedAdamW(params, lr=1e-5),
        "masked-adamw-masked-float": MaskedAdamW(params, lr=1e-5),
        "masked-adamw-masked-float-gated": MaskedAdamW(params, lr=1e-5),
    }
    if args.before:
        before = module_at_revision(args.before, "uegr_dist/backward/masked_adamw.py", "before_masked_adamw")
        variants[f"before-{args.before}-unmasked"] = before.MaskedAdamW(params, lr=1e-5)
        variants[f"before-{args.before}-masked"] = before.MaskedAdamW(params, lr=1e-5)
    gate = torch.tensor(True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    growth: dict[str, int] = {name: 0 for name in variants}
    for round_ in range(args.steps + 1):  # round 0 creates the optimizer state: not measured
        for name, optimizer in variants.items():
            if name.endswith("-masked"):
                optimizer.set_update_masks(masks)
            elif "-masked-float" in name:
                optimizer.set_update_masks(factors)
            if name.endswith("-gated"):
                optimizer.set_step_gate(gate)
            with PeakMemory("cpu", interval=0.002) as memory:
                tic = time.perf_counter()
                optimizer.step()
                elapsed = time.perf_counter() - tic
            if round_ > 0:
                times[name].append(elapsed)
                growth[name] = max(growth[name], memory.added_bytes)
    base = statistics.median(times["torch-adamw"])
    rows = {
        name: {
            "median_s": statistics.median(t),
            "vs_torch_adamw": statistics.median(t) / base,
            "peak_added_mb": growth[name] / 2**20,
        }
        for name, t in times.items()
    }
    print(f"{args.config}: {numel / 1e6:.1f}M parameters, {args.steps} steps per variant")
    print("| variant | step s | × torch AdamW | peak memory added by the step (MB) |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['median_s']:.3f} | {row['vs_torch_adamw']:.2f} | {row['peak_added_mb']:.0f} |")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"optimizer_step_{args.tag or args.config}.json"
    record = {
        "args": {**vars(args), "out_dir": str(args.out_dir)},
        "parameters": numel,
        "rows": rows,
        "machine": machine_info("cpu"),
    }
    out.write_text(json.dumps(record, indent=2), encoding="utf-8")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
