"""The held-out split of the hyperparameter search (docs/results.md, "Choosing the defaults"): only the study's
4,000-row training slice of SST-2 is read, never dev, test or AdvGLUE.

    python docs/results/make_search_split.py --task-path data/sst2 --out outputs/sst2-search/data

takes the same seeded slice the study trains on (`data.max_train_samples: 4000`, `max_train_samples_seed: 0`) and
splits it with a fixed seed into search_train.jsonl (3,400 rows) and heldout.jsonl (600 rows). heldout.jsonl lists
the held-out phrases of at least 6 words first (in random order), then the others: the suite's attacks take the first
rows of the file, and a character attack on a 1- or 2-word phrase ("good") has almost nothing to edit. Rows are
{"text", "label"} with SST-2's label ids (0 negative, 1 positive).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from uegr_dist.config.schema import DataConfig
from uegr_dist.data.text_classification import load_raw_task

SLICE, HELDOUT, SPLIT_SEED, MIN_WORDS = 4000, 600, 0, 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task-path", required=True, help="the GLUE SST-2 folder (train.tsv, dev.tsv)")
    parser.add_argument("--out", default="outputs/sst2-search/data")
    args = parser.parse_args()
    cfg = DataConfig(task="sst2", task_path=args.task_path, max_train_samples=SLICE, max_train_samples_seed=0)
    train = load_raw_task(cfg, seed=0).train
    rows = [{"text": r["sentence"], "label": int(r["label"])} for r in train]
    assert len(rows) == SLICE, len(rows)
    order = np.random.RandomState(SPLIT_SEED).permutation(SLICE)
    heldout = [rows[i] for i in order[:HELDOUT]]
    heldout = [r for r in heldout if len(r["text"].split()) >= MIN_WORDS] + [
        r for r in heldout if len(r["text"].split()) < MIN_WORDS
    ]
    search_train = [rows[i] for i in sorted(order[HELDOUT:])]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("search_train.jsonl", search_train), ("heldout.jsonl", heldout)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    long = sum(len(r["text"].split()) >= MIN_WORDS for r in heldout)
    print(f"{out}: search_train {len(search_train)} rows, heldout {len(heldout)} rows ({long} of >= {MIN_WORDS} words)")


if __name__ == "__main__":
    main()
