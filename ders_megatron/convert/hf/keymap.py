"""THE key map between megatron-core and Hugging Face weights, both directions.

One :class:`KeyMap` entry ties megatron names to HF names with a transform each
way and the shape every tensor must have on each side; import reads it
right-to-left (:meth:`KeyMap.from_hf`), export left-to-right (:meth:`KeyMap.to_hf`).
Megatron names are the parameter names of a 1-rank, PP=1 ``GPTModel``
(``decoder.layers.3.self_attention.linear_qkv.weight``); where the checkpoint
stores them (layer-stacked keys, the experts axis, renamed norms) is
:mod:`ders_megatron.io.reader`'s business.

Megatron (per layer ``i``)                           HF (Llama family)                      transform
---------------------------------------------------  -------------------------------------  ---------
embedding.word_embeddings.weight [Vp, H]             model.embed_tokens.weight [V, H]       vocab pad
output_layer.weight [Vp, H] (untied only)            lm_head.weight [V, H]                  vocab pad
decoder.final_layernorm.weight                       model.norm.weight                      copy
.input_layernorm.weight                              .input_layernorm.weight                copy
.self_attention.linear_qkv.weight/.bias              .self_attn.{q,k,v}_proj.weight/.bias   qkv
.self_attention.linear_proj.weight                   .self_attn.o_proj.weight               copy
.self_attention.{q,k}_layernorm.weight [d]           .self_attn.{q,k}_norm.weight [d]       copy (Qwen3: --qk-layernorm)
  (full width: [n·d] / [g·d])                        (OLMoE: q_norm [n·d], k_norm [g·d])    copy
.pre_mlp_layernorm.weight                            .post_attention_layernorm.weight       copy
dense: .mlp.linear_fc1.weight [2F, H]                .mlp.{gate,up}_proj.weight             gate_up
dense: .mlp.linear_fc2.weight                        .mlp.down_proj.weight                  copy
MoE:   .mlp.router.weight [E, H]                     <moe>.gate.weight                      copy
vanilla: .mlp.experts.local_experts.e.linear_fc1     <moe>.experts.e.{gate,up}              gate_up
vanilla: .mlp.experts.local_experts.e.linear_fc2     <moe>.experts.e.<down>                 copy
DeRS:  .mlp.experts.linear_fc{1,2} + .deltas.*       <moe>.experts.e.*  (W_base + Δ_e)      synthesize (export only)
shared: .mlp.shared_experts.linear_fc{1,2}.weight    .mlp.shared_expert.{gate,up,down}      gate_up / copy
shared: .mlp.shared_experts.gate_weight [1, H]       .mlp.shared_expert_gate.weight [1, H]  copy
ders format: base, deltas, shared deltas             .mlp.base.*, .mlp.experts.<P>.*, ...   gate_up / copy

``<moe>`` is ``block_sparse_moe`` with experts ``w1`` (gate) ``w3`` (up) ``w2``
(down) for Mixtral, ``mlp`` with ``gate_proj/up_proj/down_proj`` for Qwen2-MoE,
Qwen3-MoE, OLMoE and ders. Fused QKV order (megatron-core ``transformer/attention.py:1828-1880``):
per query group ``g``, the group's ``n/g`` query heads, then its key head, then
its value head, each ``kv_channels`` rows. Gated fc1 is ``[gate; up]``
(``transformer/mlp.py:324``: ``chunk(2)``, activation on the first half).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from ders_megatron.convert.hf.dims import ConversionError, ModelDims
from ders_megatron.core.config import ders_config_from_args
from ders_megatron.core.deltas import build_deltas

Shape = tuple[int, ...]
# Megatron delta matrix name -> HF projection name (the ders format and synthesis).
DELTA_MATRICES = {"fc1_gate": "gate_proj", "fc1_up": "up_proj", "fc2": "down_proj"}


class KeyMapError(ConversionError):
    """A tensor is missing or has the wrong shape for the key map."""


@dataclass(frozen=True)
class KeyMap:
    """Megatron tensors <-> HF tensors, with the transform and shapes of both sides."""

    megatron: tuple[str, ...]
    hf: tuple[str, ...]
    megatron_shapes: tuple[Shape, ...]
    hf_shapes: tuple[Shape, ...]
    to_hf_fn: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    from_hf_fn: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None  # None: export only

    def to_hf(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = _checked(self.megatron, self.megatron_shapes, tensors, "megatron")
        return _checked(self.hf, self.hf_shapes, dict(zip(self.hf, self.to_hf_fn(inputs))), "HF (produced)", out=True)

    def from_hf(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.from_hf_fn is None:
            raise KeyMapError(f"{self.megatron} has no HF -> megatron direction (export only)")
        inputs = _checked(self.hf, self.hf_shapes, tensors, "HF")
        outputs = dict(zip(self.megatron, self.from_hf_fn(inputs)))
        return _checked(self.megatron, self.megatron_shapes, outputs, "megatron (produced)", out=True)


def _checked(names, shapes, tensors, side, out=False):
    """The tensors of ``names`` in order (a dict when ``out``), each of its expected shape."""
    values = []
    for name, shape in zip(names, shapes, strict=True):
        if name not in tensors:
            raise KeyMapError(f"{side} tensor {name} is missing")
        got = tuple(tensors[name].shape)
        if got != tuple(shape):
            raise KeyMapError(f"{side} tensor {name} has shape {got}, expected {tuple(shape)}")
        values.append(tensors[name])
    return dict(zip(names, values)) if out else values


# --------------------------------------------------------------------------- #
# Transforms (pure tensor functions)
# --------------------------------------------------------------------------- #
def _copy(ts):
    return list(ts)


def _qkv_split(dims: ModelDims):
    """Megatron fused [g·(n/g + 2)·d, ...] -> q [n·d, ...], k [g·d, ...], v [g·d, ...]."""
    g, per_group, d = dims.num_query_groups, dims.num_attention_heads // dims.num_query_groups, dims.kv_channels

    def split(ts):
        (qkv,) = ts
        grouped = qkv.reshape(g, per_group + 2, d, *qkv.shape[1:])
        q = grouped[:, :per_group].reshape(g * per_group * d, *qkv.shape[1:])
        k = grouped[:, per_group].reshape(g * d, *qkv.shape[1:])
        v = grouped[:, per_group + 1].reshape(g * d, *qkv.shape[1:])
        return [q.contiguous(), k.contiguous(), v.contiguous()]

    def fuse(ts):
        q, k, v = ts
        rest = q.shape[1:]
        grouped = torch.cat(
            [q.reshape(g, per_group, d, *rest), k.reshape(g, 1, d, *rest), v.reshape(g, 1, d, *rest)], dim=1
        )
        return [grouped.reshape(g * (per_group + 2) * d, *rest)]

    return split, fuse


def _gate_up_split(ts):
    gate, up = torch.chunk(ts[0], 2, dim=0)
    return [gate.contiguous(), up.contiguous()]


def _gate_up_fuse(ts):
    return [torch.cat(ts, dim=0)]


def _vocab(dims: ModelDims):
    def unpad(ts):
        return [ts[0][: dims.vocab_size].contiguous()]

    def pad(ts):
        (weight,) = ts
        rows = dims.padded_vocab_size - dims.vocab_size
        if rows == 0:
            return [weight]  # no copy: import holds one embedding, not two
        # Padding rows are never produced by the tokenizer; zeros keep their logits at 0.
        return [torch.cat([weight, weight.new_zeros(rows, weight.shape[1])])]

    return unpad, pad


# --------------------------------------------------------------------------- #
# The map
# --------------------------------------------------------------------------- #
def _entry(megatron, hf, megatron_shapes, hf_shapes, to_hf, from_hf=_copy) -> KeyMap:
    as_tuple = lambda x: (x,) if isinstance(x, str) else tuple(x)  # noqa: E731
    return KeyMap(as_tuple(megatron), as_tuple(hf), tuple(megatron_shapes), tuple(hf_shapes), to_hf, from_hf)


def global_maps(dims: ModelDims) -> list[KeyMap]:
    H, V, Vp = dims.hidden_size, dims.vocab_size, dims.padded_vocab_size
    unpad, pad = _vocab(dims)
    maps = [
        _entry("embedding.word_embeddings.weight", "model.embed_tokens.weight", [(Vp, H)], [(V, H)], unpad, pad),
        _entry("decoder.final_layernorm.weight", "model.norm.weight", [(H,)], [(H,)], _copy),
    ]
    if not dims.tie_embeddings:
        maps.append(_entry("output_layer.weight", "lm_head.weight", [(Vp, H)], [(V, H)], unpad, pad))
    return maps


def attention_maps(dims: ModelDims, i: int) -> list[KeyMap]:
    H, d = dims.hidden_size, dims.kv_channels
    n, g = dims.num_attention_heads, dims.num_query_groups
    m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    split, fuse = _qkv_split(dims)
    qkv_rows = (n + 2 * g) * d
    qkv_hf = [f"{h}self_attn.{p}_proj.weight" for p in "qkv"]
    maps = [
        _entry(f"{m}input_layernorm.weight", f"{h}input_layernorm.weight", [(H,)], [(H,)], _copy),
        _entry(f"{m}self_attention.linear_qkv.weight", qkv_hf, [(qkv_rows, H)],
               [(n * d, H), (g * d, H), (g * d, H)], split, fuse),
        _entry(f"{m}self_attention.linear_proj.weight", f"{h}self_attn.o_proj.weight", [(H, n * d)], [(H, n * d)],
               _copy),
        _entry(f"{m}pre_mlp_layernorm.weight", f"{h}post_attention_layernorm.weight", [(H,)], [(H,)], _copy),
    ]
    if dims.qk_layernorm:  # per head: [head_dim] weights (megatron and Qwen3 alike); full width (OLMoE):
        # q [heads·head_dim], k [groups·head_dim], the heads in q_proj / k_proj row order
        widths = {"q": n * d, "k": g * d} if dims.qk_layernorm_width == "full" else {"q": d, "k": d}
        maps += [_entry(f"{m}self_attention.{p}_layernorm.weight", f"{h}self_attn.{p}_norm.weight", [(widths[p],)],
                        [(widths[p],)], _copy) for p in "qk"]
    if dims.qkv_bias:
        maps.append(_entry(f"{m}self_attention.linear_qkv.bias", [f"{h}self_attn.{p}_proj.bias" for p in "qkv"],
                           [(qkv_rows,)], [(n * d,), (g * d,), (g * d,)], split, fuse))
    return maps


def _ffn_maps(m: str, hf_gate: str, hf_up: str, hf_down: str, hidden: int, ffn: int) -> list[KeyMap]:
    """A gated FFN: megatron ``{m}linear_fc1/2.weight`` <-> three HF projections."""
    return [
        _entry(f"{m}linear_fc1.weight", [hf_gate, hf_up], [(2 * ffn, hidden)], [(ffn, hidden), (ffn, hidden)],
               _gate_up_split, _gate_up_fuse),
        _entry(f"{m}linear_fc2.weight", hf_down, [(hidden, ffn)], [(hidden, ffn)], _copy),
    ]


def _hf_expert_names(fmt: str, prefix: str, e: int) -> tuple[str, str, str]:
    if fmt == "mixtral":
        return tuple(f"{prefix}experts.{e}.{w}.weight" for w in ("w1", "w3", "w2"))
    return tuple(f"{prefix}experts.{e}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj"))


def mlp_maps(dims: ModelDims, fmt: str, i: int) -> list[KeyMap]:
    """The FFN of layer ``i`` in format ``fmt`` (an HF family or "ders")."""
    H, m, h = dims.hidden_size, f"decoder.layers.{i}.mlp.", f"model.layers.{i}.mlp."
    if not (dims.is_moe and dims.moe_pattern[i]):
        return _ffn_maps(m, f"{h}gate_proj.weight", f"{h}up_proj.weight", f"{h}down_proj.weight",
                         H, dims.ffn_hidden_size)
    moe = f"model.layers.{i}.block_sparse_moe." if fmt == "mixtral" else h
    maps = [_entry(f"{m}router.weight", f"{moe}gate.weight", [(dims.num_experts, H)], [(dims.num_experts, H)],
                   _copy)]
    if fmt == "ders":
        maps += _ffn_maps(f"{m}experts.", *(f"{h}base.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")),
                          H, dims.moe_ffn_hidden_size)
        maps += _delta_copy_maps(dims, f"{m}experts.deltas.", f"{h}experts.", dims.num_experts)
    elif dims.is_ders:
        maps += [_synthesized_expert_map(dims, i, e, _hf_expert_names(fmt, moe, e)) for e in range(dims.num_experts)]
    else:
        for e in range(dims.num_experts):
            maps += _ffn_maps(f"{m}experts.local_experts.{e}.", *_hf_expert_names(fmt, moe, e),
                              H, dims.moe_ffn_hidden_size)
    if dims.shared_expert_size:
        maps += _shared_expert_maps(dims, fmt, i)
    return maps


def _shared_expert_maps(dims: ModelDims, fmt: str, i: int) -> list[KeyMap]:
    H, m, h = dims.hidden_size, f"decoder.layers.{i}.mlp.", f"model.layers.{i}.mlp."
    names = tuple(f"{h}shared_expert.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj"))
    if dims.ders_shared_expert and fmt == "ders":
        maps = _delta_copy_maps(dims, f"{m}shared_experts.deltas.", f"{h}shared_expert_deltas.", 1)
    elif dims.ders_shared_expert:
        maps = [_synthesized_expert_map(dims, i, None, names)]
    else:
        maps = _ffn_maps(f"{m}shared_experts.", *names, H, dims.shared_expert_size)
    gate = f"{h}shared_expert_gate.weight"
    if dims.shared_expert_gate:
        maps.append(_entry(f"{m}shared_experts.gate_weight", gate, [(1, H)], [(1, H)], _copy))
    elif fmt == "qwen2_moe":
        # Qwen2-MoE always gates its shared expert with sigmoid(x·g). A zero g gives exactly
        # 0.5, and doubling down_proj (exact in floating point) cancels it: an ungated
        # megatron shared expert, written in Qwen2-MoE's terms. Export only.
        down = next(k for k in maps if names[2] in k.hf)
        j = down.hf.index(names[2])
        doubled = lambda ts, f=down.to_hf_fn: [t * 2 if n == j else t for n, t in enumerate(f(ts))]  # noqa: E731
        maps[maps.index(down)] = KeyMap(down.megatron, down.hf, down.megatron_shapes, down.hf_shapes, doubled)
        maps.append(KeyMap((), (gate,), (), ((1, H),), lambda ts: [torch.zeros(1, H)]))
    return maps


def delta_config_of(dims: ModelDims):
    """The delta config (:mod:`ders_megatron.core.config`) a DeRS checkpoint was built with: one
    kind from the ``--moe-ders*`` args, or per matrix from ``moe_ders_codecs`` (tools/compress.py)."""
    return ders_config_from_args(dims.to_args()).delta


def matrix_config(config, matrix: str):
    """The delta config of one matrix (a per-matrix config answers ``for_matrix``)."""
    return config.for_matrix(matrix) if hasattr(config, "for_matrix") else config


@functools.lru_cache(maxsize=64)
def _stored_tensors(config, out_features: int, in_features: int) -> tuple:
    """(name, shape without the experts axis, stacked over experts?, dtype) of what one
    matrix's deltas store, read off a 1-expert module: parameters carry the experts axis
    in checkpoints, buffers (the sparse position seed) do not
    (``DeRSExperts.sharded_state_dict``)."""
    module = build_deltas(config, [0], out_features, in_features, seed=0, matrix="fc2")
    buffers = dict(module.named_buffers())
    return tuple(
        (name, tuple(t.shape[0 if name in buffers else 1:]), name not in buffers, t.dtype)
        for name, t in module.state_dict().items()
    )


def delta_param_shapes(dims: ModelDims, experts: int) -> dict[str, dict[str, tuple[Shape, bool]]]:
    """Per delta matrix, each stored tensor's global shape and whether it has the experts axis."""
    H, F = dims.hidden_size, dims.moe_ffn_hidden_size
    out_in = {"fc1_gate": (F, H), "fc1_up": (F, H), "fc2": (H, F)}
    config = delta_config_of(dims)
    shapes = {}
    for matrix, (out_features, in_features) in out_in.items():
        stored = _stored_tensors(matrix_config(config, matrix), out_features, in_features)
        shapes[matrix] = {name: ((experts, *shape) if stacked else shape, stacked) for name, shape, stacked, _ in stored}
    return shapes


