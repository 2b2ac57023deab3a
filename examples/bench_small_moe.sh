#!/usr/bin/env bash
# Issue 17's "small models" figure: seconds per Megatron training iteration of a small
# GPT (hidden 256, 4 layers, FFN 1024, seq 256, 4 experts top-2 in every layer, EP=2 on
# 2 ranks), vanilla MoE vs DeRS-LM r=4 vs DeRS-SM p=0.99, run one after the other and
# printed side by side (median of the iterations after the first WARMUP ones).
#
#   ./examples/bench_small_moe.sh                      # CPU (gloo), 2 ranks, 20 iterations each
#   ITERS=50 MBS=4 GBS=8 ./examples/bench_small_moe.sh
#   CPU=0 ./examples/bench_small_moe.sh                # on 2 GPUs
#
# With EP=2 the DeRS layers are the drop-in experts (the fused layer refuses EP > 1).
# Settings come from examples/common.sh through train_single_node.sh; logs go to $LOGS.
set -euo pipefail
EXAMPLES="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
ITERS="${ITERS:-20}"
WARMUP="${WARMUP:-3}"
LOGS="${LOGS:-$(mktemp -d)}"
export CPU="${CPU:-1}" NPROC=2 EP=2 TP=1 PP=1 NUM_LAYERS=4 HIDDEN=256 FFN=1024 HEADS=4 SEQ=256 \
    NUM_EXPERTS=4 TOPK=2 MOE_LAYER_FREQ=1 MBS="${MBS:-2}" GBS="${GBS:-4}" TRAIN_ITERS="$ITERS" \
    DERS_RANK=4 DERS_DROP_RATE=0.99 DERS_IMPL=dropin

s_per_iter() {  # median s/iter of a Megatron log, iterations after the first $WARMUP
    grep -o 'elapsed time per iteration (ms): [0-9.]*' "$1" | awk '{print $NF}' | tail -n +"$((WARMUP + 1))" |
        sort -g | awk '{v[NR] = $1} END {if (NR == 0) {print "-"; exit} m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.3f\n", m / 1000}'
}

declare -A SECONDS_PER_ITER
for ders in vanilla lowrank sparse; do
    ckpt="$(mktemp -d)"
    echo "== $ders: $ITERS iterations, log $LOGS/$ders.log" >&2
    DERS="$ders" CKPT="$ckpt" "$EXAMPLES/train_single_node.sh" --log-interval 1 --eval-iters 0 \
        --save-interval 1000000 --no-save-optim --no-save-rng >"$LOGS/$ders.log" 2>&1 ||
        { echo "$ders failed: see $LOGS/$ders.log" >&2; exit 1; }
    rm -rf "$ckpt"
    SECONDS_PER_ITER[$ders]="$(s_per_iter "$LOGS/$ders.log")"
done

vanilla="${SECONDS_PER_ITER[vanilla]}"
echo "| model | s/iter (median) | × vanilla | target |"
echo "|---|---|---|---|"
for ders in vanilla lowrank sparse; do
    s="${SECONDS_PER_ITER[$ders]}"
    case "$ders" in
        vanilla) label="vanilla MoE"; target="" ;;
        lowrank) label="DeRS-LM r=4"; target="≤ 0.75" ;;
        sparse) label="DeRS-SM p=0.99"; target="≤ 0.75" ;;
    esac
    ratio="$(awk -v a="$s" -v b="$vanilla" 'BEGIN {if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b}')"
    echo "| $label | $s | $ratio | $target |"
done
