"""Robustness metrics from per-example JSONL rows (the summary is always recomputable from the rows)."""

from __future__ import annotations

from typing import Any


def summarize_text_attack(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows of one text attack -> the literature's metrics (TextAttack conventions).

    clean_accuracy = correct before the attack / n; attacked_accuracy = correct after it / n (skipped = already
    wrong); attack_success_rate = successes / attacked (attacked = correct before); avg_queries over attacked
    examples; pct_words_perturbed = mean over successful attacks of 100 * words changed / words in the text."""
    n = len(rows)
    success = [r for r in rows if r["status"] == "success"]
    failed = [r for r in rows if r["status"] == "failed"]
    attacked = success + failed
    return {
        "n_examples": n,
        "n_success": len(success),
        "n_failed": len(failed),
        "n_skipped": n - len(attacked),
        "clean_accuracy": len(attacked) / n if n else 0.0,
        "attacked_accuracy": len(failed) / n if n else 0.0,
        "attack_success_rate": len(success) / len(attacked) if attacked else 0.0,
        "avg_queries": sum(r["queries"] for r in attacked) / len(attacked) if attacked else 0.0,
        "pct_words_perturbed": (
            sum(100.0 * r["words_changed"] / max(1, r["num_words"]) for r in success) / len(success) if success else 0.0
        ),
        "avg_edit_distance": sum(r["edit_distance"] for r in success) / len(success) if success else 0.0,
    }


def summarize_pgd(rows: list[dict[str, Any]], norm: str, steps: int, step_size: float) -> dict[str, Any]:
    """Rows of one PGD norm -> accuracy (and success rate among clean-correct examples) at every eps."""
    n = len(rows)
    clean_correct = sum(r["clean_prediction"] == r["label"] for r in rows)
    curve = []
    for j, eps in enumerate(rows[0]["eps"] if rows else []):
        correct = sum(r["correct"][j] for r in rows)
        curve.append(
            {
                "eps": eps,
                "accuracy": correct / n,
                "attack_success_rate": (clean_correct - correct) / clean_correct if clean_correct else 0.0,
            }
        )
    return {
        "norm": norm,
        "steps": steps,
        "step_size": step_size,
        "n_examples": n,
        "clean_accuracy": clean_correct / n if n else 0.0,
        "curve": curve,
    }
