"""Peak memory of the streamed import, export and upcycling against the largest layer
(ders_megatron/convert/memory_bench.py; figures in docs/benchmarks.md).

    python tools/bench_memory.py                                   # the 2 GB bf16 model (a few minutes)
    python tools/bench_memory.py --export-max-shard-size 256MB --steps import export upcycle reference
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron's jit fuser is torch.compile

from ders_megatron.cli.bench_memory import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
