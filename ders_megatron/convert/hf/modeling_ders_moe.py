"""The compact DeRS MoE model for Hugging Face transformers (``model_type = "ders_moe"``).

Every routed expert of a MoE layer is ``W_e = W_base + Δ_e``: the checkpoint
holds the shared base once and a light delta per expert, so it is about as
large as the dense model it was upcycled from (DeRS, arXiv 2503.01359).

This file is copied next to every ``--format ders`` export and loaded by
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``. It must
not import ders-megatron: the sparse-position derivation
(:func:`derive_seed`, :func:`sample_unique`) and :func:`unpack_bits` are copies of
``ders_megatron/core/deltas.py`` and a test keeps them identical.

The decoder is the one of the transformers family ``config.base_model_type``
(Qwen2-MoE: attention with optional q/k/v bias; Qwen3-MoE: per-head QK-norm; OLMoE:
QK-norm over all heads at once), built
by transformers itself (its ``...Model`` class: embeddings, attention, norms, RoPE,
dense MLPs, masks, cache); only the expert computation of each MoE layer is DeRS
(:class:`DeRSMoEBlock`, with the family's own router and shared-expert MLP classes).
So a new attention or norm variant of a family comes from transformers, not from a copy.

Checkpoint keys of one MoE layer (``E`` experts, ``F`` moe_intermediate_size,
``H`` hidden_size, ``R`` rank, ``K`` kept values, ``P`` in gate_proj/up_proj/down_proj):

    model.layers.N.mlp.gate.weight                       [E, H]  router
    model.layers.N.mlp.base.{gate,up}_proj.weight        [F, H]  shared base
    model.layers.N.mlp.base.down_proj.weight             [H, F]
    model.layers.N.mlp.experts.P.lora_A / lora_B         [E, R, in] / [E, out, R]   lowrank
    model.layers.N.mlp.experts.P.values / position_seed  [E, K] / [1] int64         sparse
    model.layers.N.mlp.experts.P.weight                  [E, out, in]               dense
    model.layers.N.mlp.experts.P.codes / scales / offsets  [E, out, ⌈in·K/8⌉] uint8 / [E, out, in/G]  quant:K
    model.layers.N.mlp.experts.P.values / indices        [E, K] / [E, K] int          indexed
    model.layers.N.mlp.shared_expert.P.weight                 shared_expert_kind="full"
    model.layers.N.mlp.shared_expert_deltas.P.*  (E = 1)      shared_expert_kind="ders"
    model.layers.N.mlp.shared_expert_gate.weight         [1, H]  shared_expert_gate
"""


import contextlib
import hashlib
import importlib

import numpy as np
import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeForCausalLM, Qwen2MoePreTrainedModel

from .configuration_ders_moe import DeRSMoEConfig

# base_model_type -> (transformers module, class-name prefix) of the family's decoder.
FAMILIES = {
    "qwen2_moe": ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2Moe"),
    "qwen3_moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3Moe"),
    "olmoe": ("transformers.models.olmoe.modeling_olmoe", "Olmoe"),
}


def family_class(config, suffix: str):
    """The family's own class ``<Prefix><suffix>`` (``Model``, ``TopKRouter``, ``MLP``)."""
    module, prefix = FAMILIES[config.base_model_type]
    return getattr(importlib.import_module(module), prefix + suffix)

# HF projection name -> the matrix name ders-megatron derives sparse seeds from.
MATRIX_SEED_NAMES = {"gate_proj": "fc1_gate", "up_proj": "fc1_up", "down_proj": "fc2"}


