#!/usr/bin/env bash
# The GPU check kit, one command (issue 16): ~5 minutes on one H100.
#   bash scripts/gpu_check.sh [OUT_DIR]
# 1. tests/gpu (pytest -m gpu): DeRS layers vs the reference on CUDA (fp32, bf16, every kind,
#    drop-in and fused), TE base linears, a tiny Megatron training run on 1 GPU;
# 2. the MoE layer benchmark on CUDA (dense MLP, SequentialMLP, TEGroupedMLP where TE runs,
#    DeRS drop-in and fused; time and peak memory, ratios to the dense MLP in the same run).
# Prints one table; writes OUT_DIR/{pytest.txt,bench.json,bench.md}.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
OUT="${1:-$ROOT/runs/gpu_check}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('device:', torch.cuda.get_device_name(0))" \
    | tee "$OUT/device.txt" || { echo "gpu_check: no CUDA device here; the kit is skipped" >&2; exit 3; }
start=$(date +%s)
timeout 420 "$PY" -m pytest -q -m gpu -rs tests/gpu tests/test_fused.py -k "gpu_kit or transformer_engine or trains or reference_on_cuda" \
    2>&1 | tee "$OUT/pytest.txt"
pytest_rc=${PIPESTATUS[0]}
timeout 240 "$PY" tools/bench_moe_layer.py --hidden-size 2048 --ffn-hidden-size 8192 --tokens 8192 --num-experts 8 \
    --topk 2 --ranks 4 --drop-rates 0.99 --dtype bfloat16 --warmup 3 --repeats 10 --json "$OUT/bench.json" \
    2>&1 | tee "$OUT/bench.md"
bench_rc=${PIPESTATUS[0]}
echo
echo "| check | result |"
echo "|---|---|"
echo "| device | $(tail -n 1 "$OUT/device.txt" | sed 's/device: //') |"
echo "| tests/gpu (pytest -m gpu) | $(tail -n 1 "$OUT/pytest.txt") (exit $pytest_rc) |"
echo "| layer benchmark | exit $bench_rc, table in $OUT/bench.md |"
echo "| wall time | $(( $(date +%s) - start )) s |"
[ "$pytest_rc" = 0 ] && [ "$bench_rc" = 0 ]
