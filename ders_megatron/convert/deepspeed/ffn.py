"""The math of DeRS experts for DeepSpeed-MoE: no ranks, no DeepSpeed import.

DeepSpeed's ``MOELayer`` calls its experts once per layer as ``experts(x)`` with
``x`` shaped ``[ep_size, num_local_experts, capacity, d_model]``
(``deepspeed/moe/sharded_moe.py:716-717``) and reads back the same shape. The
stock ``Experts`` runs one FFN per chunk of axis 1 (``deepspeed/moe/experts.py:28``).
:class:`DeRSLocalExperts` runs every local expert as ``W_e = W_base + Δ_e``: the
base product is ONE dense GEMM over all rows (the weight is the same for every
expert); the deltas add a per-expert term on each expert's rows, as the
megatron path does (``ders_megatron/layers/experts.py``). For gated FFNs the gate and
up projections carry separate deltas (``fc1_gate``, ``fc1_up``).

Parameter layout (what the checkpoint keys look like, see ``layer.py``):

* the shared base, :class:`SharedBase` (``linear_fc1``, ``linear_fc2``), is held
  by the MoE layer under a name without "expert";
* the deltas of local expert ``i`` live in ``deepspeed_experts.<i>`` (one
  :class:`ExpertDelta` per expert, each ``deltas.<matrix>`` an
  :class:`~ders_megatron.core.deltas.ExpertDeltas` of ONE expert, stacked axis of
  size 1), because DeepSpeed's checkpoint code splits expert parameters into
  one file per expert by that index.

Shapes: ``G`` EP ranks, ``E`` local experts, ``C`` capacity, ``D`` hidden,
``F`` FFN hidden (``F'`` = 2F when gated), ``T`` rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from ders_megatron.core.config import DenseDeltaConfig, LowRankDeltaConfig, SparseDeltaConfig
from ders_megatron.core.deltas import build_deltas, derive_seed, merge_ffn

DeltaConfig = Union[LowRankDeltaConfig, SparseDeltaConfig, DenseDeltaConfig]
ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}


def _require_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"DeRSFFNConfig.{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class DeRSFFNConfig:
    """One DeRS MoE layer's experts. Matrix names and seeds follow the megatron path, so a
    layer built here with ``layer_number`` L initialises its deltas exactly as megatron's
    ``DeRSExperts`` of layer L (and sparse positions agree, which conversion needs)."""

    hidden_size: int
    ffn_hidden_size: int
    num_experts: int
    delta: DeltaConfig = field(default_factory=LowRankDeltaConfig)
    gated: bool = False  # fc1 is [gate; up] and the activation is act(gate) * up (SwiGLU with silu)
    activation: str = "gelu"  # one of ACTIVATIONS
    bias: bool = False  # one fc1/fc2 bias in the shared base (as the megatron path)
    seed: int = 1234  # --moe-ders-seed: deltas and base init, sparse positions
    layer_number: int = 1  # megatron's 1-based layer number of this MoE layer
    init_method_std: float = 0.02  # base init N(0, std), fc2 scaled by 1/sqrt(2 * num_layers)
    num_layers: int = 1
    freeze_base: bool = False
    params_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        _require_int(self.hidden_size, "hidden_size", 1)
        _require_int(self.ffn_hidden_size, "ffn_hidden_size", 1)
        _require_int(self.num_experts, "num_experts", 1)
        _require_int(self.layer_number, "layer_number", 1)
        _require_int(self.num_layers, "num_layers", 1)
        if not isinstance(self.delta, (LowRankDeltaConfig, SparseDeltaConfig, DenseDeltaConfig)):
            raise ValueError(
                "DeRSFFNConfig.delta must be a LowRankDeltaConfig, SparseDeltaConfig or "
                f"DenseDeltaConfig, got {type(self.delta).__name__}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"DeRSFFNConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if not self.init_method_std > 0:
            raise ValueError(f"DeRSFFNConfig.init_method_std must be > 0, got {self.init_method_std!r}")

    def matrices(self) -> dict[str, tuple[int, int]]:
        """[out, in] of each expert matrix that carries a delta (megatron's names)."""
        d, f = self.hidden_size, self.ffn_hidden_size
        if self.gated:
            return {"fc1_gate": (f, d), "fc1_up": (f, d), "fc2": (d, f)}
        return {"fc1": (f, d), "fc2": (d, f)}

    @property
    def fc1_matrices(self) -> tuple[str, ...]:
        return ("fc1_gate", "fc1_up") if self.gated else ("fc1",)


class SharedBase(nn.Module):
    """W_base: the dense FFN every expert shares (megatron's ``linear_fc1``/``linear_fc2``
    layout: fc1 is ``[gate; up]`` when gated)."""

    def __init__(self, config: DeRSFFNConfig):
        super().__init__()
        self.config = config
        d, f = config.hidden_size, config.ffn_hidden_size
        fc1_out = 2 * f if config.gated else f
        kw = dict(bias=config.bias, dtype=config.params_dtype)
        self.linear_fc1 = nn.Linear(d, fc1_out, **kw)  # weight [F', D]
        self.linear_fc2 = nn.Linear(f, d, **kw)  # weight [D, F]
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Megatron's init (``init_method_normal`` / ``scaled_init_method_normal``,
        ``megatron/core/utils.py:828-837``) from the seed the megatron path derives
        (``DeRSExperts.reset_base_parameters``): identical on every rank and EP layout."""
        c = self.config
        stds = {"base_fc1": c.init_method_std, "base_fc2": c.init_method_std / math.sqrt(2.0 * c.num_layers)}
        for name, linear in (("base_fc1", self.linear_fc1), ("base_fc2", self.linear_fc2)):
            gen = torch.Generator().manual_seed(derive_seed(c.seed, c.layer_number, -1, name))
            full = torch.empty(linear.weight.shape, dtype=torch.float32)
            linear.weight.copy_(nn.init.normal_(full, 0.0, stds[name], generator=gen))
            if linear.bias is not None:
                linear.bias.zero_()

    @torch.no_grad()
    def load_dense_(self, fc1_weight, fc2_weight, fc1_bias=None, fc2_bias=None) -> None:
        """Upcycling: the base becomes the dense FFN (fc1 as ``[gate; up]`` when gated)."""
        pairs = [(self.linear_fc1.weight, fc1_weight, "fc1_weight"), (self.linear_fc2.weight, fc2_weight, "fc2_weight")]
        for linear, bias, name in ((self.linear_fc1, fc1_bias, "fc1_bias"), (self.linear_fc2, fc2_bias, "fc2_bias")):
            if (bias is None) != (linear.bias is None):
                raise ValueError(f"{name} must be given exactly when DeRSFFNConfig.bias is True")
            if bias is not None:
                pairs.append((linear.bias, bias, name))
        for param, value, name in pairs:
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{name} has shape {tuple(value.shape)}, the base expects {tuple(param.shape)}")
            param.copy_(value)

    def activation(self, fc1_TF: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.config.activation]
        if not self.config.gated:
            return act(fc1_TF)
        gate_TF, up_TF = torch.chunk(fc1_TF, 2, dim=-1)
        return act(gate_TF) * up_TF


class ExpertDelta(nn.Module):
    """Δ_e of one global expert for every matrix: ``deltas.<matrix>`` (a one-expert
    :class:`~ders_megatron.core.deltas.ExpertDeltas`, parameters ``[1, ...]``)."""

    def __init__(self, config: DeRSFFNConfig, expert_id: int):
        super().__init__()
        self.expert_id = expert_id
        self.deltas = nn.ModuleDict()
        for matrix, (out, inp) in config.matrices().items():
            deltas = build_deltas(config.delta, [expert_id], out, inp, seed=config.seed, matrix=matrix, dtype=config.params_dtype)
            deltas.set_layer_number(config.layer_number)  # seeds and positions depend on the layer
            self.deltas[matrix] = deltas

    def delta_product(self, x_TI: torch.Tensor, matrices: tuple[str, ...]) -> torch.Tensor:
        """x @ Δ^T for ``matrices`` side by side -> [T, Σ O]."""
        parts = [self.deltas[m].apply_delta(x_TI, 0) for m in matrices]
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    @torch.no_grad()
    def synthesized_weights(self, base: SharedBase) -> dict[str, torch.Tensor]:
        """W_e = W_base + Δ_e (fp32 merge, finite check), keyed like the base's parameters."""
        return merge_ffn(self.deltas, 0, base.linear_fc1.weight, base.linear_fc2.weight)


