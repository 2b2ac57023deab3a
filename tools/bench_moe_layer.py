"""MoE layer benchmark: dense MLP vs megatron MoE vs DeRS drop-in vs DeRS fused (ders_megatron/convert/bench.py).

    python tools/bench_moe_layer.py                          # the full sweep (minutes on a CPU)
    python tools/bench_moe_layer.py --topk 2 --ranks 4 --drop-rates --repeats 3   # a quick look
    python tools/bench_moe_layer.py --hidden-size 512 --ffn-hidden-size 2048 --tokens 4096 --json out.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from ders_megatron.cli.bench_moe_layer import bench_moe_layer_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(bench_moe_layer_main())
