"""Upcycle a dense megatron-core checkpoint into a DeRS (or vanilla) MoE checkpoint.

    python tools/upcycle.py --load dense_ckpt --save moe_ckpt --num-experts 8 \\
        --moe-router-topk 2 --moe-ders lowrank --moe-ders-rank 4 [--moe-layer-freq 2] \\
        [--moe-ders-shared-expert ders --moe-shared-expert-gate] [--target-ep 4]

Then train from it: examples/pretrain_gpt_ders.py ... --load moe_ckpt --no-load-optim
--no-load-rng (a release checkpoint: iteration 0), with the same MoE/DeRS flags.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron's jit fuser is torch.compile

from ders_megatron.cli.upcycle import main  # noqa: E402

if __name__ == "__main__":  # dist_checkpointing's writer may start a helper process
    sys.exit(main())
