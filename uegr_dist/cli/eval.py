"""`uegr-eval --model DIR --file FILE --attack char,word-mlm,word-synonym,pgd --output-dir OUT`: robustness of a
saved classifier under offline adversarial attacks (also `python -m uegr_dist.cli.eval`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uegr_dist.config.loading import ConfigError, merge, parse_overrides
from uegr_dist.data.errors import DataError

EXIT_BAD_INPUT = 2

# flag -> dotted config key (flags left unset do not override the YAML)
_FLAGS = {
    "model": "model",
    "file": "data.file",
    "task": "data.task",
    "task_path": "data.task_path",
    "split": "data.split",
    "text_column": "data.text_column",
    "text_pair_column": "data.text_pair_column",
    "label_column": "data.label_column",
    "max_examples": "data.max_examples",
    "max_length": "data.max_length",
    "output_dir": "output_dir",
    "seed": "seed",
    "batch_size": "batch_size",
    "max_word_fraction": "search.max_word_fraction",
    "query_budget": "search.query_budget",
    "target": "search.target",
    "char_edits": "char.edits",
    "max_edits_per_word": "char.max_edits_per_word",
    "max_total_edits": "char.max_total_edits",
    "mlm_model": "word_mlm.model",
    "mlm_top_k": "word_mlm.top_k",
    "synonym_file": "word_synonym.file",
    "cosine_threshold": "word_synonym.cosine_threshold",
    "pgd_norms": "pgd.norms",
    "pgd_eps_l2": "pgd.eps_l2",
    "pgd_eps_linf": "pgd.eps_linf",
    "pgd_steps": "pgd.steps",
    "pgd_step_size": "pgd.step_size",
}
_LISTS = {"char_edits": str, "pgd_norms": str, "pgd_eps_l2": float, "pgd_eps_linf": float}


def build_parser() -> argparse.ArgumentParser:
    """The fixed flags; any other key of the eval config can be given as --section.key value."""
    p = argparse.ArgumentParser(
        prog="uegr-eval",
        description="Robustness of a saved classifier under offline adversarial attacks: clean accuracy, accuracy "
        "under attack, attack success rate, queries, %% words perturbed. Writes OUT/summary.json, OUT/report.md and "
        "OUT/examples_<attack>.jsonl. Any config key can also be set as --section.key value (e.g. "
        "--char.max_candidates_per_word 32).",
    )
    p.add_argument("--config", help="YAML eval config (keys: see uegr_dist/robustness/config.py)")
    p.add_argument("--model", help="directory saved by uegr-train (model.safetensors, config.json, tokenizer)")
    p.add_argument("--file", help="CSV/TSV/JSON/JSONL/Parquet file with text and label columns")
    p.add_argument(
        "--task", help="a registered task instead of --file (e.g. adv_sst2, anli_r1, hans; uegr-train --list-tasks)"
    )
    p.add_argument(
        "--task-path",
        help="local copy of the task (default: the Hub): a save_to_disk folder, the GLUE download's task folder "
        "(SST-2/: dev.tsv, ...), or AdvGLUE's dev.json; uegr-train --list-tasks lists the layouts",
    )
    p.add_argument(
        "--split",
        help="the task's split: validation (default), test (with a GLUE folder: its labelled test_labeled.tsv), "
        "mismatched (MNLI)",
    )
    p.add_argument("--text-column", help="default: text")
    p.add_argument("--text-pair-column", help="second text of a pair (NLI hypothesis); default: none")
    p.add_argument("--label-column", help="default: label (ids, or names from the model's label2id)")
    p.add_argument(
        "--attack",
        help="comma list of char, word-mlm, word-synonym, pgd (default: char,pgd); none = clean accuracy only",
    )
    p.add_argument("--output-dir", help="where summary.json, report.md, examples_<attack>.jsonl go")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/summary.json")
    p.add_argument("--max-examples", type=int, help="attack the first N rows (default 1000)")
    p.add_argument("--max-length", type=int, help="tokens per input (default 128)")
    p.add_argument("--seed", type=int, help="seeds every random choice (default 0)")
    p.add_argument("--batch-size", type=int, help="model inputs per forward (default 32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--max-word-fraction", type=float, help="most words an attack may change (default 0.3)")
    p.add_argument("--query-budget", type=int, help="model inputs per example (default 2000)")
    p.add_argument("--target", help="auto | text | text_pair: which text of a pair is edited (default auto)")
    p.add_argument("--char-edits", help="comma list of swap, substitute, delete, insert, keyboard (default all)")
    p.add_argument("--max-edits-per-word", type=int, help="edit distance per word (default 1)")
    p.add_argument("--max-total-edits", type=int, help="edit distance per text (default 30)")
    p.add_argument("--mlm-model", help="masked LM path or Hub id for word-mlm")
    p.add_argument("--mlm-top-k", type=int, help="candidates per word from the masked LM (default 48)")
    p.add_argument("--synonym-file", help="`word syn1 syn2 ...` lines or a word-vector text file for word-synonym")
    p.add_argument("--cosine-threshold", type=float, help="word vectors: least cosine of a synonym (default 0.5)")
    p.add_argument("--pgd-norms", help="comma list of l2, linf (default both)")
    p.add_argument("--pgd-eps-l2", help="comma list of L2 radii in embedding units")
    p.add_argument("--pgd-eps-linf", help="comma list of Linf radii in embedding units")
    p.add_argument("--pgd-steps", type=int, help="ascent steps per eps (default 10)")
    p.add_argument("--pgd-step-size", type=float, help="step length as a fraction of eps (default 0.25)")
    return p


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def flags_to_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Set flags -> nested config mapping (comma lists split; bad numbers raise ConfigError naming the flag)."""
    tree: dict[str, Any] = {}
    for name, dotted in _FLAGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if name in _LISTS:
            try:
                value = [_LISTS[name](v.strip()) for v in value.split(",") if v.strip()]
            except ValueError as err:
                raise ConfigError(f"--{name.replace('_', '-')} = {getattr(args, name)!r}: {err}") from err
        _set(tree, dotted, value)
    if args.attack is not None:
        tree["attacks"] = [a.strip() for a in args.attack.split(",") if a.strip() and a.strip() != "none"]
    if args.overwrite:
        tree["overwrite"] = True
    if args.no_progress:
        tree["progress"] = False
    return tree


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `uegr-eval`; returns the exit code (2 on bad input, nothing written)."""
    args, extra = build_parser().parse_known_args(argv)
    try:
        from uegr_dist.robustness.config import load_eval_config

        overrides = merge(flags_to_overrides(args), parse_overrides(extra))
        cfg = load_eval_config(args.config, overrides)
        if cfg.output_dir is None:
            raise ConfigError("output_dir = None: give --output-dir (where summary.json, report.md and the rows go)")
        from uegr_dist.robustness.runner import evaluate_robustness  # heavy imports after the config is valid

        summary = evaluate_robustness(cfg)
    except (ConfigError, DataError) as err:
        print(f"uegr-eval: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    parts = [f"clean={summary['clean']['accuracy']:.4f}"]
    for name, m in summary["attacks"].items():
        if "curve" in m:
            parts.append(f"{name}@eps={m['curve'][-1]['eps']:g}={m['curve'][-1]['accuracy']:.4f}")
        else:
            parts.append(f"{name}={m['attacked_accuracy']:.4f}")
    print(f"done: {cfg.output_dir} | " + ", ".join(parts))
    record_in_model_card(cfg.model, summary)
    return 0


def record_in_model_card(model: str, summary: dict[str, Any]) -> None:
    """Add the results to the model directory's robustness_results.json and model card (process 0; a directory that
    cannot be written, e.g. a read-only copy, only gets a warning)."""
    directory = Path(model)
    if int(os.environ.get("RANK", "0")) != 0 or not directory.is_dir():
        return
    from uegr_dist.engine.model_card import record_robustness

    try:
        record_robustness(directory, summary)
    except OSError as err:
        print(f"uegr-eval: warning: the results were not added to {directory}'s model card: {err}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
