"""Added parameters of an upcycled MoE, DeRS paper accounting (see ders_megatron/core/accounting.py).

    python tools/param_report.py --preset moe-llava-stablelm --compare
    python tools/param_report.py --hidden-size 4096 --ffn-hidden-size 14336 \\
        --num-layers 32 --num-experts 8 --moe-router-topk 2 --swiglu \\
        --moe-ders lowrank --moe-ders-rank 4 --json out.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from ders_megatron.cli.param_report import param_report_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(param_report_main())
