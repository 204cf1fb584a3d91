#!/usr/bin/env bash
# One-GPU checks and throughput, in one go (a lent GPU machine is short-lived): run from the repository root on a
# machine with one CUDA GPU, torch, transformers and accelerate installed. Results go to $OUT (default
# benchmarks/results/gpu). Wheels of the other dependencies may be put in .whl/ (installed to /tmp/site first).
#
#   bash benchmarks/gpu_check.sh
#
# 1. every method's bf16 test run (tests/test_methods_*.py -k bf16) on the GPU (accelerate picks CUDA);
# 2. UEGR (random roberta-base, shipped corpus) under DeepSpeed ZeRO-2, bf16, one process: the mask inside the ZeRO step;
# 3. python -m benchmarks.throughput on roberta-base and roberta-large, bf16, batch 32 x 128 tokens;
# 4. a profiled round (torch.profiler) of plain Accelerate, vanilla and UEGR on roberta-base: profile_gpu.txt.
# SECTIONS="tests zero2 bench profile" (the default: all) picks sections.
set -uo pipefail
SECTIONS=${SECTIONS:-tests zero2 bench profile}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
OUT=${OUT:-benchmarks/results/gpu-checks}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
python3 -c "import torch, transformers, accelerate, deepspeed, datasets, pyarrow; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'deepspeed', deepspeed.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)" 2>&1 | tail -1 | tee -a "$OUT/machine.txt"

if want tests; then
echo "== 1. bf16 runs of every method on the GPU"
timeout "${T_TESTS:-120}" python3 -m pytest -q -p no:cacheprovider -k bf16 \
  tests/test_methods_gradient.py tests/test_methods_objective.py 2>&1 | tail -15 | tee "$OUT/bf16_tests.log"
fi

if want zero2; then
echo "== 2. UEGR under DeepSpeed ZeRO-2, bf16, one GPU (random roberta-base, the shipped sentiment corpus)"
python3 - <<'PY'
import yaml
from benchmarks.common import PRESETS
preset = PRESETS["roberta-base"]
cfg = {
    "model": {"init": "random", "architecture": preset["architecture"], "config": preset["config"],
              "tokenizer": "word_level"},
    "data": {"train_file": "uegr_dist/demo/sentiment_train.jsonl",
             "validation_file": "uegr_dist/demo/sentiment_validation.jsonl", "max_length": 64},
    "train": {"output_dir": "/tmp/gpu-zero2", "epochs": 2, "batch_size": 32, "lr": 1e-4, "mixed_precision": "bf16",
              "tracker": "none", "progress": False, "save_every": 0, "overwrite": True, "log_every": 10},
    "method": {"name": "uegr", "mask": {"ratio": 0.3, "exclude": ["classifier"]}},
}
open("/tmp/gpu-zero2.yaml", "w").write(yaml.safe_dump(cfg))
PY
timeout "${T_DEMO:-100}" accelerate launch --config_file configs/accelerate/multi-gpu-zero2.yaml --num_processes 1 \
  -m uegr_dist.train --config /tmp/gpu-zero2.yaml 2>&1 | tail -12 | tee "$OUT/uegr_zero2.log"
fi

if want bench; then
echo "== 3. throughput"
timeout "${T_BENCH:-300}" python3 -m benchmarks.throughput --device cuda --dtype bf16 \
  --configs roberta-base roberta-large --batch 32 --seq 128 --rounds 2 --steps 3 --warmup 2 \
  --out-dir "$OUT" --tag gpu-h100 2>&1 | tail -40 | tee "$OUT/throughput.log"
fi

if want profile; then
echo "== 4. profile (roberta-base, one round per variant, not measured)"
timeout "${T_PROFILE:-120}" python3 -m benchmarks.throughput --device cuda --dtype bf16 --configs roberta-base \
  --methods vanilla uegr --no-naive --batch 32 --seq 128 --rounds 1 --steps 3 --warmup 2 --profile --profile-rows 25 \
  --out-dir /tmp/gpu-profile --tag gpu 2>&1 | tail -3
cp /tmp/gpu-profile/profile_gpu.txt "$OUT/" 2>/dev/null
fi
