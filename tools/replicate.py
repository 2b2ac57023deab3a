"""The replication study: does DeRS deliver what the paper claims? (docs/replication.md)

    python tools/replicate.py            # the whole study, resumable; --quick for the machinery only
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron's jit fuser is torch.compile

from ders_megatron.pipeline.replicate.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
