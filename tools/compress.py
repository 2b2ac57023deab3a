"""DeRS compression of a trained vanilla MoE checkpoint.

    python tools/compress.py --load moe_ckpt --save ders_ckpt --moe-ders-codecs dare:0.9 \\
        --base dense --dense dense_ckpt --eval-data heldout.npy --json report.json
    python tools/compress.py --load moe_ckpt --save ders_ckpt --moe-ders-codecs 'fc1:quant:4,fc2:svd:16' \\
        --base fisher --calib-data calib.npy

Codecs: dare:P, magnitude:P, quant:K (K in 1,2,3,4,8), svd:R, wsvd:R; bases: dense, mean,
fisher. Prints a size / error / loss report (ders_megatron/convert/compress/report.py).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron's jit fuser is torch.compile

from ders_megatron.cli.compress import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