def hf_delta_specs(dims: ModelDims) -> dict[str, str]:
    """The compact format's per-projection delta kinds (``DeRSMoEConfig.ders_matrices``)."""
    config = delta_config_of(dims)
    specs = {}
    for matrix, proj in DELTA_MATRICES.items():
        c = matrix_config(config, matrix)
        if c.kind == "lowrank":
            specs[proj] = f"lowrank:{c.rank}"
        elif c.kind == "sparse":
            specs[proj] = f"sparse:{c.drop_rate!r}"
        elif c.kind == "dense":
            specs[proj] = "dense"
        elif c.kind == "quant":
            _check_group(dims, c)
            specs[proj] = f"quant:{c.bits}"
        elif c.kind == "magnitude":
            specs[proj] = f"indexed:{c.drop_rate!r}"
        else:
            raise ConversionError(f"--format ders cannot hold {c.kind!r} deltas; use mixtral or qwen2_moe "
                                  "(synthesized experts)")
    return specs


def _check_group(dims: ModelDims, config) -> None:
    if config.group_size != dims.ders_quant_group_size:
        raise ConversionError(f"quantized deltas with group size {config.group_size} but the args say "
                              f"{dims.ders_quant_group_size}")


def _delta_copy_maps(dims: ModelDims, m_prefix: str, h_prefix: str, experts: int) -> list[KeyMap]:
    return [
        _entry(f"{m_prefix}{matrix}.{param}", f"{h_prefix}{DELTA_MATRICES[matrix]}.{param}", [shape], [shape], _copy)
        for matrix, params in delta_param_shapes(dims, experts).items()
        for param, (shape, _) in params.items()
    ]


