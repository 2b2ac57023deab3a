"""Upcycling's rules and its in-memory path: where each MoE tensor comes from, read
straight from a dense checkpoint into a freshly built model.

The offline tool (:mod:`ders_megatron.convert.upcycle`, ``tools/upcycle.py``) and the
training flag ``--moe-ders-upcycle-from`` (:mod:`ders_megatron.training.provider`)
share these rules (:func:`source_of`), so loading the tool's output and filling a
model in memory give the same weights, bit for bit. It lives in the checkpoint-I/O
layer because the training glue needs it; the module doc of
:mod:`ders_megatron.convert.upcycle` explains what each tensor starts as and why
the upcycled model equals the dense one at step 0.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from ders_megatron.core.deltas import derive_seed
from ders_megatron.io.checkpoint import CheckpointError, load_common
from ders_megatron.layers.shared_expert import DeRSSharedExpert

SHARED_INITS = ("split", "copy")


class UpcycleError(CheckpointError):
    """Bad input or settings for upcycling; the message names the flag or file."""


def shared_fc2_scale(shared_expert: str, gate: bool, init: str) -> float:
    """Scale of routed and shared fc2 so that their sum is FFN(x) at step 0 (module doc)."""
    if shared_expert == "none" or init == "copy":
        return 1.0
    if init not in SHARED_INITS:
        raise UpcycleError(f"--shared-expert-init must be one of {SHARED_INITS}, got {init!r}")
    g = 0.5 if gate else 1.0  # sigmoid(0) with the zero-initialised gate
    return 1.0 / (1.0 + g)


# --------------------------------------------------------------------------- #
# Where each MoE tensor comes from
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Source:
    """``copy``: dense ``suffix`` (scaled); ``per_expert``: dense ``suffix`` copied into every
    expert's row (own biases, ``experts.biases.*``); ``router``/``zeros``/``keep``: initialised."""

    what: str  # copy | per_expert | router | zeros | keep
    suffix: str = ""
    scale: float = 1.0


def _dense_name(suffix: str) -> str | None:
    """The dense FFN tensor a routed/shared expert tensor copies, or None."""
    for prefix in ("mlp.experts.experts.", "mlp.experts.", "mlp.shared_experts."):
        if suffix.startswith(prefix):
            rest = suffix[len(prefix):]
            if rest.split(".")[0] in ("linear_fc1", "linear_fc2"):
                return "mlp." + rest
    return None


def source_of(key_suffix: str, dense_suffixes: set[str], fc2_scale: float = 1.0) -> Source:
    """Source of one MoE checkpoint tensor, by its layer-relative key suffix
    (``docs/design.md`` key layout; megatron's for vanilla and shared experts)."""
    if key_suffix.startswith("mlp.router."):
        return Source("router" if key_suffix == "mlp.router.weight" else "zeros")
    if ".deltas." in key_suffix:
        return Source("keep")  # the DeRS layer's own deterministic initialisation
    if key_suffix == "mlp.shared_experts.gate_weight":
        return Source("zeros")
    if key_suffix.startswith("mlp.experts.biases."):  # each expert's own bias: the dense one
        which = key_suffix.rsplit(".", 1)[1]
        scale = fc2_scale if which == "fc2" else 1.0
        return Source("per_expert", f"mlp.linear_{which}.bias", scale)
    dense = _dense_name(key_suffix)
    if dense is not None:
        scale = fc2_scale if dense.startswith("mlp.linear_fc2.") else 1.0
        return Source("copy", dense, scale)
    if key_suffix.startswith("pre_mlp_layernorm.") and key_suffix not in dense_suffixes:
        # TE MoE specs keep the norm apart; dense TE/local checkpoints fuse it into fc1.
        return Source("copy", "mlp.linear_fc1.layer_norm_" + key_suffix.split(".", 1)[1])
    return Source("copy", key_suffix)


