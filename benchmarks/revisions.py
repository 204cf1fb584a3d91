"""`benchmarks.throughput` at a git revision and in the working tree, round by round in turn: a before / after table.

    python -m benchmarks.revisions --before a186ead --rounds 2 -- --configs roberta-base --threads 1 --steps 3 \\
        --warmup 1 --no-naive

Each round runs `python -m benchmarks.throughput <args> --rounds 1` once on the code of `--before` (exported with
`git archive` into a temporary directory) and once on the working tree, alternating which goes first, so that the
machine's drift hits both alike (a whole training loop cannot be swapped inside one process). The step records of
all rounds are pooled per revision and variant; the table gives both revisions' medians and stages side by side with
the throughput targets' ratios. The arguments after `--` go to both revisions' throughput.py, so they must exist in
both. Writes results/revisions_<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info
from benchmarks.throughput import STAGES, ratios, stage_breakdown

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def export(revision: str, dest: Path) -> Path:
    """The tree of `revision` as plain files under dest (no git metadata is touched)."""
    archive = dest / "tree.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), revision], cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest / "tree", filter="data")
    return dest / "tree"


def run_round(tree: Path, args: list[str], out: Path, tag: str) -> dict[str, Any]:
    """One round of the throughput benchmark on the code in `tree`; its JSON result."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", "benchmarks.throughput", *args, "--rounds", "1", "--out-dir", str(out)]
    subprocess.run([*command, "--tag", tag], cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / f"throughput_{tag}.json").read_text(encoding="utf-8"))


def pooled(results: list[dict[str, Any]], adversary_steps: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows and ratios of several one-round results of the same grid, their step records pooled."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for result in results:
        for row in result["rows"]:
            key = (row["config"], row["k"], row["seq"], row["batch"], row["variant"])
            if key not in rows:
                rows[key] = {**row, "step_records": []}
            rows[key]["step_records"].extend(row["step_records"])
    out_rows = []
    for row in rows.values():
        stages = stage_breakdown(row["step_records"])
        step = stages.pop("step")
        flops = None if row["tflops"] is None else row["tflops"] * 1e12 * row["step_s"]
        out_rows.append(
            {
                **row,
                "step_s": step,
                "samples_per_s": row["batch"] / step,
                "tflops": None if flops is None else flops / step / 1e12,
                "stages_s": stages,
                "measured_steps": len(row["step_records"]),
            }
        )
    points: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in out_rows:
        points.setdefault((row["config"], row["k"], row["seq"], row["batch"]), []).append(row)
    return out_rows, [ratios(group, group[0]["k"], adversary_steps) for group in points.values()]


def render(before: str, tables: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]], command: str) -> str:
    """Markdown: per variant the step and stages at both revisions, then the targets' ratios."""
    lines = [f"```bash\n{command}\n```", ""]
    lines.append("| config | variant | revision | step s | " + " | ".join(STAGES) + " |")
    lines.append("|---" * (4 + len(STAGES)) + "|")
    names = list(tables)
    for row in tables[names[0]][0]:
        for name in names:
            match = next(
                r
                for r in tables[name][0]
                if (r["config"], r["variant"], r["k"], r["seq"], r["batch"])
                == (row["config"], row["variant"], row["k"], row["seq"], row["batch"])
            )
            stages = " | ".join(f"{match['stages_s'][s]:.3f}" for s in STAGES)
            lines.append(f"| {row['config']} | {row['variant']} | {name} | {match['step_s']:.3f} | {stages} |")
    lines += [
        "",
        "| config | revision | UEGR / (K+1+T) vanilla | saliency+mask % of UEGR step | vanilla / plain Accelerate "
        "| vanilla / floor |",
        "|---|---|---|---|---|---|",
    ]
    for index, point in enumerate(tables[names[0]][1]):
        for name in names:
            r = tables[name][1][index]
            mask = r.get("mask_fraction")

            def fmt(value: Any, digits: int) -> str:
                return "n/a" if value is None else f"{value:.{digits}f}"

            lines.append(
                f"| {point['config']} | {name} | {fmt(r.get('uegr_over_floor'), 2)} "
                f"| {fmt(None if mask is None else 100 * mask, 1)} | {fmt(r.get('vanilla_over_plain'), 3)} "
                f"| {fmt(r.get('vanilla_over_floor'), 3)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, forwarded = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.revisions", description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, metavar="REV")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(ours)
    adversary_steps = (
        int(forwarded[forwarded.index("--adversary-steps") + 1]) if "--adversary-steps" in forwarded else 1
    )
    results: dict[str, list[dict[str, Any]]] = {args.before: [], "working tree": []}
    with tempfile.TemporaryDirectory(prefix="uegr_revisions_") as tmp:
        trees = {args.before: export(args.before, Path(tmp)), "working tree": ROOT}
        out = Path(tmp) / "out"
        for round_index in range(args.rounds):
            order = list(trees) if round_index % 2 == 0 else list(reversed(trees))
            for name in order:
                tag = f"{'before' if name == args.before else 'after'}-{round_index}"
                results[name].append(run_round(trees[name], forwarded, out, tag))
                print(f"round {round_index}: {name} done", flush=True)
    tables = {name: pooled(runs, adversary_steps) for name, runs in results.items()}
    command = "python -m benchmarks.revisions " + " ".join(shlex.quote(a) for a in argv)
    markdown = render(args.before, tables, command)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "command": command,
        "machine": machine_info(),
        "revisions": {name: {"rows": rows, "ratios": r} for name, (rows, r) in tables.items()},
    }
    (args.out_dir / f"revisions_{args.tag}.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    (args.out_dir / f"revisions_{args.tag}.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
