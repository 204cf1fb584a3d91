"""Markdown tables from benchmarks/results/zero_overhead.jsonl (written by benchmarks/run_zero_overhead.sh)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

MB = 1e6


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/zero_overhead.jsonl")
    runs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    print("| launcher | model (params) | rank | median step s | median mask s (select s) | mask % of step |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        for r in run["ranks"]:
            print(
                f"| {run['label']} | {run['model']} ({run['parameters'] / 1e6:.1f}M) | {r['rank']} "
                f"| {r['median_step_s']:.2f} | {r['median_mask_s']:.3f} ({r['median_select_s']:.3f}) "
                f"| {r['overhead_pct']:.1f} |"
            )
    print()
    print("| launcher | model (params) | rank | masking collectives per step: calls / bytes |")
    print("|---|---|---|---|")
    for run in runs:
        for r in run["ranks"]:
            calls = ", ".join(f"{c} / {b}" for c, b in zip(r["comm_calls_per_step"], r["comm_bytes_per_step"]))
            print(f"| {run['label']} | {run['model']} ({run['parameters'] / 1e6:.1f}M) | {r['rank']} | {calls} |")
    print()
    print(
        "| launcher | model | rank | param MB | optimizer state MB | grad MB | other MB "
        "| optimizer+grad MB | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        for r in run["ranks"]:
            m = r["memory_bytes"]
            print(
                f"| {run['label']} | {run['model']} | {r['rank']} | {m['param'] / MB:.1f} "
                f"| {m['optimizer_state'] / MB:.1f} | {m['grad'] / MB:.1f} | {m['other_zero'] / MB:.1f} "
                f"| {r['optimizer_plus_grad_bytes'] / MB:.1f} | {r['peak_rss_bytes'] / MB:.0f} |"
            )


if __name__ == "__main__":
    main()
