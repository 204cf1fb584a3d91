#!/usr/bin/env bash
# The GPU targets of benchmarks/README.md in one go, on one lent GPU (H100 / H200: about 7 minutes of device time).
# Run from the repository root on a machine with one CUDA GPU and the package's dependencies installed (wheels of
# missing ones may be put in .whl/, installed to /tmp/site first). Results go to $OUT (default
# benchmarks/results/gpu-checks).
#
#   bash benchmarks/gpu_check.sh              # the default sections: sync bench stacked
#   bash benchmarks/gpu_check.sh --dry-run    # the same commands shrunk to tiny sizes on the CPU (~2 min, no GPU)
#   SECTIONS="sync bench stacked tests zero2 profile" bash benchmarks/gpu_check.sh   # everything (> 8 minutes)
#
# sync:    python -m benchmarks.sync_check: a few vanilla and UEGR steps (roberta-base, bf16) with every step under
#          torch.cuda.set_sync_debug_mode("error") (transformers' own SDPA mask check switched off: it reads whether
#          anything is padded in every forward), then the same in "warn" mode with it on, counting what it adds;
# bench:   python -m benchmarks.throughput: floor (fused AdamW, nothing else) / plain Accelerate / our loop (vanilla,
#          UEGR) on RoBERTa-large and DeBERTa-v3-large (random init from the public configs' sizes, no download),
#          bf16, B 32 x S 128: step times, MFU against the dense bf16 peak, UEGR's utilisation (K + 1 + T passes),
#          the saliency + mask share of a UEGR step, vanilla / plain and vanilla / floor;
# stacked: python -m benchmarks.stacked_forward: the stacked (K + 1)-chunk forward + backward vs K + 1 sequential
#          ones at B 8 and 16 (RoBERTa-large size, bf16);
# tests, zero2, profile (not in the default): the bf16 test runs of every method, UEGR under DeepSpeed ZeRO-2, and a
#          profiled round (torch.profiler) of floor / plain / vanilla / UEGR on roberta-base.
set -uo pipefail
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
SECTIONS=${SECTIONS:-sync bench stacked}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
if (( DRY )); then
  OUT=${OUT:-/tmp/uegr-gpu-check-dry-run}
  DEVICE=cpu DTYPE=fp32 PEAK=1.0
  SYNC_CONFIG=tiny BENCH_CONFIGS="tiny" BATCH=4 SEQ=16 ROUNDS=1 STEPS=2 WARMUP=1
  STACKED_SIZE="--arch roberta --hidden 64 --layers 2 --vocab 1000 --seq 16 --rounds 4" STACKED_BATCHES="4"
  export CUDA_VISIBLE_DEVICES=""
else
  OUT=${OUT:-benchmarks/results/gpu-checks}
  DEVICE=cuda DTYPE=bf16
  SYNC_CONFIG=roberta-base BENCH_CONFIGS="roberta-large deberta-v3-large" BATCH=32 SEQ=128 ROUNDS=1 STEPS=4 WARMUP=2
  STACKED_SIZE="--arch roberta --hidden 1024 --layers 24 --vocab 50265 --seq 128 --rounds 8" STACKED_BATCHES="8 16"
fi
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
started=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - started )) s]"; }
if (( ! DRY )); then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
  # Dense bf16 peak of the GPU for MFU (H100 / H200 SXM: 989 TFLOP/s; A100: 312); PEAK= overrides.
  PEAK=${PEAK:-$($PYTHON -c "import torch; n = torch.cuda.get_device_name(); print(989.0 if ('H100' in n or 'H200' in n) else 312.0 if 'A100' in n else 0)")}
fi
$PYTHON -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" 2>&1 | tail -1 | tee -a "$OUT/machine.txt"
PEAK_ARG=()
if [[ "${PEAK:-0}" != "0" && "${PEAK:-0}" != "0.0" ]]; then PEAK_ARG=(--peak-tflops "$PEAK"); fi