class DenseSource:
    """Slices of the dense checkpoint for (layer, suffix): stacked or per-layer keys."""

    def __init__(self, root):
        from ders_megatron.io.checkpoint import tensor_shapes
        from ders_megatron.io.streaming import layer_suffix

        self.root = root
        self.shapes = tensor_shapes(root)
        self.suffixes = {layer_suffix(key) for key in self.shapes if key.startswith("decoder.layers.")}

    def locate(self, layer: int | None, suffix: str) -> tuple[str, tuple[int, ...]] | None:
        """(checkpoint key, leading index) of one layer's (or a global) dense tensor: the
        layer-stacked key indexed by the layer, or a per-layer key; None if absent."""
        if layer is None:
            return (suffix, ()) if suffix in self.shapes else None
        if f"decoder.layers.{suffix}" in self.shapes:
            return f"decoder.layers.{suffix}", (layer,)
        if f"decoder.layers.{layer}.{suffix}" in self.shapes:
            return f"decoder.layers.{layer}.{suffix}", ()
        return None

    def shape_of(self, layer: int | None, suffix: str) -> tuple[int, ...]:
        """Global shape of one layer's (or a global) dense tensor, without the layer axis; ()
        if absent (:meth:`request` then names it)."""
        found = self.locate(layer, suffix)
        if found is None:
            return ()
        key, index = found
        return tuple(self.shapes[key][0])[len(index):]

    def request(self, layer: int | None, suffix: str, offsets, shape):
        from ders_megatron.io.streaming import SliceRequest

        found = self.locate(layer, suffix)
        if found is None:
            where = f"no tensor {suffix!r}" if layer is None else f"no tensor for layer {layer} {suffix!r}"
            raise UpcycleError(f"the dense checkpoint {self.root} has {where}")
        key, index = found
        return SliceRequest(key, index, tuple(offsets), tuple(shape))


def router_weight(num_experts: int, hidden: int, layer_number: int, seed: int, std: float, dtype) -> torch.Tensor:
    """[E, H] ~ N(0, std²) from a generator seeded by (seed, layer): layout-independent."""
    gen = torch.Generator().manual_seed(derive_seed(seed, layer_number, -1, "router"))
    return (torch.randn(num_experts, hidden, generator=gen, dtype=torch.float32) * std).to(dtype)


def key_suffix(st) -> tuple[int | None, str]:
    """(layer index or None, layer-relative key) of a sharded tensor, as :func:`source_of` takes it."""
    from ders_megatron.io.streaming import layer_of, layer_suffix

    layer = layer_of(st)
    return layer, (layer_suffix(st.key) if layer is not None else st.key)


def read_dense_args(dense_root) -> argparse.Namespace:
    """The dense checkpoint's args; errors for missing, truncated or MoE checkpoints."""
    from ders_megatron.io.checkpoint import tensor_shapes
    from ders_megatron.io.streaming import check_full_args

    common = load_common(dense_root)
    args = common.get("args")
    if args is None:
        raise UpcycleError(f"{dense_root} holds no 'args': cannot tell the dense model's shape")
    check_full_args(args, dense_root)
    moe_keys = [k for k in tensor_shapes(dense_root) if ".mlp.router." in k or ".mlp.experts." in k]
    if getattr(args, "num_experts", None) or moe_keys:
        raise UpcycleError(
            f"{dense_root} is already a MoE checkpoint (--num-experts {getattr(args, 'num_experts', None)}, "
            f"{len(moe_keys)} expert/router tensors): upcycling needs a dense one"
        )
    return args


# --------------------------------------------------------------------------- #
# In memory
# --------------------------------------------------------------------------- #
def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


