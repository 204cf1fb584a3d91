"""Write an evaluation: OUT/summary.json, OUT/report.md (markdown tables), OUT/examples_<attack>.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def markdown_report(summary: dict[str, Any]) -> str:
    """The summary as markdown: one table for the text attacks, one accuracy-vs-eps table per PGD norm."""
    lines = [
        f"# Robustness of `{summary['model']}`",
        "",
        f"Data: `{summary['data']}`, {summary['n_examples']} examples, seed {summary['seed']}. "
        f"Clean accuracy: {summary['clean']['accuracy']:.4f}.",
        "",
    ]
    text = {k: v for k, v in summary["attacks"].items() if "curve" not in v}
    if text:
        lines += [
            "| attack | clean acc. | acc. under attack | attack success rate | avg. queries | % words perturbed |",
            "|---|---|---|---|---|---|",
        ]
        for name, m in text.items():
            lines.append(
                f"| {name} | {m['clean_accuracy']:.4f} | {m['attacked_accuracy']:.4f} | "
                f"{m['attack_success_rate']:.4f} | {m['avg_queries']:.1f} | {m['pct_words_perturbed']:.1f} |"
            )
        lines.append("")
    for name, m in summary["attacks"].items():
        if "curve" not in m:
            continue
        lines += [f"## {name} (embedding PGD, {m['steps']} steps of {m['step_size']} eps)", ""]
        lines += ["| eps | accuracy | attack success rate |", "|---|---|---|"]
        lines += [f"| {p['eps']:g} | {p['accuracy']:.4f} | {p['attack_success_rate']:.4f} |" for p in m["curve"]]
        lines.append("")
    return "\n".join(lines)


def write_report(out: Path, summary: dict[str, Any], rows: dict[str, list[dict[str, Any]]]) -> None:
    """Write the JSONL rows of every attack, then report.md, then summary.json last (its presence marks a finished
    evaluation)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, attack_rows in rows.items():
        with (out / f"examples_{name}.jsonl").open("w", encoding="utf-8") as handle:
            for row in attack_rows:
                handle.write(json.dumps(row) + "\n")
    (out / "report.md").write_text(markdown_report(summary), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
