"""Checkpoint key layouts of the two ``--transformer-impl`` specs, without Transformer Engine.

The tools build the local-spec model (no TE needed) and read or write either
layout; the layout of a checkpoint is the ``transformer_impl`` its args record.
What differs, from megatron-core 0.19.2's own spec definitions:

* **MoE layers' pre-MLP norm.** The local spec maps ``pre_mlp_layernorm.`` to
  ``mlp.linear_fc1.layer_norm_`` for every layer
  (``models/gpt/gpt_layer_specs.py:459-462``), so a local MoE layer saves its
  norm as ``mlp.linear_fc1.layer_norm_weight``. The TE spec builds a standalone
  ``TENorm`` there for MoE layers only (``gpt_layer_specs.py:336``, key map
  ``:339-346`` has no entry for it): ``pre_mlp_layernorm.weight``. Dense layers
  fuse it into ``TELayerNormColumnParallelLinear`` (``:336`` IdentityOp,
  ``get_mlp_module_spec_for_backend`` ``:551-553``): the same key as local.
* **TE norm modules' ``_extra_state``.** ``TENorm`` returns TE's ``LayerNorm`` /
  ``RMSNorm`` (``extensions/transformer_engine.py:796-830``), fusible ops whose
  ``get_extra_state`` is an empty uint8 tensor without FP8 state; megatron saves
  it as a ``ShardedObject`` (``transformer/utils.py:95-120``). The local norms have
  none. TE norms stand at the MoE layers' ``pre_mlp_layernorm``, the final
  ``decoder.final_layernorm`` (``gpt_layer_specs.py:709-711``) and, with
  ``--qk-layernorm``, ``q_layernorm`` / ``k_layernorm`` (``:324-331``).
* **Everything else is the same key.** The input norm is fused into
  ``linear_qkv`` in TE and mapped onto ``self_attention.linear_qkv.layer_norm_``
  in local (``:459-461``); every linear (megatron's and TE's) saves an
  ``_extra_state`` object under the same key (``tensor_parallel/layers.py:1087``,
  TE's holds FP8 metadata and loads ``None``); ``TEDotProductAttention`` saves
  nothing unless the softmax is learnable (``extensions/transformer_engine.py:2083-2104``);
  the DeRS experts write their base linears' keys themselves (``layers/experts.py``).

tests/test_te_layout.py derives these differences from megatron-core's TE spec
functions (built through their spec provider class) and checks this module
against them; tests/gpu checks them against a real TE model where TE is installed.
"""

from __future__ import annotations

import dataclasses

import torch

TE_IMPL = "transformer_engine"
LOCAL_IMPL = "local"
IMPLS = (LOCAL_IMPL, TE_IMPL)

# MoE layers' pre-MLP norm: local key prefix -> TE key prefix (within a layer).
MOE_NORM_LOCAL = "mlp.linear_fc1.layer_norm_"
MOE_NORM_TE = "pre_mlp_layernorm."
EXTRA_STATE = "_extra_state"


def impl_of(args) -> str:
    """The ``--transformer-impl`` a checkpoint's args record (megatron.training always
    records it; a bare Namespace without it means the local spec these tools build)."""
    impl = getattr(args, "transformer_impl", LOCAL_IMPL)
    if impl not in IMPLS:
        raise ValueError(f"--transformer-impl {impl!r} is not one of {IMPLS}")
    return impl


# Last module name of the norms that are TE modules in the TE spec (once renamed; a local
# MoE layer's pre-MLP norm only appears under that name in the TE layout).
TE_NORM_MODULES = ("pre_mlp_layernorm", "final_layernorm", "q_layernorm", "k_layernorm")


def moe_layers(config) -> set[int]:
    """0-based layers that are MoE layers (``--moe-layer-freq``)."""
    from ders_megatron.layers.specs import moe_layer_pattern

    if not config.num_moe_experts:
        return set()
    return {i for i, is_moe in enumerate(moe_layer_pattern(config)) if is_moe}


def te_key(key: str, moe: set[int], num_layers: int) -> str:
    """The TE-layout key of a local-layout tensor key of a world-size-1 plan.

    Per-layer keys (``decoder.layers.<i>.``, a block mixing dense and MoE layers) are
    renamed in MoE layers; layer-stacked keys (``decoder.layers.``, a homogeneous
    block, ``transformer/transformer_block.py:736-790``) when every layer is MoE."""
    prefix = "decoder.layers."
    if not key.startswith(prefix):
        return key
    head, _, rest = key[len(prefix):].partition(".")
    if head.isdigit():
        layer, tail = f"{head}.", rest
        is_moe = int(head) in moe
    else:
        layer, tail = "", key[len(prefix):]
        is_moe = len(moe) == num_layers
    if is_moe and tail.startswith(MOE_NORM_LOCAL):
        return f"{prefix}{layer}{MOE_NORM_TE}{tail[len(MOE_NORM_LOCAL):]}"
    return key


