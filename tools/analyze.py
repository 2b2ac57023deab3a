"""DeRS analysis plots of a vanilla MoE checkpoint (PNG, matplotlib Agg).

    python tools/analyze.py similarity --load moe_ckpt --dense dense_ckpt --out cos.png
    python tools/analyze.py sweep --load moe_ckpt --base dense --dense dense_ckpt \\
        --sweep-codecs dare:0.5,dare:0.9,dare:0.99 --eval-data heldout.npy --out sweep.png

similarity: cosine between the dense FFN and each expert per layer (paper Fig. 1);
sweep: held-out loss against drop rate / bit width (paper Figs. 4-6).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron's jit fuser is torch.compile

from ders_megatron.cli.analyze import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
