"""Tables of docs/results.md from the study's outputs (run after `uegr-compare` finished the suites):

    python docs/results/make_results.py --study outputs/sst2-advglue-cpu --search outputs/sst2-search \
        --task-path data/sst2 --advglue data/advglue/dev.json --out docs/results

writes docs/results/sst2-advglue-cpu.md (the tables pasted into docs/results.md), sst2-advglue-cpu.json (the numbers,
per run and aggregated), search.md and copies the suite's plots. Besides mean ± sample std over seeds it gives, for
each score and method, the difference to vanilla with a 95 % interval from a paired bootstrap over the evaluation
rows (each row's correctness averaged over the seeds, 10,000 resamples): the std says how much training seeds move a
score, the interval how much the finite evaluation set does (AdvGLUE sst2 has 148 rows). Per-row correctness comes
from uegr-eval's examples_<attack>.jsonl (char, PGD) and, for the clean test set and AdvGLUE, from predicting again
with each saved model (checked against the accuracy uegr-eval recorded).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np

COLUMNS = [
    ("accuracy", "SST-2 dev"),
    ("test_acc", "SST-2 test"),
    ("adv_sst2_acc", "AdvGLUE sst2"),
    ("char_acc", "char attack"),
    ("pgd_l2_mean_acc", "PGD L2 (mean)"),
]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _predict(model_dir: Path, task: str, task_path: str, split: str, expected: float) -> np.ndarray:
    """Per-row correctness (0/1) of a saved model on a task split, checked against uegr-eval's accuracy.

    Kept per run in robustness/correct_<task>_<split>.json beside uegr-eval's reports and reused while it still matches
    the saved model's weights (modification time and size) and uegr-eval's accuracy: rerunning this script after
    more runs finished predicts only the new ones."""
    weights = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    stamp = [[p.name, p.stat().st_mtime_ns, p.stat().st_size] for p in weights]
    cache = model_dir / "robustness" / f"correct_{task}_{split}.json"
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        correct = np.array(saved.get("correct", []), float)
        if saved.get("weights") == stamp and len(correct) and abs(correct.mean() - expected) <= 1e-9:
            return correct
    correct = _predict_again(model_dir, task, task_path, split, expected)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"weights": stamp, "correct": correct.astype(int).tolist()}), encoding="utf-8")
    return correct


def _predict_again(model_dir: Path, task: str, task_path: str, split: str, expected: float) -> np.ndarray:
    import torch

    from uegr_dist.robustness.config import EvalDataConfig
    from uegr_dist.robustness.examples import load_examples
    from uegr_dist.robustness.victim import load_victim

    victim = load_victim(str(model_dir), batch_size=128, max_length=128)
    cfg = EvalDataConfig(task=task, task_path=task_path, split=split, max_examples=10**9)
    examples = load_examples(cfg, {}, victim.num_labels)
    with torch.no_grad():
        probs = victim.probabilities([e.text for e in examples])
    correct = (probs.argmax(-1).numpy() == np.array([e.label for e in examples])).astype(float)
    if abs(correct.mean() - expected) > 1e-9:
        raise SystemExit(f"{model_dir}: {task} {split}: accuracy {correct.mean()} != uegr-eval's {expected}")
    return correct


def per_row(run_dir: Path, row: dict, task_path: str, advglue: str) -> dict[str, np.ndarray]:
    """Per-row correctness arrays of one run: test, adv_sst2, char, pgd_l2@eps."""
    rob = run_dir / "robustness"
    out = {}
    if "test_acc" in row:
        out["test_acc"] = _predict(run_dir, "sst2", task_path, "test", row["test_acc"])
    if "adv_sst2_acc" in row:
        out["adv_sst2_acc"] = _predict(run_dir, "adv_sst2", advglue, "validation", row["adv_sst2_acc"])
    char = rob / "test" / "examples_char.jsonl"
    if char.is_file():
        rows = _jsonl(char)
        out["char_acc"] = np.array(
            [r["clean_prediction"] == r["label"] and r["status"] != "success" for r in rows], float
        )
        assert abs(out["char_acc"].mean() - row["char_acc"]) < 1e-9, run_dir
    pgd = rob / "test" / "examples_pgd_l2.jsonl"
    if pgd.is_file():
        rows = _jsonl(pgd)
        correct = np.array([r["correct"] for r in rows], float)  # [rows, eps]
        eps = rows[0]["eps"]
        positive = [j for j, e in enumerate(eps) if e > 0]
        out["pgd_l2_mean_acc"] = correct[:, positive].mean(axis=1)
        for j, e in enumerate(eps):
            out[f"pgd_l2@{e:g}"] = correct[:, j]
    return out


def bootstrap_difference(a: np.ndarray, b: np.ndarray, n: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over rows and a 95 % percentile interval from resampling rows (paired)."""
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n, len(diff)))].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _stats(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (None for a single seed: there is no spread to show)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def _num(mean: float, std: float | None, digits: int) -> str:
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _pct(mean: float, std: float | None = None) -> str:
    return _num(100 * mean, None if std is None else 100 * std, 1)


def study_tables(study: Path, task_path: str, advglue: str) -> tuple[str, dict]:
    results = json.loads((study / "results.json").read_text(encoding="utf-8"))
    runs = results["runs"]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    task = runs[0]["task"]
    rows_by_method: dict[str, dict[str, list[np.ndarray]]] = {m: {} for m in methods}
    for r in runs:
        arrays = per_row(study / r["task"] / r["method"] / f"seed-{r['seed']}", r, task_path, advglue)
        for key, value in arrays.items():
            rows_by_method[r["method"]].setdefault(key, []).append(value)
    lines = [
        "| method | seeds | " + " | ".join(label for _, label in COLUMNS) + " | train samples/s | train time (min) |",
        "|---|---|" + "---|" * len(COLUMNS) + "---|---|",
    ]
    agg: dict = {}
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        cells = []
        agg[m] = {"seeds": sorted(r["seed"] for r in mine)}
        for key, _ in COLUMNS:
            values = [r[key] for r in mine if key in r]
            if not values:
                cells.append("–")
                continue
            mean, std = _stats(values)
            agg[m][key] = {"mean": mean, "std": std, "values": values}
            cell = _pct(mean, std)
            if key == "adv_sst2_acc":
                se = math.sqrt(mean * (1 - mean) / len(rows_by_method[m][key][0]))
                agg[m][key]["standard_error_rows"] = se
                cell += f" (SE {100 * se:.1f})"
            cells.append(cell)
        speed = _stats([r["samples_per_second"] for r in mine])
        minutes = _stats([r["train_seconds"] / 60 for r in mine])
        agg[m]["samples_per_second"] = {"mean": speed[0], "std": speed[1]}
        agg[m]["train_minutes"] = {"mean": minutes[0], "std": minutes[1]}
        agg[m]["wall_minutes"] = _stats([r["wall_seconds"] / 60 for r in mine])
        cells += [_num(*speed, 1), _num(*minutes, 0)]
        lines.append(f"| {m} | {len(mine)} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)

    # PGD curve: mean ± std per eps.
    eps_keys = sorted({k for r in runs for k in r if k.startswith("pgd_l2@")}, key=lambda k: float(k.split("@")[1]))
    curve = [
        "| method | " + " | ".join(f"ε = {k.split('@')[1]}" for k in eps_keys) + " |",
        "|---|" + "---|" * len(eps_keys),
    ]
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        curve.append(f"| {m} | " + " | ".join(_pct(*_stats([r[k] for r in mine if k in r])) for k in eps_keys) + " |")

    # Differences to vanilla: seed-averaged per-row correctness, paired bootstrap over rows.
    diff_keys = [
        ("test_acc", "SST-2 test"),
        ("adv_sst2_acc", "AdvGLUE sst2"),
        ("char_acc", "char attack"),
        ("pgd_l2_mean_acc", "PGD L2 (mean)"),
    ]
    diffs = [
        "| method − vanilla | " + " | ".join(label for _, label in diff_keys) + " |",
        "|---|" + "---|" * len(diff_keys),
    ]
    base = {k: np.mean(v, axis=0) for k, v in rows_by_method.get("vanilla", {}).items()}
    for m in methods:
        if m == "vanilla" or not base:
            continue
        cells = []
        for key, _ in diff_keys:
            if key not in rows_by_method[m] or key not in base:
                cells.append("–")
                continue
            mean, lo, hi = bootstrap_difference(np.mean(rows_by_method[m][key], axis=0), base[key])
            agg[m].setdefault("minus_vanilla", {})[key] = {"mean": mean, "ci95": [lo, hi]}
            cells.append(f"{100 * mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]")
        diffs.append(f"| {m} | " + " | ".join(cells) + " |")
    text = "\n\n".join(
        [
            f"### {task}: mean ± std over seeds (%)",
            table,
            "### PGD L2 curve (accuracy %, 300 test sentences)",
            "\n".join(curve),
            "### Difference to vanilla (points; 95 % paired bootstrap over evaluation rows)",
            "\n".join(diffs),
        ]
    )
    return text + "\n", {"suite": results["suite"], "runs": runs, "aggregate": agg, "failed": results["failed"]}


def search_table(search: Path) -> str:
    results = json.loads((search / "results.json").read_text(encoding="utf-8"))
    runs = results["runs"]
    eps_keys = sorted(
        {k for r in runs for k in r if k.startswith("pgd_l2@") and not k.endswith("@0")},
        key=lambda k: float(k.split("@")[1]),
    )
    header = [
        "setting",
        "held-out acc. (600)",
        "char attack (100)",
        "PGD L2 mean",
        *(f"PGD ε={k.split('@')[1]}" for k in eps_keys),
        "train samples/s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        cells = [
            r["method"],
            _pct(r["accuracy"]),
            _pct(r.get("char_acc", float("nan"))),
            _pct(r.get("pgd_l2_mean_acc", float("nan"))),
            *(_pct(r[k]) for k in eps_keys),
            f"{r['samples_per_second']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", help="the sst2-advglue-cpu suite's output_dir")
    parser.add_argument("--search", help="the sst2-search-cpu suite's output_dir")
    parser.add_argument("--task-path", default="data/sst2")
    parser.add_argument("--advglue", default="data/advglue/dev.json")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.search:
        (out / "search.md").write_text(search_table(Path(args.search)), encoding="utf-8")
        print((out / "search.md").read_text(encoding="utf-8"))
    if args.study:
        study = Path(args.study)
        text, data = study_tables(study, args.task_path, args.advglue)
        name = data["suite"]
        (out / f"{name}.md").write_text(text, encoding="utf-8")
        (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        for png in study.glob("*.png"):
            shutil.copy(png, out / f"{name}-{png.name}")
        print(text)


if __name__ == "__main__":
    main()
