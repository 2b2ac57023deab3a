"""The built model's parameter count equals tools/param_report.py (core/accounting.py) for
every paper preset megatron can build (issue 14).

Each preset is built on the meta device (shapes only, no memory) at its own hidden and FFN
sizes, with one MoE layer (and, every other layer MoE, one dense layer): the accounting is
per MoE layer, so the reduced model checks the same formula. Presets megatron cannot
build as the paper counts them are adapted, each for a stated reason.
"""

from __future__ import annotations

import dataclasses

import pytest

from ders_megatron.core.accounting import PAPER_MODELS, DeltaSpec, added_parameters

# (MoEShape of the preset, the variant) -> every delta kind the accounting counts.
VARIANTS = [DeltaSpec(kind="vanilla"), DeltaSpec(kind="lowrank", rank=4), DeltaSpec(kind="sparse", drop_rate=0.99),
            DeltaSpec(kind="dense")]


def buildable_shapes():
    """The presets at one MoE layer; megatron's shared expert takes no bias
    (transformer/moe/shared_experts.py:124) and its router has no noise projection."""
    shapes = {}
    for name, shape in PAPER_MODELS.items():
        if shape.bias and shape.shared_expert != "none":
            continue  # med-moe-phi: megatron refuses a shared expert with biases
        freq = shape.moe_layer_freq
        # coder-moe: megatron's router has no noise projection; with biases it has an [E] bias
        shape = dataclasses.replace(shape, num_layers=freq, noisy_gate=False, router_bias=shape.bias)
        shapes[name] = shape
        if shape.shared_expert == "full" and not shape.bias:
            shapes[f"{name}-extended"] = dataclasses.replace(shape, shared_expert="ders")
    return shapes


SHAPES = buildable_shapes()


def megatron_args(shape):
    """Full Megatron args of the preset's dense model (megatron has no --add-bias-linear flag:
    biases and GELU are its defaults, which the tiny args turn off, so they are set here)."""
    from compress_helpers import tiny_args

    heads = 32 if shape.hidden_size % 32 == 0 else 16
    args = tiny_args(["--num-layers", str(shape.num_layers), "--hidden-size", str(shape.hidden_size),
                      "--ffn-hidden-size", str(shape.ffn_hidden_size), "--num-attention-heads", str(heads)])
    args.swiglu, args.add_bias_linear = shape.gated, shape.bias
    return args


def count_added(shape, delta) -> int:
    """Parameters of the built MoE model minus those of its dense model."""
    from ders_megatron.convert.upcycle import UpcycleConfig, moe_args
    from ders_megatron.core.config import ders_config_from_args
    from ders_megatron.io.streaming import build_model, single_rank_args
    from ders_megatron.testing.distributed import model_parallel

    dense_args = megatron_args(shape)
    cfg = UpcycleConfig(
        kind=delta.kind, num_experts=shape.num_experts, topk=shape.topk,
        moe_layer_freq=shape.moe_layer_freq, rank=delta.rank or 4, drop_rate=delta.drop_rate or 0.99,
        shared_expert=shape.shared_expert, renormalize_topk=shape.topk > 1,
    )
    args = moe_args(dense_args, cfg)
    with model_parallel():
        dense = build_model(single_rank_args(dense_args), None)
        moe = build_model(single_rank_args(args), ders_config_from_args(args))
        return sum(p.numel() for p in moe.parameters()) - sum(p.numel() for p in dense.parameters())


@pytest.mark.parametrize("delta", VARIANTS, ids=lambda d: d.label.replace(" ", ""))
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_built_model_adds_what_param_report_counts(dist1, name, delta):
    shape = SHAPES[name]
    if delta.kind == "vanilla" and shape.shared_expert == "ders":
        pytest.skip("the extended shared expert is a DeRS kind")
    expected = added_parameters(shape, delta).added_params
    assert dist1.run(count_added, shape, delta)[0] == expected
