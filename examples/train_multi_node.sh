#!/usr/bin/env bash
# DeRS MoE pretraining on several nodes: run this on EVERY node (same settings).
#
#   MASTER_ADDR=node0 NNODES=4 NPROC=8 TP=2 PP=2 EP=8 DATA_PATH=/data/corpus \
#       ./examples/train_multi_node.sh
#
# torchrun's c10d rendezvous on MASTER_ADDR:MASTER_PORT assigns the node ranks;
# RDZV_ID must be the same on all nodes and new for every job: it defaults to the
# scheduler's job id (SLURM_JOB_ID), else set it (e.g. RDZV_ID=run42). Settings:
# examples/common.sh. Extra arguments go to the training script last.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

: "${MASTER_ADDR:?set MASTER_ADDR to the host of the rendezvous (e.g. the first node)}"
MASTER_PORT="${MASTER_PORT:-29500}"
NNODES="${NNODES:?set NNODES}"
NPROC="${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
[ "$NPROC" -gt 0 ] || NPROC=1
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:+ders-$SLURM_JOB_ID}}"
: "${RDZV_ID:?set RDZV_ID to one id for this job, the same on every node (no SLURM_JOB_ID here)}"

exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc-per-node "$NPROC" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
    "$EXAMPLES/pretrain_gpt_ders.py" "${ALL_ARGS[@]}" "$@"