def _synthesized_expert_map(dims: ModelDims, i: int, expert: int | None, hf_names) -> KeyMap:
    """Expert ``expert`` of layer ``i`` (None: the extended-DeRS shared expert) as
    W_base + Δ_e, written as three plain HF projections. Export only."""
    H, F = dims.hidden_size, dims.moe_ffn_hidden_size
    m = f"decoder.layers.{i}.mlp."
    shared = expert is None
    stacked = 1 if shared else dims.num_experts
    params = delta_param_shapes(dims, stacked)
    delta_prefix = f"{m}shared_experts.deltas." if shared else f"{m}experts.deltas."
    delta_names = [(matrix, p) for matrix, ps in params.items() for p in ps]
    names = [f"{m}experts.linear_fc1.weight", f"{m}experts.linear_fc2.weight"]
    names += [f"{delta_prefix}{matrix}.{p}" for matrix, p in delta_names]
    shapes = [(2 * F, H), (H, F)] + [params[matrix][p][0] for matrix, p in delta_names]
    global_expert = dims.num_experts if shared else expert

    def synthesize(ts):
        fc1, fc2, *delta_tensors = ts
        state = {}
        for (matrix, p), tensor in zip(delta_names, delta_tensors):
            has_experts_axis = params[matrix][p][1]
            state.setdefault(matrix, {})[p] = tensor[0 if shared else expert].unsqueeze(0) if has_experts_axis else tensor
        gate, up = torch.chunk(fc1, 2, dim=0)
        bases = {"fc1_gate": gate, "fc1_up": up, "fc2": fc2}
        return [_merge(dims, i, global_expert, matrix, bases[matrix], state[matrix]) for matrix in DELTA_MATRICES]

    return KeyMap(tuple(names), tuple(hf_names), tuple(shapes), ((F, H), (F, H), (H, F)), synthesize)


