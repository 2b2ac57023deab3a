"""Decompose trained experts into one base and per-expert deltas; encode the deltas.

:func:`compress_experts` is the in-memory interface (a Megatron checkpoint, an
HF Mixtral/Qwen2-MoE/OLMoE import, anything that can hand over expert weight
tensors): per-matrix stacks ``[E, out, in]`` in, base + delta modules out.

Bases (``W_base``):

* ``dense``: the dense FFN the MoE was upcycled from (given);
* ``mean``: the plain mean of the experts;
* ``fisher``: D2-MoE's Fisher-weighted merge, element-wise:
  ``W_base = Σ_e F_e ⊙ W_e / Σ_e F_e`` with ``F_e = f_e · E_batches[(∂L/∂W_e)²]``,
  ``f_e`` the expert's share of routed tokens on the calibration text. Where all
  ``F_e`` vanish (an element no expert's gradient touched) it falls back to the mean.

Gated FFNs: megatron's fc1 is ``[gate; up]`` (``torch.chunk(fc1, 2)``); each half
is its own matrix (``fc1_gate``, ``fc1_up``), as DeRSExperts and the paper count them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ders_megatron.core.codecs import encode
from ders_megatron.core.deltas import build_deltas
from ders_megatron.core.config import CodecError, check_codec, codec_for, codecs_delta_config

BASES = ("dense", "mean", "fisher")
_TINY = 1e-30


@dataclass
class MatrixCalibration:
    """Calibration statistics of one matrix of one MoE layer (all experts)."""

    fisher: torch.Tensor | None = None  # [E, O, I] mean squared gradient
    frequency: torch.Tensor | None = None  # [E] share of routed tokens
    gram: torch.Tensor | None = None  # [E, I, I] X^T X of the matrix's inputs


@dataclass
class LayerCompression:
    """One MoE layer: base per matrix, a delta module per matrix, error statistics."""

    base: dict[str, torch.Tensor]
    deltas: dict[str, torch.nn.Module]
    stats: dict[str, dict] = field(default_factory=dict)


def split_fc1(weight: torch.Tensor, gated: bool) -> dict[str, torch.Tensor]:
    """megatron fc1 ([..., 2F, H] gated as [gate; up]) -> per-matrix tensors."""
    if not gated:
        return {"fc1": weight}
    gate, up = torch.chunk(weight, 2, dim=-2)
    return {"fc1_gate": gate, "fc1_up": up}


def make_base(experts_EOI: torch.Tensor, base: str | torch.Tensor, calib: MatrixCalibration | None = None,
              matrix: str = "") -> torch.Tensor:
    """W_base [O, I] in float32 (see module doc); a tensor ``base`` is used as given."""
    if isinstance(base, torch.Tensor):
        if tuple(base.shape) != tuple(experts_EOI.shape[1:]):
            raise CodecError(
                f"the base of the {matrix} matrix has shape {tuple(base.shape)}, the experts "
                f"{tuple(experts_EOI.shape[1:])}: not the dense model these experts were upcycled from"
            )
        return base.float()
    if base == "mean":
        return experts_EOI.float().mean(0)
    if base == "fisher":
        if calib is None or calib.fisher is None or calib.frequency is None:
            raise CodecError("--base fisher needs calibration gradients (--calib-data)")
        weight = calib.fisher.float() * calib.frequency.float().view(-1, 1, 1)  # [E, O, I]
        total = weight.sum(0)
        merged = (weight * experts_EOI.float()).sum(0) / total.clamp_min(_TINY)
        return torch.where(total > _TINY, merged, experts_EOI.float().mean(0))
    raise CodecError(f"--base must be one of {BASES} or a tensor, got {base!r}")


@torch.no_grad()
def compress_experts(
    weights: dict[str, torch.Tensor],
    codecs: dict,
    *,
    base: str | dict[str, torch.Tensor] = "mean",
    layer_number: int = 1,
    seed: int = 1234,
    expert_ids: list[int] | None = None,
    calibration: dict[str, MatrixCalibration] | None = None,
    dtype: torch.dtype = torch.float32,
) -> LayerCompression:
    """Decompose and encode the experts of one MoE layer.

    ``weights``: matrix name (``fc1_gate``/``fc1_up``/``fc2``, or ``fc1``) ->
    ``[E, out, in]`` expert weights (HF ``gate_proj``/``up_proj``/``down_proj``
    stacked over experts). ``codecs``: :func:`~.codecs.parse_codecs` output.
    ``base``: ``"mean"``, ``"fisher"`` or matrix -> ``[out, in]`` dense weights.
    ``layer_number`` (1-based, global), ``seed`` and ``expert_ids`` (global ids,
    default 0..E-1) fix DARE's positions exactly as a DeRS layer re-derives them.
    Returns bases (float32), delta modules (``ExpertDeltas``, built as
    DeRSExperts builds them, params in ``dtype``) and per-matrix statistics.
    """
    calibration = calibration or {}
    result = LayerCompression({}, {})
    matrices = list(weights)
    table = {m: codec_for(codecs, m) for m in matrices}
    for matrix, experts in weights.items():
        check_codec(table[matrix], matrix, experts.shape[1], experts.shape[2])
    config = codecs_delta_config(codecs, matrices)
    for matrix, experts in weights.items():
        calib = calibration.get(matrix)
        given = base[matrix] if isinstance(base, dict) else base
        w_base = make_base(experts, given, calib, matrix)
        delta_EOI = experts.float() - w_base  # [E, O, I]
        ids = list(range(experts.shape[0])) if expert_ids is None else list(expert_ids)
        module = build_deltas(config, ids, experts.shape[1], experts.shape[2], seed=seed, matrix=matrix, dtype=dtype)
        module.set_layer_number(layer_number)
        encode(table[matrix], delta_EOI, module, calib.gram if calib is not None else None)
        result.base[matrix] = w_base
        result.deltas[matrix] = module
        result.stats[matrix] = reconstruction_stats(experts, w_base, module)
    return result


@torch.no_grad()
def reconstruction_stats(experts_EOI: torch.Tensor, w_base: torch.Tensor, module) -> dict:
    """Relative error ||Ŵ_e - W_e|| / ||W_e||, of the delta ||Δ̂_e - Δ_e|| / ||Δ_e||, the delta's
    size ||Δ_e|| / ||W_e|| (the largest over experts) and cosine(Ŵ_e, W_e), over experts (one
    expert matrix synthesized at a time)."""
    rel, delta_rel, delta_norm, cos = [], [], [], []
    for e in range(experts_EOI.shape[0]):
        w = experts_EOI[e].float()
        approx = w_base + module.delta_weight(e).float()
        rel.append(((approx - w).norm() / w.norm().clamp_min(_TINY)).item())
        delta = w - w_base
        delta_rel.append(((approx - w).norm() / delta.norm().clamp_min(_TINY)).item())
        delta_norm.append((delta.norm() / w.norm().clamp_min(_TINY)).item())
        cos.append(torch.nn.functional.cosine_similarity(approx.flatten(), w.flatten(), dim=0).item())
    return {
        "rel_error": max(rel),
        "rel_error_mean": sum(rel) / len(rel),
        "delta_rel_error": max(delta_rel),
        "delta_norm": max(delta_norm),  # ||W_e - W_base|| / ||W_e||: how far the experts are from the base
        "cosine_min": min(cos),
        "cosine_mean": sum(cos) / len(cos),
    }
