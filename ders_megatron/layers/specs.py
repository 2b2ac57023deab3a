"""Layer specs: megatron-core's own GPT layer with DeRS MoE placed through its seams.

Everything goes through ``ModuleSpec`` / ``MoESubmodules``
(``transformer/moe/moe_layer.py:151``): the attention, router, token dispatcher
and shared expert stay megatron-core's; only the experts (drop-in path) or the
whole MoE module (fused path) are ours.
"""

from __future__ import annotations

import dataclasses
from functools import partial

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    get_transformer_layer_offset,
)

from ders_megatron.core.config import DEFAULTS, DeRSConfig, check_qk_layernorm_width
from ders_megatron.layers.experts import DeRSExperts, DeRSMoELayer
from ders_megatron.layers.fused import FusedDeRSMoELayer
from ders_megatron.layers.norms import FullWidthQKNorm, ParallelTorchNorm, QKNorm
from ders_megatron.layers.shared_expert import DeRSSharedExpert


def _backend(use_te: bool):
    if use_te:
        from megatron.core.extensions.transformer_engine import HAVE_TE

        if not HAVE_TE:
            raise ValueError(
                "--transformer-impl transformer_engine was asked for but Transformer Engine is "
                "not installed; install ders-megatron[te] on a CUDA machine or use "
                "--transformer-impl local."
            )
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalSpecProvider()


def vanilla_moe_spec(use_te: bool = False):
    """megatron-core's own MoE module (``SequentialMLP`` experts on the local backend)."""
    return get_moe_module_spec_for_backend(backend=_backend(use_te), num_experts=1)


def ders_moe_spec(ders: DeRSConfig, use_te: bool = False):
    """The MoE module for ``ders``: megatron-core's ``MoELayer`` with DeRS drop-in experts,
    or the fused layer (``ders.impl == "fused"``), which is built from the same submodules
    so the two differ only in the layer's forward and share their checkpoint keys.

    Router and shared expert are built as megatron-core builds them
    (``models/gpt/moe_module_specs.py:74-89``: the default ``TopKRouter``, a
    ``SharedExpertMLP`` on the backend's linears), unless ``ders.extended_shared_expert``
    asks for extended DeRS, where the shared expert becomes the base plus its own delta.
    """
    backend = _backend(use_te)
    if ders.extended_shared_expert:
        shared = partial(DeRSSharedExpert, ders=ders)
    else:
        mlp = MLPSubmodules(
            linear_fc1=backend.column_parallel_linear(),
            linear_fc2=backend.row_parallel_linear(),
            activation_func=backend.activation_func(),
        )
        shared = partial(SharedExpertMLP, submodules=mlp)
    submodules = MoESubmodules(experts=partial(DeRSExperts, ders=ders, use_te=use_te), shared_experts=shared)
    if ders.impl == "fused":
        return partial(FusedDeRSMoELayer, submodules=submodules, ders=ders)
    return partial(DeRSMoELayer, submodules=submodules)