@torch.no_grad()
def upcycle_state_into_model(dense_root, model, *, seed: int | None = None, router_init_std: float | None = None,
                             shared_expert_init: str = "split") -> dict:
    """Fill a freshly built (DeRS or megatron-experts) GPT model from a dense checkpoint.

    ``model``: one GPTModel chunk or a list (PP/VPP), DDP-wrapped or not, at any
    TP/EP/PP layout of the current process groups; call it on every rank, before
    the optimizer is built (or call the optimizer's ``reload_model_params()``
    after). Each rank reads only its shards. DeRS deltas keep the layer's own
    (layout-independent) initialisation; routers get :func:`router_weight` with
    ``seed`` (default: the DeRS seed, else 1234) and ``router_init_std`` (default:
    the config's ``init_method_std``); the result equals loading the offline
    :func:`upcycle_checkpoint` output of the same settings. Returns counts of
    copied / initialised tensors.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject, apply_factories

    from ders_megatron.io.streaming import read_slices

    chunks = [_unwrap(m) for m in (model if isinstance(model, (list, tuple)) else [model])]
    config = chunks[0].config
    seed = _model_seed(chunks, seed)
    std = router_init_std or getattr(config, "init_method_std", 0.02)
    shared = _shared_expert_kind(chunks)
    gate = bool(getattr(config, "moe_shared_expert_gate", False))
    fc2_scale = shared_fc2_scale(shared, gate, shared_expert_init)
    dense = DenseSource(dense_root)
    read_dense_args(dense_root)
    requests, targets, scales, per_expert = [], [], [], []
    counts = {"copy": 0, "per_expert": 0, "router": 0, "zeros": 0, "keep": 0}
    for chunk in chunks:
        sharded = chunk.sharded_state_dict()
        apply_factories(sharded)
        for st in _leaves(sharded):
            if isinstance(st, ShardedObject):
                continue
            layer, suffix = key_suffix(st)
            source = source_of(suffix, dense.suffixes, fc2_scale)
            counts[source.what] += 1
            if source.what == "copy":
                want, have = tuple(st.global_shape[st.prepend_axis_num:]), dense.shape_of(layer, source.suffix)
                if have and want != have:
                    raise UpcycleError(
                        f"{st.key}: the model's global shape {want} is not the dense checkpoint's {have} for "
                        f"{source.suffix} (vocabulary padding differs with TP: set --make-vocab-size-divisible-by "
                        "so that the padded vocabulary is the dense model's)")
                offsets = st.global_offset[st.prepend_axis_num:]
                requests.append(dense.request(layer, source.suffix, offsets, st.local_shape))
                targets.append(st.data)
                scales.append(source.scale)
            elif source.what == "per_expert":  # [local experts, out] <- the dense [out], every row
                offsets, shape = st.global_offset[st.prepend_axis_num + 1:], st.local_shape[1:]
                per_expert.append((dense.request(layer, source.suffix, offsets, shape), st.data, source.scale))
            elif source.what == "router":
                full = router_weight(config.num_moe_experts, config.hidden_size, layer + 1, seed, std, st.data.dtype)
                st.data.copy_(full[tuple(slice(o, o + s) for o, s in zip(st.global_offset[st.prepend_axis_num:], st.local_shape))])
            elif source.what == "zeros":
                st.data.zero_()
    read_slices(dense_root, requests, dense.shapes, out=targets)
    for data, scale in zip(targets, scales):
        if scale != 1.0:
            data.mul_(scale)
    if per_expert:  # own biases: small, read apart and copied into every expert's row
        values = read_slices(dense_root, [request for request, _, _ in per_expert], dense.shapes)
        for (_, data, scale), value in zip(per_expert, values):
            data.copy_(value.unsqueeze(0).expand_as(data))
            if scale != 1.0:
                data.mul_(scale)
    return counts


def _leaves(sharded):
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return list(nested_values(sharded))


def _model_seed(chunks, seed):
    if seed is not None:
        return seed
    for chunk in chunks:
        for module in chunk.modules():
            ders = getattr(module, "ders", None)
            if ders is not None and hasattr(ders, "seed"):
                return ders.seed
    return 1234


def _shared_expert_kind(chunks) -> str:
    for chunk in chunks:
        for module in chunk.modules():
            shared = getattr(module, "shared_experts", None)
            if shared is not None:
                return "ders" if isinstance(shared, DeRSSharedExpert) else "full"
    return "none"
