#!/usr/bin/env bash
# One node, N processes (GPUs, or CPU processes over gloo) through accelerate.
#   launch/single_node.sh CONFIG.yaml [ACCELERATE_CONFIG] [--section.key value ...]
# ACCELERATE_CONFIG defaults to configs/accelerate/single-gpu.yaml; e.g. configs/accelerate/multi-gpu-zero2.yaml.
set -euo pipefail
config=${1:?usage: launch/single_node.sh CONFIG.yaml [ACCELERATE_CONFIG] [overrides...]}
shift
accel=configs/accelerate/single-gpu.yaml
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then accel=$1; shift; fi
exec accelerate launch --config_file "$accel" -m uegr_dist.train --config "$config" "$@"
