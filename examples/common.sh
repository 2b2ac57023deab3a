# Shared settings of the launch scripts: sourced, not run. Every value can be
# overridden from the environment, e.g. NUM_EXPERTS=16 DERS=sparse ./train_single_node.sh
#
# The model is a GPT whose MoE layers are DeRS experts (one shared base + a
# light delta per expert). All Megatron-LM flags keep their meaning; add more
# after the script's arguments ("$@" is passed last, so it overrides these).

EXAMPLES="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO="$(dirname "$EXAMPLES")"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python

# ---- model (a ~1B-class shape by default; shrink for a smoke test) ---------
NUM_LAYERS="${NUM_LAYERS:-24}"
HIDDEN="${HIDDEN:-2048}"
FFN="${FFN:-5632}"
HEADS="${HEADS:-16}"
SEQ="${SEQ:-2048}"
NUM_EXPERTS="${NUM_EXPERTS:-8}"
TOPK="${TOPK:-2}"
MOE_LAYER_FREQ="${MOE_LAYER_FREQ:-2}"          # every other layer is MoE (as MoE-LLaVA)

# ---- DeRS ---------------------------------------------------------------------
DERS="${DERS:-lowrank}"                         # lowrank | sparse | dense | vanilla
DERS_RANK="${DERS_RANK:-4}"                     # lowrank
DERS_DROP_RATE="${DERS_DROP_RATE:-0.99}"        # sparse
DERS_IMPL="${DERS_IMPL:-dropin}"                # dropin | fused

# ---- parallelism and batch ----------------------------------------------------
TP="${TP:-1}"
PP="${PP:-1}"
EP="${EP:-1}"
MBS="${MBS:-2}"
GBS="${GBS:-256}"
TRAIN_ITERS="${TRAIN_ITERS:-10000}"

# ---- data, checkpoints, logs ----------------------------------------------------
# DATA_PATH: a prefix written by tools/preprocess_data.py (or a blend
# "0.7 a 0.3 b"); empty -> --mock-data. TOKENIZER_ARGS: what it printed.
DATA_PATH="${DATA_PATH:-}"
TOKENIZER_ARGS="${TOKENIZER_ARGS:---tokenizer-type NullTokenizer --vocab-size 257}"
CKPT="${CKPT:-$REPO/checkpoints/gpt-ders-$DERS}"

MODEL_ARGS=(
    --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --ffn-hidden-size "$FFN"
    --num-attention-heads "$HEADS" --seq-length "$SEQ" --max-position-embeddings "$SEQ"
    --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear
    --untie-embeddings-and-output-weights
    --num-experts "$NUM_EXPERTS" --moe-router-topk "$TOPK" --moe-layer-freq "$MOE_LAYER_FREQ"
    --moe-token-dispatcher-type alltoall --moe-router-load-balancing-type aux_loss
    --moe-aux-loss-coeff 1e-2
)
DERS_ARGS=(--moe-ders "$DERS")
case "$DERS" in
    lowrank) DERS_ARGS+=(--moe-ders-rank "$DERS_RANK" --moe-ders-impl "$DERS_IMPL") ;;
    sparse) DERS_ARGS+=(--moe-ders-drop-rate "$DERS_DROP_RATE" --moe-ders-impl "$DERS_IMPL") ;;
    dense) DERS_ARGS+=(--moe-ders-impl "$DERS_IMPL") ;;
esac
PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --expert-model-parallel-size "$EP"
)
[ "$TP" -gt 1 ] && PARALLEL_ARGS+=(--sequence-parallel)
TRAIN_ARGS=(
    --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$TRAIN_ITERS"
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-fraction 0.01
    --clip-grad 1.0 --weight-decay 0.1 --adam-beta2 0.95
    --log-interval 10 --eval-interval 500 --eval-iters 10
    --save "$CKPT" --load "$CKPT" --save-interval 500
)
# shellcheck disable=SC2206  # word splitting intended
DATA_ARGS=($TOKENIZER_ARGS)
if [ -n "$DATA_PATH" ]; then
    # shellcheck disable=SC2206
    DATA_ARGS+=(--data-path $DATA_PATH --split 98,2,0)
else
    DATA_ARGS+=(--mock-data)
fi

# CPU=1: the CPU runtime (gloo; no CUDA needed), for smoke tests on a laptop.
DEVICE_ARGS=(--bf16)
if [ "${CPU:-0}" = 1 ]; then
    DEVICE_ARGS=(--cpu)
    export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
    # Megatron asserts it for TP/CP > 1 before Blackwell (megatron/training/arguments.py:1413-1439);
    # FSDP runs want it unset: export CUDA_DEVICE_MAX_CONNECTIONS= (empty) to opt out.
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS-1}"
    [ -n "$CUDA_DEVICE_MAX_CONNECTIONS" ] || unset CUDA_DEVICE_MAX_CONNECTIONS
    # Megatron's default --transformer-impl is transformer_engine: use it where TE is
    # installed, else the local layers (TRANSFORMER_IMPL overrides).
    if [ -z "${TRANSFORMER_IMPL:-}" ]; then
        if "$PYTHON" -c "import transformer_engine.pytorch" >/dev/null 2>&1; then
            TRANSFORMER_IMPL=transformer_engine
        else
            TRANSFORMER_IMPL=local
        fi
    fi
    DEVICE_ARGS+=(--transformer-impl "$TRANSFORMER_IMPL")
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
ALL_ARGS=("${MODEL_ARGS[@]}" "${DERS_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${TRAIN_ARGS[@]}"
          "${DATA_ARGS[@]}" "${DEVICE_ARGS[@]}")
