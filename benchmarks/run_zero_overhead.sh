#!/usr/bin/env bash
# Every launch behind benchmarks/README.md's tables; appends rank 0's JSON lines to benchmarks/results/zero_overhead.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
ACC=${ACCELERATE:-accelerate}
OUT=benchmarks/results/zero_overhead.jsonl
mkdir -p benchmarks/results
run() {  # run STAGE MODEL VOCAB
    "$ACC" launch --config_file "configs/accelerate/cpu-2proc-$1.yaml" -m benchmarks.zero_overhead \
        --model "$2" --vocab "$3" --steps 4 --label "$1" --out "$OUT"
}
run zero2 base 50265
run zero3 base 50265
run ddp base 50265
run zero1 base 50265
run zero2 tiny 8192
run zero3 tiny 8192
