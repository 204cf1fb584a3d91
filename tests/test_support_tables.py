"""docs/methods.md's support tables say exactly what the tests run.

Every DDP / ZeRO-1/2/3 / bf16 cell of the two tables is derived here from the lists the tests themselves iterate
(the distributed launches' run lists per stage, their default and opt-in stages, the start-up refusal tests, the
one-process bf16 tests), so a table edited without a test, or a test changed without its table, fails here. Cells
(see docs/methods.md): "exact", "exact (opt-in)", "refused: <reason>", "not tested", each optionally followed by
"; <note>"; a bf16 cell lists where bf16 runs: "one process, DDP, ZeRO-2; opt-in: ZeRO-1, ZeRO-3" or "not tested".
"""

from __future__ import annotations

import re
from collections import defaultdict

import pytest

from tests import test_averaging as averaging_unit
from tests import test_methods_gradient as gradient_unit
from tests import test_methods_gradient_distributed as gradient_dist
from tests import test_methods_objective as objective_unit
from tests import test_methods_objective_distributed as objective_dist
from tests import test_zero_masking as zero_masking
from tests.test_zero_masking import REPO

DOC = REPO / "docs" / "methods.md"
HEADER = "| method | one process | DDP | ZeRO-1 | ZeRO-2 | ZeRO-3 | bf16 |"
BACKENDS = {"DDP": "ddp", "ZeRO-1": "zero1", "ZeRO-2": "zero2", "ZeRO-3": "zero3"}
BF16_ORDER = ["one process", "DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3"]
# Table row -> the run name the tests use for it.
ROWS = {
    "`vanilla`": "vanilla",
    "`uegr` and its ablation presets": "uegr",
    "`rdrop`": "rdrop",
    "`freelb`": "freelb",
    "`smart`, Bregman term on (`bregman_mu > 0`)": "smart",
    "`smart`, `bregman_mu: 0` (default)": "smart_plain",
    "`hype`": "hype",
    "`asa`": "asa",
    "`childtuning_d`": "childtuning_d",
    "`childtuning_f`": "childtuning_f",
    "`roast`": "roast",
    "`sam`": "sam",
    "`sam` ASAM (`adaptive`)": "asam",
    "`sam` mSAM (`m_shards`)": "msam",
    "`mat` (`rng: keyed`)": "mat",
    "`delta_sam`": "delta_sam",
    "`fisher_sam`": "fisher_sam",
    "`awp` (`objective: vanilla`)": "awp",
    "`awp`, `objective: uegr` (`rng: keyed`)": "awp_uegr",
    "`awp`, `objective: freelb` (`rng: keyed`)": "awp_freelb",
    "`train.average: swa` (any method)": "swa",
    "`train.average: ema` (any method)": "ema",
}
# Runs that are options of another method (its refusals apply).
METHOD_OF_RUN = {"asam": "sam", "msam": "sam", "awp_uegr": "awp", "awp_freelb": "awp"}
BF16_SUFFIX = "-bf16"


def doc_rows() -> dict[str, dict[str, str]]:
    """Row label -> {column: cell} over every support table of docs/methods.md."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    rows: dict[str, dict[str, str]] = {}
    columns = [cell.strip() for cell in HEADER.strip("|").split("|")]
    for i, line in enumerate(lines):
        if line.strip() != HEADER:
            continue
        for row in lines[i + 2 :]:
            if not row.startswith("|"):
                break
            cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
            assert len(cells) == len(columns), row
            assert cells[0] not in rows, f"row {cells[0]} appears twice"
            rows[cells[0]] = dict(zip(columns, cells))
    return rows


def covered() -> tuple[dict[tuple[str, str], str], dict[str, dict[str, str]], set[tuple[str, str]]]:
    """What the tests run: exact[(run, stage)] and bf16[run][where] = "default" | "opt-in"; refused (run, stage)."""
    exact: dict[tuple[str, str], str] = {}
    bf16: dict[str, dict[str, str]] = defaultdict(dict)
    names = {v: k for k, v in BACKENDS.items()}

    def add(run: str, stage: str, how: str) -> None:
        stage = stage.partition("-")[0]  # a launch named backend-<part> (e.g. zero1-flat) tests that backend
        if run.endswith(BF16_SUFFIX):
            bf16[run.removesuffix(BF16_SUFFIX)].setdefault(names[stage], how)
        else:
            exact.setdefault((run, stage), how)

    for module, stage_runs in (
        (objective_dist, objective_dist.STAGE_RUNS),
        (gradient_dist, {stage: runs for stage, (_, runs) in gradient_dist.STAGES.items()}),
    ):
        for stage in module.DEFAULT_STAGES:
            for run in stage_runs[stage]:
                add(run, stage, "default")
        for stage in module.OPT_IN_STAGES:
            for run in stage_runs[stage]:
                add(run, stage, "opt-in")
    for stage in zero_masking.STAGES:  # UEGR's own launches, all in the default suite (zero3-offload is ZeRO-3)
        exact.setdefault(("uegr", stage.removesuffix("-offload")), "default")
    # One process in bf16: the unit tests, and the 1-process bf16 reference runs of the objective launches (their
    # losses are checked finite there).
    for run in [
        *gradient_unit.BF16_ONE_PROCESS,
        *objective_unit.E2E,
        *objective_dist.BF16.values(),
        *averaging_unit.BF16_ONE_PROCESS,
    ]:
        bf16[run]["one process"] = "default"
    refused = {(cfg["name"], "zero3") for cfg, _ in objective_unit.ZERO3_REFUSALS}
    refused |= {(method, "zero3") for method in [*gradient_unit.ZERO3_REFUSED, *averaging_unit.ZERO3_REFUSED]}
    return exact, bf16, refused


def expected_backend_cell(run: str, stage: str) -> str:
    exact, _, refused = covered()
    if (run, stage) in exact:
        return "exact" if exact[(run, stage)] == "default" else "exact (opt-in)"
    if (METHOD_OF_RUN.get(run, run), stage) in refused or (run, stage) in refused:
        return "refused"
    return "not tested"


def expected_bf16_cell(run: str) -> str:
    where = covered()[1].get(run, {})
    default = [w for w in BF16_ORDER if where.get(w) == "default"]
    opt_in = [w for w in BF16_ORDER if where.get(w) == "opt-in"]
    if not default and not opt_in:
        return "not tested"
    return ", ".join(default) + (f"; opt-in: {', '.join(opt_in)}" if opt_in else "")


def test_tables_list_every_method_once():
    assert set(doc_rows()) == set(ROWS)


@pytest.mark.parametrize("row", list(ROWS))
def test_cells_match_what_the_tests_run(row):
    cells, run = doc_rows()[row], ROWS[row]
    for column, stage in BACKENDS.items():
        status = re.split(r"[;:]", cells[column], maxsplit=1)[0].strip()
        assert status == expected_backend_cell(run, stage), (row, column, cells[column])
        if status == "refused":
            assert cells[column].startswith("refused: ") and len(cells[column]) > len("refused: "), (row, column)
    assert cells["bf16"] == expected_bf16_cell(run), (row, "bf16")


def test_every_distributed_run_has_a_row():
    """No run of the distributed tests is left out of the tables (a new method needs its row)."""
    exact, bf16, _ = covered()
    runs = {run for run, _ in exact} | set(bf16)
    assert runs <= set(ROWS.values()), runs - set(ROWS.values())
