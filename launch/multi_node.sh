#!/usr/bin/env bash
# Several nodes: run this script once on every node, with the same MAIN_ADDR/MAIN_PORT and its own NODE_RANK.
#   NNODES=2 NODE_RANK=0 MAIN_ADDR=10.0.0.1 GPUS_PER_NODE=8 launch/multi_node.sh CONFIG.yaml [overrides...]
# ACCEL_CONFIG (default configs/accelerate/multi-node.yaml) picks the DeepSpeed/DDP set-up.
set -euo pipefail
config=${1:?usage: launch/multi_node.sh CONFIG.yaml [overrides...]}
shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MAIN_ADDR:?set MAIN_ADDR}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_PORT=${MAIN_PORT:-29500}
ACCEL_CONFIG=${ACCEL_CONFIG:-configs/accelerate/multi-node.yaml}
exec accelerate launch --config_file "$ACCEL_CONFIG" \
    --num_machines "$NNODES" --machine_rank "$NODE_RANK" \
    --num_processes $((NNODES * GPUS_PER_NODE)) \
    --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" \
    -m uegr_dist.train --config "$config" "$@"