class DeRSLocalExperts(nn.Module):
    """The local experts of one DeepSpeed MoE layer, in place of ``deepspeed.moe.experts.Experts``.

    ``base`` is used, not owned: it is kept out of this module's parameters so that
    no key of the shared base contains "expert" (DeepSpeed routes such keys to the
    per-expert checkpoint files, ``runtime/engine.py:5102`` and ``:5003``).
    """

    def __init__(self, config: DeRSFFNConfig, base: SharedBase, expert_ids):
        super().__init__()
        self.config = config
        self.__dict__["base"] = base  # a reference, not a submodule (see class docstring)
        self.expert_ids = list(expert_ids)
        self.num_local_experts = len(self.expert_ids)
        self.deepspeed_experts = nn.ModuleList(ExpertDelta(config, e) for e in self.expert_ids)

    def _delta_terms(self, x_TI: torch.Tensor, rows: int, matrices: tuple[str, ...]) -> torch.Tensor:
        """Per local expert, its ``rows`` consecutive rows times its Δ -> [T, Σ O]."""
        parts = [expert.delta_product(x_seg, matrices) for expert, x_seg in zip(self.deepspeed_experts, x_TI.split(rows))]
        return torch.cat(parts, dim=0)

    def forward(self, x_GECD: torch.Tensor) -> torch.Tensor:
        G, E, C, D = x_GECD.shape
        if E != self.num_local_experts:
            raise ValueError(f"expected {self.num_local_experts} local experts on axis 1, got input {tuple(x_GECD.shape)}")
        base = self.base
        rows = G * C  # rows per local expert
        x_TD = x_GECD.transpose(0, 1).reshape(E * rows, D)  # grouped by local expert
        fc1_TF = base.linear_fc1(x_TD) + self._delta_terms(x_TD, rows, self.config.fc1_matrices)  # base: one GEMM
        h_TF = base.activation(fc1_TF)
        out_TD = base.linear_fc2(h_TF) + self._delta_terms(h_TF, rows, ("fc2",))
        return out_TD.view(E, G, C, D).transpose(0, 1)  # [G, E, C, D]; MOELayer reshapes it
