"""Several methods in sequence through the real `train()`, in one process or under `accelerate launch`.

Run as `python tests/distributed/methods_run.py SPEC REPORT` where SPEC is a JSON file {"base": <config dict>,
"runs": {name: <overrides dict>}}. Each run trains into base.train.output_dir/<name> (the saved model is what the
distributed tests compare); rank 0 writes REPORT (JSON): per run, the logged training losses, the final metrics and
the mixed precision accelerate used.
Runs may differ in anything, `train.mixed_precision` included. A run preempted (`UEGR_DEBUG_SIGNAL_AT`, after its
checkpoint) is reported as {"preempted": step} and the next run starts.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import shared_group
from accelerate.state import AcceleratorState

from uegr_dist.config import load_config
from uegr_dist.config.loading import merge
from uegr_dist.engine.guard import Preempted
from uegr_dist.engine.train_loop import train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("report")
    args = parser.parse_args()
    spec = json.loads(Path(args.spec).read_text())
    shared_group.keep()  # the runs of one launch share one process group
    report = {}
    for name, overrides in spec["runs"].items():
        # accelerate's other process-wide state fixes the mixed precision of the first Accelerator: clear it, so
        # that runs of one launch can differ in `train.mixed_precision` (the process group stays).
        AcceleratorState._reset_state(reset_partial_state=False)
        raw = merge(spec["base"], overrides)
        raw["train"] = {**raw["train"], "output_dir": str(Path(spec["base"]["train"]["output_dir"]) / name)}
        try:
            result = train(load_config(None, raw))
        except Preempted as cut:  # UEGR_DEBUG_SIGNAL_AT: checkpoint written; the next run goes on
            report[name] = {"preempted": cut.step}
            continue
        report[name] = {
            "losses": [e["loss"] for e in result.metrics["train_loss"]],
            "final": result.metrics["final"],
            # What accelerate actually used (DeepSpeed: its config's bf16 / fp16 switch).
            "mixed_precision": AcceleratorState().mixed_precision,
        }
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.report).write_text(json.dumps(report, indent=2), encoding="utf-8")
    shared_group.close()


if __name__ == "__main__":
    main()