def gpt_layer_spec(
    num_experts: int | None = None,
    ders=None,
    normalization: str = "LayerNorm",
    use_te: bool = False,
    qk_layernorm: bool = False,
    qk_layernorm_width: str = DEFAULTS["qk_layernorm_width"],
    tp_group=None,
) -> ModuleSpec:
    """A GPT transformer layer: dense MLP, vanilla MoE, or DeRS MoE.

    On the local backend the norms are :func:`ParallelTorchNorm` so sequence
    parallelism works without TE/apex, and ``qk_layernorm`` (per-head query/key norm,
    Qwen3) is :func:`QKNorm`: megatron's local spec would give ``WrappedTorchNorm``, which
    refuses sequence parallelism, and without ``qk_layernorm`` in the spec megatron's
    attention keeps the spec's ``IdentityOp`` even when the config asks for the norm
    (``transformer/attention.py:1700-1703``: ``submodules.q_layernorm or TENorm``).
    ``qk_layernorm_width`` "full" (``--ders-qk-layernorm-width``, OLMoE) normalizes all heads
    of q and of k together instead (:class:`FullWidthQKNorm`, local backend only), summing
    squares over ``tp_group`` (None: megatron's TP group, ``parallel_state``).
    """
    if qk_layernorm_width != "head":
        check_qk_layernorm_width(qk_layernorm_width, qk_layernorm=qk_layernorm, use_te=use_te)
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_submodules,
        )

        _backend(True)
        submodules = get_gpt_layer_with_transformer_engine_submodules(
            num_experts=num_experts, qk_layernorm=qk_layernorm
        )
    else:
        submodules = get_gpt_layer_local_submodules(
            num_experts=num_experts, normalization=normalization
        )
        submodules = dataclasses.replace(
            submodules, input_layernorm=ParallelTorchNorm, pre_mlp_layernorm=ParallelTorchNorm
        )
        if qk_layernorm:
            attention = submodules.self_attention
            attention = ModuleSpec(
                module=attention.module, params=attention.params,
                submodules=dataclasses.replace(attention.submodules, **_qk_norms(qk_layernorm_width, tp_group)),
            )
            submodules = dataclasses.replace(submodules, self_attention=attention)
    if num_experts is not None and ders is not None:
        submodules = dataclasses.replace(submodules, mlp=ders_moe_spec(ders, use_te=use_te))
    return ModuleSpec(module=TransformerLayer, submodules=submodules)


def _qk_norms(width: str, tp_group=None) -> dict:
    """The spec's ``q_layernorm`` / ``k_layernorm`` builders for ``--ders-qk-layernorm-width``."""
    if width == "full":
        return dict(q_layernorm=partial(FullWidthQKNorm, projection="query", tp_group=tp_group),
                    k_layernorm=partial(FullWidthQKNorm, projection="key", tp_group=tp_group))
    return dict(q_layernorm=QKNorm, k_layernorm=QKNorm)


def moe_layer_pattern(config) -> list[int]:
    """1 for MoE layers, 0 for dense, from ``config.moe_layer_freq`` (as Megatron parses it,
    ``models/gpt/gpt_layer_specs.py:646``)."""
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    if len(freq) != config.num_layers:
        raise ValueError(
            f"--moe-layer-freq has {len(freq)} entries but --num-layers is {config.num_layers}"
        )
    return list(freq)


def gpt_block_spec(
    config, ders=None, use_te: bool = False, vp_stage: int | None = None, pp_rank: int | None = None,
    qk_layernorm_width: str = DEFAULTS["qk_layernorm_width"], tp_group=None,
) -> TransformerBlockSubmodules:
    """The decoder block for this pipeline stage: dense and (DeRS) MoE layers by pattern.

    Mirrors ``get_gpt_decoder_block_spec`` (``models/gpt/gpt_layer_specs.py:676``),
    slicing the layers this stage builds, with a final norm that supports SP.
    ``qk_layernorm_width`` / ``tp_group``: the QK norm's (:func:`gpt_layer_spec`).
    """
    normalization, qk = config.normalization, bool(config.qk_layernorm)
    qk_width = dict(qk_layernorm=qk, qk_layernorm_width=qk_layernorm_width, tp_group=tp_group)
    dense = gpt_layer_spec(None, normalization=normalization, use_te=use_te, **qk_width)
    moe = (
        gpt_layer_spec(config.num_moe_experts, ders, normalization, use_te, **qk_width)
        if config.num_moe_experts
        else dense
    )
    pattern = moe_layer_pattern(config) if config.num_moe_experts else [0] * config.num_layers
    layer_specs = [moe if is_moe else dense for is_moe in pattern]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    norm = ParallelTorchNorm
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        norm = TENorm
    return TransformerBlockSubmodules(
        layer_specs=layer_specs[offset : offset + count], layer_norm=norm
    )
