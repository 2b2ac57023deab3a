"""Checkpoints written by an earlier version load and give the same logits."""

import os

import pytest

from regression import DATA, KINDS


def load_and_compare(kind, layout):
    import torch
    from safetensors.torch import load_file

    from ders_megatron.io.checkpoint import load_model
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import build_gpt, tiny_config
    from regression import config_overrides, ders_for, logits_of

    expected = load_file(os.path.join(DATA, f"{kind}_logits.safetensors"))["logits"]
    with model_parallel(**layout, seed=77):
        model = build_gpt(tiny_config(**config_overrides()), ders=ders_for(kind))
        load_model(model, os.path.join(DATA, kind))
        # Stored at world size 1; TP/EP re-associate partial sums: a few ulps.
        torch.testing.assert_close(logits_of(model), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_stored_checkpoint_loads_with_same_logits(dist2, kind):
    for layout in (dict(), dict(tp=2), dict(tp=2, ep=2, etp=1)):
        dist2.run(load_and_compare, kind, layout)
