"""Markdown tables and plots from the benchmarks' JSON results, and the generated sections of benchmarks/README.md.

    python -m benchmarks.report benchmarks/results/throughput_cpu.json --readme   # regenerate the README section
    python -m benchmarks.report benchmarks/results/scaling_cpu.json --readme

A README section lies between `<!-- <section>:begin -->` and `<!-- <section>:end -->` (section = the result file's
stem with "_" turned into "-", e.g. throughput-cpu); nothing else in the README is touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STAGE_LABELS = {
    "adversary": "adversary",
    "forward": "forward",
    "backward": "backward",
    "saliency_mask": "saliency+mask",
    "optimizer": "optimizer",
    "communication": "comm",
    "other": "other",
}
README = Path(__file__).resolve().parent / "README.md"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _machine_line(machine: dict[str, Any]) -> str:
    gpu = f", {machine['gpu']} (CUDA {machine.get('cuda')})" if machine.get("gpu") else ""
    load = ", ".join(f"{x:.1f}" for x in machine.get("load_average", []))
    return (
        f"{machine['date_utc']}, {machine['cpu_count']} CPUs{gpu}, {machine['torch_threads']} torch threads, "
        f"load average at the end {load}; torch {machine['torch']}, transformers {machine['transformers']}, "
        f"accelerate {machine['accelerate']}, deepspeed {machine['deepspeed']}, Python {machine['python']}"
    )


def _header(result: dict[str, Any]) -> list[str]:
    """The command that produced a result and the machine it ran on (markdown lines)."""
    return ["```bash", result["command"], "```", "", f"Machine: {_machine_line(result['machine'])}.", ""]


def render_throughput(result: dict[str, Any]) -> str:
    """The per-variant table (throughput, memory, stages) and the targets table of a throughput result."""
    lines = [
        *_header(result),
        "| config (params) | K | S | B | variant | step s | samples/s | tokens/s | TFLOP/s | peak MB | "
        + " | ".join(STAGE_LABELS.values())
        + " |",
        "|---" * (10 + len(STAGE_LABELS)) + "|",
    ]
    for row in result["rows"]:
        stages = " | ".join(_fmt(row["stages_s"][stage]) for stage in STAGE_LABELS)
        lines.append(
            f"| {row['config']} ({row['params'] / 1e6:.1f}M) | {row['k']} | {row['seq']} | {row['batch']} "
            f"| {row['variant']} | {_fmt(row['step_s'])} | {_fmt(row['samples_per_s'], 2)} "
            f"| {_fmt(row['tokens_per_s'], 0)} | {_fmt(row['tflops'], 4)} | {_fmt(row['peak_memory_mb'], 0)} "
            f"| {stages} |"
        )
    lines += [
        "",
        "| config | K | S | B | UEGR / (K+1+T) vanilla (target ≤ 1.1) | sequential / stacked fwd+bwd "
        "(CPU target ≥ 0.95, GPU ≥ 1.3) | saliency+mask % of UEGR step (≤ 3 % base) | UEGR speed-up vs naive "
        "(≥ 1.5) | vanilla / plain Accelerate (≤ 1.02) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["ratios"]:
        mask = r.get("mask_fraction")
        lines.append(
            f"| {r['config']} | {r['k']} | {r['seq']} | {r['batch']} | {_fmt(r.get('uegr_over_floor'), 2)} "
            f"| {_fmt(r.get('stacked_speedup'), 2)} | {_fmt(None if mask is None else 100 * mask, 1)} "
            f"| {_fmt(r.get('uegr_over_naive_speedup'), 2)} | {_fmt(r.get('vanilla_over_plain'), 3)} |"
        )
    if any("vanilla_over_floor" in r or "vanilla_mfu" in r for r in result["ratios"]):
        lines += [
            "",
            "| config | K | S | B | floor MFU | plain MFU | vanilla MFU (≥ 35 %) "
            "| UEGR utilisation, K+1+T passes (≥ 30 %) | plain / floor | vanilla / floor |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["ratios"]:
            percent = {key: None if r.get(key) is None else 100 * r[key] for key in _MFU_KEYS}
            lines.append(
                f"| {r['config']} | {r['k']} | {r['seq']} | {r['batch']} "
                + " ".join(f"| {_fmt(percent[key], 1)}" for key in _MFU_KEYS)
                + f" | {_fmt(r.get('plain_over_floor'), 3)} | {_fmt(r.get('vanilla_over_floor'), 3)} |"
            )
    return "\n".join(lines) + "\n"


_MFU_KEYS = ("floor_mfu", "plain_mfu", "vanilla_mfu", "uegr_utilisation")


def render_scaling(result: dict[str, Any]) -> str:
    """The 1 vs 2 process table of a scaling result."""
    lines = [
        *_header(result),
        "| method | launcher | processes | threads/process | global batch | step s | samples/s | "
        "speed-up vs 1 process | comm s/step | peak RSS MB per rank | RSS added MB per rank |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        rss = " / ".join(f"{r / 1e6:.0f}" for r in row["peak_rss_bytes"])
        added = " / ".join(f"{r / 1e6:.0f}" for r in row["added_rss_bytes"])
        lines.append(
            f"| {row['method']} | {row['launcher']} | {row['processes']} | {row['threads']} | {row['global_batch']} "
            f"| {_fmt(row['step_s'])} | {_fmt(row['samples_per_s'], 2)} | {_fmt(row.get('speedup'), 2)} "
            f"| {_fmt(row['communication_s'])} | {rss} | {added} |"
        )
    return "\n".join(lines) + "\n"


def render(result: dict[str, Any]) -> str:
    """Markdown for a throughput or scaling result."""
    return render_scaling(result) if result.get("kind") == "scaling" else render_throughput(result)


def plot(result: dict[str, Any], path: Path) -> None:
    """PNG: one panel per grid point, a horizontal bar per variant split into its stages (seconds per step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in result["rows"]:
        points.setdefault((row["config"], row["k"], row["seq"], row["batch"]), []).append(row)
    fig, axes = plt.subplots(
        len(points), 1, figsize=(9, 1.2 + 0.55 * max(len(v) for v in points.values()) * len(points))
    )
    axes = [axes] if len(points) == 1 else list(axes)
    colors = plt.get_cmap("tab10").colors
    for ax, ((config, k, seq, batch), rows) in zip(axes, points.items()):
        names = [row["variant"] for row in rows]
        left = [0.0] * len(rows)
        for i, (stage, label) in enumerate(STAGE_LABELS.items()):
            if stage == "communication":
                continue  # part of the stage it runs in: stacking it would count it twice
            widths = [row["stages_s"][stage] for row in rows]
            ax.barh(names, widths, left=left, color=colors[i], label=label)
            left = [a + b for a, b in zip(left, widths)]
        ax.set_title(f"{config}, K={k}, S={seq}, B={batch}: seconds per optimizer step", fontsize=9)
        ax.invert_yaxis()
        ax.tick_params(labelsize=8)
    axes[0].legend(fontsize=7, ncol=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(readme: Path, markdown: str, section: str) -> None:
    """Replace the README's generated `section` (between its markers) by `markdown`; append it when absent."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = readme.read_text(encoding="utf-8")
    block = f"{begin}\n<!-- generated by python -m benchmarks.report: do not edit by hand -->\n{markdown}{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Print the markdown of a result JSON; with --readme, also put it into benchmarks/README.md."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="a throughput_*.json or scaling_*.json")
    parser.add_argument("--readme", action="store_true", help="update the result's section of benchmarks/README.md")
    parser.add_argument("--plot", type=Path, default=None, help="also write the PNG (throughput results)")
    args = parser.parse_args(argv)
    try:
        result = json.loads(args.result.read_text(encoding="utf-8"))
        markdown = render(result)
    except (OSError, ValueError, KeyError) as err:
        parser.error(f"{args.result}: not a benchmark result ({err})")
    print(markdown)
    if args.plot:
        plot(result, args.plot)
    if args.readme:
        update_readme(README, markdown, section=args.result.stem.replace("_", "-"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
