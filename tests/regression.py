"""Stored tiny DeRS checkpoints guard the checkpoint format (STYLE: regression checkpoints).

``python tests/regression.py`` regenerates them (only when the format changes on
purpose; say so in the commit). ``test_regression_checkpoints.py`` loads each at
world size 1 and at TP=2 / EP=2 and compares logits with the stored ones.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "regression")
KINDS = ("lowrank", "sparse", "dense")


def ders_for(kind):
    from ders_megatron.core.config import DenseDeltaConfig, LowRankDeltaConfig, SparseDeltaConfig
    from ders_megatron.core.config import DeRSConfig

    delta = {
        "lowrank": LowRankDeltaConfig(rank=2, alpha=4.0),
        "sparse": SparseDeltaConfig(drop_rate=0.9),
        "dense": DenseDeltaConfig(),
    }[kind]
    return DeRSConfig(delta=delta, seed=42, extended_shared_expert=True)


def config_overrides():
    return dict(moe_shared_expert_intermediate_size=64)


def logits_of(model):
    from ders_megatron.testing.models import tiny_batch

    from test_runtime_parallel import _full_logits

    return _full_logits(model, tiny_batch(seed=123))


def make(kind):
    import torch
    from safetensors.torch import save_file

    from ders_megatron.io.checkpoint import save_model
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import build_gpt, tiny_config
    from ders_megatron.testing.parity import perturb_deltas

    with model_parallel(seed=5):
        model = build_gpt(tiny_config(**config_overrides()), ders=ders_for(kind))
        perturb_deltas(model, 0.05)
        save_model(model, os.path.join(DATA, kind))
        save_file({"logits": logits_of(model).contiguous()}, os.path.join(DATA, f"{kind}_logits.safetensors"))
        return torch.numel(logits_of(model))


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from ders_megatron.testing.distributed import run_distributed

    for kind in KINDS:
        print(kind, run_distributed(make, 1, kind))