def other_layout_key(key: str) -> str | None:
    """A MoE layer's pre-MLP norm key in the other layout (None for every other key)."""
    for a, b in ((MOE_NORM_LOCAL, MOE_NORM_TE), (MOE_NORM_TE, MOE_NORM_LOCAL)):
        marker = f".{a}"
        if marker in key and key.startswith("decoder.layers."):
            before, _, after = key.rpartition(marker)
            if not after.startswith(EXTRA_STATE):
                return f"{before}.{b}{after}"
    return None


def resolve_key(key: str, keys) -> str:
    """``key`` if the checkpoint holds it, else its other-layout name if that is held.

    A checkpoint holds a MoE layer's pre-MLP norm under one of the two names, never
    both, so reading by the local name works on either layout."""
    if key in keys:
        return key
    alias = other_layout_key(key)
    return alias if alias is not None and alias in keys else key


def te_extra_state(key: str, weight_chunk):
    """The ``ShardedObject`` a TE norm saves without FP8 state: an empty uint8 tensor
    (TE's fusible ops' ``get_extra_state``), one per layer of a layer-stacked weight
    (offsets as ``transformer/utils.py:220-232`` derives them from the layer axis)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    stacked = len(weight_chunk.global_shape) > 1  # norm weights are [H]; [L, H] when stacked
    shape, offset = (weight_chunk.global_shape[:1], weight_chunk.offsets[:1]) if stacked else ((1,), (0,))
    return ShardedObject(key, torch.empty(0, dtype=torch.uint8), tuple(shape), tuple(offset), replica_id=0)


def plan_in_layout(plan, impl: str):
    """A world-size-1 :class:`~ders_megatron.io.streaming.ModelPlan` of the local model,
    laid out as ``impl`` writes its checkpoint (keys renamed, TE norms' objects added)."""
    if impl == LOCAL_IMPL:
        return plan
    config = plan.config
    moe = moe_layers(config)
    chunks = [dataclasses.replace(c, key=te_key(c.key, moe, config.num_layers)) for c in plan.chunks]
    objects = list(plan.objects)
    for chunk in chunks:
        owner, _, param = chunk.key.rpartition(".")
        if param == "weight" and owner.rpartition(".")[2] in TE_NORM_MODULES:
            objects.append(te_extra_state(f"{owner}.{EXTRA_STATE}", chunk))
    return dataclasses.replace(plan, chunks=chunks, objects=objects)


def missing_tensors(plan, keys) -> list[str]:
    """Tensor keys of ``plan`` (local layout) that a checkpoint with ``keys`` holds under
    neither layout's name: a real incompatibility."""
    return sorted({c.key for c in plan.chunks if resolve_key(c.key, keys) not in keys})


def sharded_state_dict_in_layout(state_dict: dict, config, impl: str) -> dict:
    """A model's ``sharded_state_dict`` laid out as ``impl`` saves it (in place, returned).

    On a local-spec model with ``impl`` TE: MoE layers' pre-MLP norm keys renamed and
    the TE norms' ``_extra_state`` objects added (what a TE model would save). A model
    built with TE already has both: nothing changes."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    if impl == LOCAL_IMPL:
        return state_dict
    moe = moe_layers(config)
    objects = {v.key for v in state_dict.values() if isinstance(v, ShardedObject)}
    for name, value in list(state_dict.items()):
        if not isinstance(value, ShardedTensor):
            continue
        value.key = te_key(value.key, moe, config.num_layers)
        owner, _, param = value.key.rpartition(".")
        extra = f"{owner}.{EXTRA_STATE}"
        if param == "weight" and owner.rpartition(".")[2] in TE_NORM_MODULES and extra not in objects:
            shape = (value.global_shape[:1], value.global_offset[:1]) if value.prepend_axis_num else ((1,), (0,))
            state_dict[f"{name.rpartition('.')[0]}.{EXTRA_STATE}"] = ShardedObject(  # replicated as the norm
                extra, torch.empty(0, dtype=torch.uint8), tuple(shape[0]), tuple(shape[1]), replica_id=value.replica_id
            )
    return state_dict


def sharded_state_dict_for_checkpoint(state_dict: dict, keys) -> dict:
    """A load request's tensors renamed to the names the checkpoint (tensor ``keys``) holds
    them under, whichever layout wrote it (in place, returned)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    for value in state_dict.values():
        if isinstance(value, ShardedTensor):
            value.key = resolve_key(value.key, keys)
    return state_dict
