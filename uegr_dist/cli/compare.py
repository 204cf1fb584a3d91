"""`uegr-compare --suite FILE`: train every method on every task with every seed, score robustness with
`uegr-eval`, and write results.csv / results.json / table.md / PNG plots. Finished runs are skipped, so running
the same command again continues an interrupted suite (and only rebuilds the report when all is done)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from uegr_dist.config import ConfigError

EXIT_BAD_INPUT = 2
EXIT_RUNS_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uegr-compare", description=__doc__)
    parser.add_argument("--suite", required=True, help="suite YAML (e.g. configs/suites/offline-small.yaml)")
    parser.add_argument("--output-dir", help="where runs and results go (default: the suite's output_dir)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    parser.add_argument("--report-only", action="store_true", help="rebuild the tables and plots from finished runs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--shard",
        type=_shard,
        metavar="I/N",
        help="run only every N-th run, starting with the I-th (1 <= I <= N): N invocations with 1/N .. N/N share a "
        "suite (e.g. two single-threaded workers on a 2-core CPU); each reports all runs finished so far",
    )
    parser.add_argument(
        "--methods",
        metavar="A,B",
        help="run only these methods of the suite (comma-separated names); the report still covers every finished run",
    )
    return parser


def _shard(value: str) -> tuple[int, int]:
    index, _, count = value.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected I/N, e.g. 1/2") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"{value!r}: need 1 <= I <= N")
    return i, n


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from uegr_dist.compare import collect, execute, load_suite, write_results
    from uegr_dist.compare.runner import train_finished
    from uegr_dist.compare.suite import preflight

    try:
        suite = load_suite(args.suite, args.output_dir)
    except ConfigError as err:
        print(f"uegr-compare: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(
        f"suite {suite.name}: {len(suite.methods)} methods x {len(suite.tasks)} tasks x {len(suite.seeds)} seeds = "
        f"{len(suite.runs)} runs -> {suite.output_dir}"
    )
    mine = suite.runs
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in suite.methods]
        if unknown:
            print(f"uegr-compare: error: --methods: {unknown[0]!r} is not a method of the suite", file=sys.stderr)
            return EXIT_BAD_INPUT
        mine = [run for run in mine if run.method in wanted]
    if args.shard:
        i, n = args.shard
        print(f"shard {i}/{n}: {len(mine[i - 1 :: n])} of the {len(mine)} runs")
        mine = mine[i - 1 :: n]
    if args.dry_run:
        for run in mine:
            print(f"  {run.key:40} {'finished' if train_finished(run) else 'to run'}")
        return 0
    failed: list[str] = []
    if not args.report_only:
        problems = preflight(suite, [run for run in mine if not train_finished(run)])
        if problems:
            for problem in problems:
                print(f"uegr-compare: error: {problem}", file=sys.stderr)
            return EXIT_BAD_INPUT
        outcomes = execute(suite, progress=not args.no_progress, runs=mine)
        counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "skipped", "failed")}
        print(f"runs: {counts['done']} done, {counts['skipped']} already finished, {counts['failed']} failed")
        failed = [f"{o.run.key}: {o.message}" for o in outcomes if o.status == "failed"]
        for line in failed:
            print(f"  FAILED {line}", file=sys.stderr)
    rows = collect(suite)
    if not rows:
        print("uegr-compare: no finished runs to report", file=sys.stderr)
        return EXIT_RUNS_FAILED
    paths = write_results(rows, suite.output_dir, suite.name, failed)
    print((suite.output_dir / "table.md").read_text(encoding="utf-8"))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return EXIT_RUNS_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
