#!/usr/bin/env python
"""Hugging Face <-> megatron-core checkpoints: ``import`` (Llama/Mistral/Qwen2, Mixtral,
Qwen2-MoE -> Megatron) and ``export`` (Megatron vanilla/DeRS MoE or dense ->
mixtral, qwen2_moe, the compact ders format, llama, qwen2).

    python tools/convert_hf.py import --hf-dir SmolLM2-135M --output ckpt/smollm2
    python tools/convert_hf.py export --checkpoint ckpt/ders --output hf/ders --format ders

See ``ders_megatron/cli/convert_hf.py`` for every flag.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ders_megatron.cli.convert_hf import main  # noqa: E402

if __name__ == "__main__":  # megatron's checkpoint writer starts processes: keep the guard
    sys.exit(main())
