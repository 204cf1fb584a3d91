"""`uegr-train --config FILE [--section.key value ...]`: fine-tune a model with the configured method."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from uegr_dist.config import ConfigError, load_config
from uegr_dist.data.errors import DataError

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    """Parser for the fixed flags; everything else is a `--section.key value` override."""
    parser = argparse.ArgumentParser(
        prog="uegr-train",
        description="Fine-tune a sequence-classification model with UEGR (or a baseline). Any config key can be "
        "overridden as --section.key value, e.g. --method.dropout.k 3 --train.lr 3e-5.",
    )
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--task", help="a registered task (shorthand for --data.task; see --list-tasks)")
    parser.add_argument("--train-file", help="CSV/TSV/JSON/JSONL/Parquet training file (--data.train_file)")
    parser.add_argument("--validation-file", help="validation file (--data.validation_file)")
    parser.add_argument("--list-tasks", action="store_true", help="print the task registry and exit")
    return parser


SHORTHANDS = {"task": "data.task", "train_file": "data.train_file", "validation_file": "data.validation_file"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `uegr-train` and `python -m uegr_dist.train`; returns the exit code."""
    args, overrides = build_parser().parse_known_args(argv)
    if args.list_tasks:
        from uegr_dist.data.tasks import describe_tasks

        print(describe_tasks())
        return 0
    for flag, key in SHORTHANDS.items():
        if getattr(args, flag) is not None:
            overrides = [f"--{key}", getattr(args, flag), *overrides]
    try:
        cfg = load_config(args.config, overrides)
        from uegr_dist.engine.train_loop import train  # heavy imports only after the config is known to be valid

        result = train(cfg)
    except (ConfigError, DataError) as err:
        print(f"uegr-train: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    final = result.metrics["final"]
    print(f"done: {result.output_dir} | " + ", ".join(f"{k}={v:.4f}" for k, v in final.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