# --------------------------------------------------------------------------- #
# Sparse positions: copies of ders_megatron.core.deltas.derive_seed / sample_unique.
# --------------------------------------------------------------------------- #
def derive_seed(seed: int, layer: int, expert: int, matrix: str) -> int:
    """A stable 63-bit seed for one (layer number, global expert, matrix)."""
    digest = hashlib.sha256(f"{seed}/{layer}/{expert}/{matrix}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_unique(n: int, k: int, seed: int) -> torch.Tensor:
    """k distinct integers from [0, n), deterministic in ``seed``; sorted."""
    if k > n:
        raise ValueError(f"cannot keep {k} positions of {n}")
    rng = np.random.default_rng(seed)
    if 2 * k > n:
        return torch.from_numpy(np.sort(rng.permutation(n)[:k])).long()
    picked = np.empty(0, dtype=np.int64)
    while picked.size < k:
        draw = np.concatenate([picked, rng.integers(0, n, size=2 * (k - picked.size) + 16)])
        _, first = np.unique(draw, return_index=True)
        picked = draw[np.sort(first)]
    return torch.from_numpy(np.sort(picked[:k])).long()


def sparse_kept(drop_rate: float, out_features: int, in_features: int) -> int:
    """Values a sparse delta keeps: round((1 - p) · O · I), as ders-megatron counts them."""
    return round((1.0 - drop_rate) * out_features * in_features)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """uint8 [..., ceil(count·bits/8)] -> int32 codes [..., count]; little-endian bit stream
    (a copy of ders_megatron.core.deltas.unpack_bits)."""
    bit_of_byte = torch.arange(8, dtype=torch.int32, device=packed.device)  # on the codes' device (CUDA too)
    stream = ((packed.to(torch.int32).unsqueeze(-1) >> bit_of_byte) & 1).flatten(-2)
    stream = stream[..., : count * bits].unflatten(-1, (count, bits))
    return (stream << torch.arange(bits, dtype=torch.int32, device=packed.device)).sum(-1)


# --------------------------------------------------------------------------- #
# Deltas of one matrix for a set of experts.
# --------------------------------------------------------------------------- #
class DeRSDeltas(nn.Module):
    """Δ_e of one [out, in] matrix for ``num_experts`` experts (global ids from
    ``first_expert``), of kind ``config.ders_matrices[matrix]`` (configuration doc)."""

    def __init__(self, config, num_experts, out_features, in_features, *, layer_number, first_expert, matrix):
        super().__init__()
        self.kind, _, value = config.ders_matrices[matrix].partition(":")
        self.out_features, self.in_features = out_features, in_features
        self.layer_number = layer_number  # 1-based, as megatron-core numbers layers
        self.first_expert = first_expert
        self.seed_name = MATRIX_SEED_NAMES[matrix]
        E, O, I = num_experts, out_features, in_features
        if self.kind == "lowrank":
            self.scale = config.ders_scale
            self.lora_A = nn.Parameter(torch.zeros(E, int(value), I))  # [E, R, I]
            self.lora_B = nn.Parameter(torch.zeros(E, O, int(value)))  # [E, O, R]
        elif self.kind == "sparse":
            self.values = nn.Parameter(torch.zeros(E, sparse_kept(float(value), O, I)))  # [E, K]
            self.register_buffer("position_seed", torch.zeros(1, dtype=torch.int64))
            self._flat_positions = None  # (seed tensor, its version, flat positions [E, K] on its device)
        elif self.kind == "dense":
            self.weight = nn.Parameter(torch.zeros(E, O, I))  # [E, O, I]
        elif self.kind == "quant":
            self.bits, self.group = int(value), min(config.ders_quant_group_size, I)
            self.register_buffer("codes", torch.zeros(E, O, (I * self.bits + 7) // 8, dtype=torch.uint8))
            self.scales = nn.Parameter(torch.zeros(E, O, I // self.group))  # [E, O, I/G]
            if self.bits > 1:
                self.offsets = nn.Parameter(torch.zeros(E, O, I // self.group))
        else:  # indexed
            kept = sparse_kept(float(value), O, I)
            self.values = nn.Parameter(torch.zeros(E, kept))  # [E, K]
            index_dtype = torch.int32 if O * I <= 2**31 - 1 else torch.int64
            self.register_buffer("indices", torch.zeros(E, kept, dtype=index_dtype))  # sorted flat positions

    def positions(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) of the kept entries of Δ_e: stored, or re-derived from the seed."""
        flat = (self.indices if self.kind == "indexed" else self.seed_positions())[expert].long()
        return flat // self.in_features, flat % self.in_features

    def seed_positions(self) -> torch.Tensor:
        """Flat positions [E, K] of every expert, derived from ``position_seed`` once (its one
        read to the host, at the first forward after a load) and kept on the values' device
        (int32 where O·I fits, as the indexed kind stores them):
        later forwards do no host sync and no host-to-device copy for them. Rebuilt when the
        seed tensor is replaced or written (a load) or the module moves."""
        seed_t, device = self.position_seed, self.values.device
        cached = self._flat_positions
        if cached is None or cached[0] is not seed_t or cached[1] != seed_t._version or cached[2].device != device:
            seed = int(seed_t.item())
            flat_EK = torch.stack([
                sample_unique(self.out_features * self.in_features, self.values.shape[1],
                              derive_seed(seed, self.layer_number, self.first_expert + e, self.seed_name))
                for e in range(self.values.shape[0])
            ])
            index_dtype = torch.int32 if self.out_features * self.in_features <= 2**31 - 1 else torch.int64
            self._flat_positions = (seed_t, seed_t._version, flat_EK.to(device, index_dtype))
        return self._flat_positions[2]

    def delta_weight(self, expert: int) -> torch.Tensor:
        """Δ_e as a dense [O, I] tensor, accumulated in fp32."""
        if self.kind == "lowrank":
            return self.scale * (self.lora_B[expert].float() @ self.lora_A[expert].float())
        if self.kind == "dense":
            return self.weight[expert].float()
        if self.kind == "quant":
            return self._dequantized(expert)
        rows, cols = self.positions(expert)
        device = self.values.device
        dense = torch.zeros(self.out_features, self.in_features, device=device)
        return dense.index_put((rows.to(device), cols.to(device)), self.values[expert].float())

    def _dequantized(self, expert: int) -> torch.Tensor:
        q_OGS = unpack_bits(self.codes[expert], self.bits, self.in_features).float().unflatten(-1, (-1, self.group))
        scale_OG1 = self.scales[expert].float().unsqueeze(-1)
        if self.bits == 1:
            return ((2.0 * q_OGS - 1.0) * scale_OG1).flatten(-2)  # sign · scale (BitDelta)
        return (self.offsets[expert].float().unsqueeze(-1) + q_OGS * scale_OG1).flatten(-2)

    def forward(self, x_TI: torch.Tensor, expert: int) -> torch.Tensor:
        """x [T, I] @ Δ_e^T -> [T, O] (low-rank without materializing Δ_e)."""
        if self.kind == "lowrank":
            return (x_TI @ self.lora_A[expert].t()) @ self.lora_B[expert].t() * self.scale
        return x_TI @ self.delta_weight(expert).to(x_TI.dtype).t()


class DeRSBaseFFN(nn.Module):
    """The shared base W_base of a MoE layer (the dense FFN it was upcycled from)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)


def _delta_set(config, num_experts, layer_number, first_expert) -> nn.ModuleDict:
    hidden, ffn = config.hidden_size, config.moe_intermediate_size
    shapes = {"gate_proj": (ffn, hidden), "up_proj": (ffn, hidden), "down_proj": (hidden, ffn)}
    return nn.ModuleDict(
        {
            name: DeRSDeltas(
                config, num_experts, out, inp, layer_number=layer_number, first_expert=first_expert, matrix=name
            )
            for name, (out, inp) in shapes.items()
        }
    )


class DeRSMoEBlock(nn.Module):
    """Router + (base + Δ_e) experts + optional shared expert, for one layer.

    Computed as megatron-core's DeRS drop-in experts do: per expert, the base
    product plus the delta term, the routing probability applied before the
    down projection.
    """

    def __init__(self, config: DeRSMoEConfig, layer_idx: int):
        super().__init__()
        self.num_experts = config.num_experts
        self.act_fn = ACT2FN[config.hidden_act]
        self.gate = family_class(config, "TopKRouter")(config)  # the family's router (and its recorder)
        self.base = DeRSBaseFFN(config.hidden_size, config.moe_intermediate_size)
        self.experts = _delta_set(config, config.num_experts, layer_idx + 1, 0)
        self.shared_expert_kind = config.shared_expert_kind
        if self.shared_expert_kind == "full":
            self.shared_expert = family_class(config, "MLP")(
                config, intermediate_size=config.shared_expert_intermediate_size
            )
        elif self.shared_expert_kind == "ders":
            # The shared expert's seeds use the global expert id num_experts.
            self.shared_expert_deltas = _delta_set(config, 1, layer_idx + 1, config.num_experts)
        self.shared_expert_gate = (
            nn.Linear(config.hidden_size, 1, bias=False)
            if self.shared_expert_kind != "none" and config.shared_expert_gate
            else None
        )

    def _expert(self, x_TH, deltas, expert, probs_T=None):
        """One expert's FFN: (W_base + Δ_e) products, SwiGLU, optional probability scale."""
        gate_TF = self.base.gate_proj(x_TH) + deltas["gate_proj"](x_TH, expert)
        up_TF = self.base.up_proj(x_TH) + deltas["up_proj"](x_TH, expert)
        h_TF = self.act_fn(gate_TF) * up_TF
        if probs_T is not None:
            h_TF = h_TF * probs_T.unsqueeze(-1).to(h_TF.dtype)
        return self.base.down_proj(h_TF) + deltas["down_proj"](h_TF, expert)

    def _shared(self, x_TH):
        if self.shared_expert_kind == "full":
            out_TH = self.shared_expert(x_TH)
        else:
            out_TH = self._expert(x_TH, self.shared_expert_deltas, 0)
        if self.shared_expert_gate is not None:
            out_TH = torch.sigmoid(self.shared_expert_gate(x_TH)) * out_TH
        return out_TH

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        x_TH = hidden_states.reshape(-1, hidden)
        _, weights_TK, experts_TK = self.gate(x_TH)
        out_TH = torch.zeros_like(x_TH)
        for expert in experts_TK.unique().tolist():
            token, slot = torch.where(experts_TK == expert)
            y = self._expert(x_TH[token], self.experts, expert, weights_TK[token, slot])
            out_TH.index_add_(0, token, y.to(out_TH.dtype))
        if self.shared_expert_kind != "none":
            out_TH = out_TH + self._shared(x_TH)
        return out_TH.reshape(batch, seq, hidden)


# --------------------------------------------------------------------------- #
# Decoder: the family's own, with DeRS MoE blocks.
# --------------------------------------------------------------------------- #
def is_moe_layer(config, layer_idx: int) -> bool:
    """The rule of Qwen2-MoE and Qwen3-MoE (``Qwen2MoeDecoderLayer.__init__``)."""
    return (
        layer_idx not in config.mlp_only_layers
        and config.num_experts > 0
        and (layer_idx + 1) % config.decoder_sparse_step == 0
    )


@contextlib.contextmanager
def _dense_layers_only(config):
    """While the family builds its decoder, every layer is dense (Qwen2/3-MoE:
    ``mlp_only_layers``) or its MoE block has no experts (OLMoE, MoE in every layer:
    ``num_experts`` 0): the full experts (E times a FFN per layer) are never allocated
    only to be replaced."""
    saved = list(config.mlp_only_layers), config.num_experts
    config.mlp_only_layers = list(range(config.num_hidden_layers))
    if config.base_model_type == "olmoe":
        config.num_experts = 0
    try:
        yield
    finally:
        config.mlp_only_layers, config.num_experts = saved


def build_decoder(config: DeRSMoEConfig) -> nn.Module:
    """The family's ``...Model`` (transformers' own class, on this very config) with each
    MoE layer's MLP replaced by a :class:`DeRSMoEBlock`."""
    with _dense_layers_only(config):
        decoder = family_class(config, "Model")(config)
    for layer_idx, layer in enumerate(decoder.layers):
        if is_moe_layer(config, layer_idx):
            layer.mlp = DeRSMoEBlock(config, layer_idx)
    return decoder


class DeRSMoEPreTrainedModel(Qwen2MoePreTrainedModel):
    config_class = DeRSMoEConfig
    config: DeRSMoEConfig
    _no_split_modules = ["Qwen2MoeDecoderLayer", "Qwen3MoeDecoderLayer", "OlmoeDecoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DeRSDeltas):  # a fresh DeRS model equals its base
            for param in module.parameters(recurse=False):
                init.zeros_(param)


class DeRSMoEForCausalLM(DeRSMoEPreTrainedModel, Qwen2MoeForCausalLM):
    """Causal LM head over :func:`build_decoder`. The head's forward (logits, loss, router
    aux loss) is Qwen2-MoE's, the same computation as Qwen3-MoE's."""

    def __init__(self, config: DeRSMoEConfig):
        DeRSMoEPreTrainedModel.__init__(self, config)
        self.model = build_decoder(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()


__all__ = ["DeRSMoEForCausalLM", "DeRSMoEPreTrainedModel"]