def _merge(dims: ModelDims, i: int, global_expert: int, matrix: str, base, state: dict) -> torch.Tensor:
    """W_base + Δ_e through ders_megatron.core.deltas itself (same positions, same fp32 merge)."""
    config = matrix_config(delta_config_of(dims), matrix)
    deltas = build_deltas(config, [global_expert], *base.shape, seed=dims.ders_seed, matrix=matrix, dtype=base.dtype)
    deltas.layer = i + 1  # megatron's 1-based layer number (transformer_layer.py:440)
    deltas.load_state_dict(state)
    return deltas.merge(base, 0).contiguous()


def check_embedding_tie(dims: ModelDims, source) -> None:
    """Refuse a folder whose weights contradict ``tie_word_embeddings``: untied without an
    ``lm_head.weight``, or tied with an ``lm_head.weight`` that is not the embedding.
    ``source`` answers ``keys()`` and ``get(name)`` (:class:`~ders_megatron.convert.hf.hf_files.HFSource`)."""
    has_head = "lm_head.weight" in source.keys()
    if not dims.tie_embeddings and not has_head:
        raise KeyMapError("config.json says tie_word_embeddings=false but the weights have no lm_head.weight; "
                          "set tie_word_embeddings=true if the output layer is the embedding")
    if dims.tie_embeddings and has_head and not _same_rows(source, "lm_head.weight", "model.embed_tokens.weight"):
        raise KeyMapError("config.json says tie_word_embeddings=true but lm_head.weight differs from "
                          "model.embed_tokens.weight; set tie_word_embeddings=false to keep both")


def _same_rows(source, a: str, b: str, rows_per_read: int = 4096) -> bool:
    """Tensors ``a`` and ``b`` equal, compared in row blocks where ``source`` reads rows
    (``rows(name, start, stop)``: the streamed import never holds two embeddings)."""
    if not hasattr(source, "rows"):
        return torch.equal(source.get(a), source.get(b))
    count = source.describe(a).shape[0]
    if source.describe(b).shape[0] != count:
        return False
    return all(torch.equal(source.rows(a, start, start + rows_per_read), source.rows(b, start, start + rows_per_read))
               for start in range(0, count, rows_per_read))


def layer_maps(dims: ModelDims, fmt: str, i: int) -> list[KeyMap]:
    return attention_maps(dims, i) + mlp_maps(dims, fmt, i)


def all_maps(dims: ModelDims, fmt: str) -> list[KeyMap]:
    maps = global_maps(dims)
    for i in range(dims.num_layers):
        maps += layer_maps(dims, fmt, i)
    return maps
