#!/usr/bin/env bash
# DeRS MoE pretraining on one node: torchrun, one process per GPU.
#
#   DATA_PATH=data/kjv NPROC=8 TP=2 EP=4 ./examples/train_single_node.sh
#   # CPU smoke test (2 ranks, tiny model, mock data):
#   CPU=1 NPROC=2 EP=2 NUM_LAYERS=2 HIDDEN=64 FFN=128 HEADS=4 SEQ=64 NUM_EXPERTS=4 \
#     MOE_LAYER_FREQ=1 MBS=2 GBS=4 TRAIN_ITERS=10 ./examples/train_single_node.sh --log-interval 1
#
# Settings (model, DeRS, parallelism, data, checkpoints): examples/common.sh.
# Extra arguments are passed to the training script last (they win).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NPROC="${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
[ "$NPROC" -gt 0 ] || NPROC=1

exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    "$EXAMPLES/pretrain_gpt_ders.py" "${ALL_ARGS[@]}" "$@"
