"""`uegr-train --config FILE [--section.key value ...]`: fine-tune a model with the configured method."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from uegr_dist.config import ConfigError, load_config
from uegr_dist.data.errors import DataError
from uegr_dist.data.preflight import check_data_inputs

EXIT_BAD_INPUT = 2
EXIT_PUSH_FAILED = 4
"""The run finished and saved everything, but train.push_to_hub could not upload it."""
# Also: 3 = too many non-finite steps in a row (guard.EXIT_NONFINITE), 75 = preempted after a checkpoint
# (guard.EXIT_PREEMPTED); both leave every checkpoint written so far intact.


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
    parser.add_argument(
        "--resume",
        metavar="auto|none|PATH",
        help="shorthand for --train.resume: auto continues from the newest complete checkpoint in train.output_dir",
    )
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
    if args.resume is not None:
        overrides = [*overrides, "--train.resume", args.resume]
    try:
        cfg = load_config(args.config, overrides)
        check_data_inputs(cfg.data)  # files, columns, task names: at once, before the training stack loads
        # Heavy imports only after the config and data settings are known to be valid.
        from uegr_dist.engine.checkpoint import CheckpointError
        from uegr_dist.engine.guard import EXIT_NONFINITE, EXIT_PREEMPTED, NonFiniteLossError, Preempted
        from uegr_dist.engine.train_loop import train

        try:
            result = train(cfg)
        except CheckpointError as err:
            print(f"uegr-train: error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except NonFiniteLossError as err:
            print(f"uegr-train: error: {err}", file=sys.stderr)
            return EXIT_NONFINITE
        except Preempted as err:
            print(f"uegr-train: {err}", file=sys.stderr)
            return EXIT_PREEMPTED
    except (ConfigError, DataError) as err:
        print(f"uegr-train: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    final = result.metrics["final"]
    print(f"done: {result.output_dir} | " + ", ".join(f"{k}={v:.4f}" for k, v in final.items()))
    if cfg.train.push_to_hub and int(os.environ.get("RANK", "0")) == 0:
        from uegr_dist.engine.model_card import PushError, push_to_hub

        try:
            print(f"pushed to {push_to_hub(result.output_dir, cfg.train.push_to_hub)}")
        except PushError as err:
            print(f"uegr-train: error: {err}", file=sys.stderr)
            return EXIT_PUSH_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