if want sync; then
  echo "== sync: no host synchronization inside vanilla and UEGR steps $(elapsed)"
  timeout "${T_SYNC:-150}" $PYTHON -m benchmarks.sync_check --device "$DEVICE" --dtype "$DTYPE" --config "$SYNC_CONFIG" \
    --methods vanilla uegr --steps 6 --batch 8 --seq "$SEQ" --out-dir "$OUT" --tag "$DEVICE" 2>&1 \
    | grep -v "examples/s" | tail -8 | tee "$OUT/sync_check.log"
fi

if want bench; then
  echo "== bench: floor / plain Accelerate / our loop, vanilla and UEGR $(elapsed)"
  timeout "${T_BENCH:-300}" $PYTHON -m benchmarks.throughput --device "$DEVICE" --dtype "$DTYPE" --configs $BENCH_CONFIGS \
    --methods vanilla uegr --floor --no-naive "${PEAK_ARG[@]}" --batch "$BATCH" --seq "$SEQ" --rounds "$ROUNDS" \
    --steps "$STEPS" --warmup "$WARMUP" --out-dir "$OUT" --tag "$DEVICE" 2>&1 | grep -v "examples/s" | tail -30 \
    | tee "$OUT/throughput.log"
fi

if want stacked; then
  echo "== stacked: (K + 1)-chunk forward + backward vs K + 1 sequential ones $(elapsed)"
  for batch in $STACKED_BATCHES; do
    timeout "${T_STACKED:-60}" $PYTHON -m benchmarks.stacked_forward --device "$DEVICE" --dtype "$DTYPE" $STACKED_SIZE \
      --batch "$batch" --out "$OUT/stacked_forward_b$batch.json" 2>&1 | tail -1 | cut -c1-400
  done
fi

if want tests; then
  echo "== tests: bf16 runs of every method $(elapsed)"
  timeout "${T_TESTS:-120}" $PYTHON -m pytest -q -p no:cacheprovider -k bf16 \
    tests/test_methods_gradient.py tests/test_methods_objective.py 2>&1 | tail -15 | tee "$OUT/bf16_tests.log"
fi

if want zero2; then
  echo "== zero2: UEGR under DeepSpeed ZeRO-2, one process (random roberta-base, the shipped corpus) $(elapsed)"
  $PYTHON - "$DTYPE" <<'PY'
import sys
import yaml
from benchmarks.common import PRESETS
preset = PRESETS["roberta-base"]
cfg = {
    "model": {"init": "random", "architecture": preset["architecture"], "config": preset["config"],
              "tokenizer": "word_level"},
    "data": {"train_file": "uegr_dist/demo/sentiment_train.jsonl",
             "validation_file": "uegr_dist/demo/sentiment_validation.jsonl", "max_length": 64},
    "train": {"output_dir": "/tmp/gpu-zero2", "epochs": 2, "batch_size": 32, "lr": 1e-4,
              "mixed_precision": "bf16" if sys.argv[1] == "bf16" else "no",
              "tracker": "none", "progress": False, "save_every": 0, "overwrite": True, "log_every": 10},
    "method": {"name": "uegr", "mask": {"ratio": 0.3, "exclude": ["classifier"]}},
}
open("/tmp/gpu-zero2.yaml", "w").write(yaml.safe_dump(cfg))
PY
  timeout "${T_ZERO2:-100}" accelerate launch --config_file configs/accelerate/multi-gpu-zero2.yaml --num_processes 1 \
    -m uegr_dist.train --config /tmp/gpu-zero2.yaml 2>&1 | tail -12 | tee "$OUT/uegr_zero2.log"
fi

if want profile; then
  echo "== profile: one profiled round per variant (roberta-base, not measured) $(elapsed)"
  timeout "${T_PROFILE:-120}" $PYTHON -m benchmarks.throughput --device "$DEVICE" --dtype "$DTYPE" --configs roberta-base \
    --methods vanilla uegr --floor --no-naive --batch "$BATCH" --seq "$SEQ" --rounds 1 --steps 3 --warmup 2 --profile \
    --profile-rows 25 --out-dir /tmp/gpu-profile --tag "$DEVICE-profile" 2>&1 | tail -3
  cp /tmp/gpu-profile/profile_"$DEVICE"-profile.txt "$OUT/" 2>/dev/null
fi
echo "== done $(elapsed); results in $OUT"
