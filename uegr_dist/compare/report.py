"""Tables and plots of a suite's results: mean ± std over seeds per task and method (never best-of-N)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

ID_COLUMNS = ("task", "method", "seed", "main_metric")
COST_COLUMNS = ("wall_seconds", "train_seconds", "samples_per_second")


def _stats(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one seed) and count of the finite values."""
    finite = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan"), 0
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    return float(np.mean(finite)), std, len(finite)


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (task, method): for every numeric column, mean / std / n over the seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["method"]), []).append(row)
    out = []
    for (task, method), members in groups.items():
        entry: dict[str, Any] = {"task": task, "method": method, "main_metric": members[0]["main_metric"]}
        entry["seeds"] = sorted(r["seed"] for r in members)
        columns = sorted({k for r in members for k in r if k not in ID_COLUMNS})
        for column in columns:
            mean, std, n = _stats([r[column] for r in members if column in r])
            entry[column] = {"mean": mean, "std": std, "n": n}
        out.append(entry)
    return out


CLEAN_SPLIT_COLUMNS = ("validation_acc", "test_acc", "mismatched_acc")
"""Columns of `robustness.clean_splits`: clean accuracy on a split scored by uegr-eval, not a robustness score."""


def robustness_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The accuracy columns from uegr-eval: clean split columns first, then the robustness columns (sorted)."""
    present = {k for r in rows for k in r if "_acc" in k}
    clean = [c for c in CLEAN_SPLIT_COLUMNS if c in present]
    return clean + sorted(present - set(clean))


def curve_columns(rows: list[dict[str, Any]]) -> dict[str, list[tuple[float, str]]]:
    """PGD curve points (`pgd_<norm>@<eps>` columns) per curve name, sorted by eps."""
    curves: dict[str, list[tuple[float, str]]] = {}
    for column in sorted({k for r in rows for k in r if "@" in k}):
        name, _, eps = column.partition("@")
        curves.setdefault(name, []).append((float(eps), column))
    return {name: sorted(points) for name, points in curves.items()}


def _fmt(cell: dict[str, float] | None, digits: int = 3) -> str:
    if not cell or cell["n"] == 0:
        return "–"
    if cell["n"] == 1:  # one seed: there is no spread to show (a "± 0" would claim one)
        return f"{cell['mean']:.{digits}f}"
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


def markdown_table(summary: list[dict[str, Any]], rows: list[dict[str, Any]], suite_name: str) -> str:
    """Per task: method, headline metric, robustness columns, wall time, throughput (mean ± std over seeds)."""
    rob = robustness_columns(rows)
    lines = [f"# Suite {suite_name}", "", "Mean ± sample std over seeds (n = number of seeds that finished).", ""]
    for task in dict.fromkeys(e["task"] for e in summary):
        entries = [e for e in summary if e["task"] == task]
        metric = entries[0]["main_metric"]
        header = ["method", "n", metric, *rob, "wall time (s)", "train samples/s"]
        lines += [f"## {task}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for e in entries:
            n = e.get(metric, {}).get("n", 0)
            cells = [e["method"], str(n), _fmt(e.get(metric)), *(_fmt(e.get(c)) for c in rob)]
            cells += [_fmt(e.get("wall_seconds"), 0), _fmt(e.get("samples_per_second"), 1)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_results(rows: list[dict[str, Any]], out: Path, suite_name: str, failed: list[str]) -> dict[str, Path]:
    """results.csv (one row per run), results.json (runs + aggregate + failures), table.md, and PNG plots."""
    out.mkdir(parents=True, exist_ok=True)
    summary = aggregate(rows)
    columns = list(ID_COLUMNS) + sorted({k for r in rows for k in r if k not in ID_COLUMNS})
    paths = {"csv": out / "results.csv", "json": out / "results.json", "table": out / "table.md"}
    with paths["csv"].open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    paths["json"].write_text(
        json.dumps({"suite": suite_name, "runs": rows, "summary": summary, "failed": failed}, indent=2),
        encoding="utf-8",
    )
    table = markdown_table(summary, rows, suite_name)
    if failed:
        table += "\nRuns that failed (not in the table):\n\n" + "\n".join(f"- {f}" for f in failed) + "\n"
    paths["table"].write_text(table, encoding="utf-8")
    paths.update(plot(summary, rows, out))
    return paths


def plot(summary: list[dict[str, Any]], rows: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    """accuracy_vs_robustness_<task>.png (clean accuracy vs each robustness column, one point per method with std
    error bars; clean = the first clean split column, e.g. test_acc, else the headline metric), pgd_<task>.png (the
    PGD curves, mean ± std over seeds) and cost.png (wall time and throughput per method, relative to the first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: dict[str, Path] = {}
    columns = robustness_columns(rows)
    clean_columns = [c for c in columns if c in CLEAN_SPLIT_COLUMNS]
    rob = [c for c in columns if c not in CLEAN_SPLIT_COLUMNS]
    nan = {"mean": float("nan"), "std": 0.0}
    for task in dict.fromkeys(e["task"] for e in summary):
        entries = [e for e in summary if e["task"] == task]
        x_column = next((c for c in clean_columns if any(c in e for e in entries)), entries[0]["main_metric"])
        y_columns = [c for c in rob if any(c in e for e in entries)] or [None]
        fig, axes = plt.subplots(1, len(y_columns), figsize=(4.6 * len(y_columns), 4), squeeze=False)
        for ax, y_column in zip(axes[0], y_columns):
            for e in entries:
                x = e.get(x_column, nan)
                y = e.get(y_column, nan) if y_column else {"mean": 0.0, "std": 0.0}
                ax.errorbar(x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], fmt="o", capsize=3, label=e["method"])
                ax.annotate(e["method"], (x["mean"], y["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.set_xlabel(f"clean {x_column}")
            ax.set_ylabel(y_column or "(no robustness evaluation)")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{task}: accuracy vs robustness (mean ± std over seeds)")
        paths[f"plot_{task}"] = _save(fig, out / f"accuracy_vs_robustness_{task}.png")

        curves = curve_columns([r for r in rows if r["task"] == task])
        if curves:
            fig, axes = plt.subplots(1, len(curves), figsize=(4.6 * len(curves), 4), squeeze=False)
            for ax, (name, points) in zip(axes[0], curves.items()):
                for e in entries:
                    cells = [e.get(column, nan) for _, column in points]
                    ax.errorbar(
                        [eps for eps, _ in points],
                        [c["mean"] for c in cells],
                        yerr=[c["std"] for c in cells],
                        marker="o",
                        capsize=3,
                        label=e["method"],
                    )
                ax.set_xlabel(f"{name} eps")
                ax.set_ylabel("accuracy under PGD")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
            fig.suptitle(f"{task}: PGD curves (mean ± std over seeds)")
            paths[f"pgd_{task}"] = _save(fig, out / f"pgd_{task}.png")

    methods = list(dict.fromkeys(e["method"] for e in summary))
    wall = [_stats([r["wall_seconds"] for r in rows if r["method"] == m])[0] for m in methods]
    speed = [_stats([r["samples_per_second"] for r in rows if r["method"] == m])[0] for m in methods]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, values, label in ((axes[0], wall, "wall time per run"), (axes[1], speed, "train samples/s")):
        ref = values[0] if values and values[0] else float("nan")
        ax.bar(methods, [v / ref for v in values])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{label} (relative to {methods[0]})")
        ax.tick_params(axis="x", rotation=45)
    paths["plot_cost"] = _save(fig, out / "cost.png")
    return paths


def _save(fig: Any, path: Path) -> Path:
    """Lay out, write (120 dpi) and close a figure; its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
