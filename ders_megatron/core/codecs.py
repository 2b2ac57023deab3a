"""Delta codecs: turn trained deltas Δ_e = W_e - W_base into a light delta module.

Each codec names the delta module that stores it (``ders_megatron.core.deltas``) and
fills that module from the dense deltas of all experts of one matrix
(``delta_EOI`` [E, O, I], float32), one expert at a time:

=================  ==============================================  ======================
spec               what is stored per expert matrix                module
=================  ==============================================  ======================
``dare:P``         values at K = round((1-P)·O·I) uniformly drawn  ``SparseDeltas``
                   positions, times O·I/K (unbiased); positions    (``--moe-ders sparse``)
                   re-derived from the seed, not stored
``magnitude:P``    the K largest |Δ| values + int32 flat indices    ``IndexedSparseDeltas``
``quant:K``        K-bit codes packed in bytes + per-group scale    ``QuantDeltas``
                   (and offset for K >= 2); K in {1, 2, 3, 4, 8}
``svd:R``          truncated SVD, B = U_R·S_R, A = V_R^T            ``LowRankDeltas``
                                                                    (``--moe-ders lowrank``)
``wsvd:R``         SVD of Δ·L (C = X^T X = L L^T from calibration   ``LowRankDeltas``
                   inputs), B = U_R S_R, A = V_R^T L^{-1} (D2-MoE)
=================  ==============================================  ======================

``config.parse_codecs("fc1:quant:4,fc2:svd:8")`` gives a codec per matrix (``fc1`` also
covers the gated ``fc1_gate``/``fc1_up``); a single spec applies to all.
"""

from __future__ import annotations

import math

import torch

from ders_megatron.core.config import SVD, Codec, CodecError, Dare, Magnitude, Quant
from ders_megatron.core.deltas import pack_bits



@torch.no_grad()
def encode(codec: Codec, delta_EOI: torch.Tensor, module, calib=None) -> None:
    """Fill ``module`` (built from ``codec.delta_config()``) from the dense deltas
    ``delta_EOI`` [E, O, I] of its experts; ``calib``: per-expert input Gram matrices
    (``wsvd`` only)."""
    _ENCODERS[type(codec)](codec, delta_EOI, module, calib)


def _encode_dare(codec: Dare, delta_EOI, module, calib) -> None:
    out, inp = module.out_features, module.in_features
    scale = out * inp / module.kept  # exactly 1/(1-P) up to the rounding of K
    for e in range(module.num_experts):
        row, col, index = module.positions(e)
        values = torch.empty(module.kept, dtype=torch.float32)
        values[index] = delta_EOI[e][row, col] * scale
        module.values[e].copy_(values.to(module.values.dtype))


def _encode_magnitude(codec: Magnitude, delta_EOI, module, calib) -> None:
    for e in range(module.num_experts):
        flat = delta_EOI[e].reshape(-1)
        index = torch.topk(flat.abs(), module.kept, sorted=False).indices.sort().values
        module.indices[e].copy_(index.to(module.indices.dtype))
        module.values[e].copy_(flat[index].to(module.values.dtype))


def _encode_quant(codec: Quant, delta_EOI, module, calib) -> None:
    for e in range(module.num_experts):
        codes, scale, offset = quantize(delta_EOI[e].float(), codec.bits, module.group)
        module.codes[e].copy_(pack_bits(codes, codec.bits))
        module.scales[e].copy_(scale)
        if offset is not None:
            module.offsets[e].copy_(offset)


def _encode_svd(codec: SVD, delta_EOI, module, calib) -> None:
    if codec.whiten and calib is None:
        raise CodecError(f"{codec.spec} needs calibration inputs (--calib-data)")
    for e in range(module.num_experts):
        gram = calib[e] if codec.whiten else None
        b_OR, a_RI = low_rank(delta_EOI[e].double(), codec.rank, gram, codec.damping)
        module.lora_B[e].copy_(b_OR.to(module.lora_B.dtype))
        module.lora_A[e].copy_(a_RI.to(module.lora_A.dtype))


_ENCODERS = {Dare: _encode_dare, Magnitude: _encode_magnitude, Quant: _encode_quant, SVD: _encode_svd}


# --------------------------------------------------------------------------- #
# Math
# --------------------------------------------------------------------------- #
def quantize(delta_OI: torch.Tensor, bits: int, group: int):
    """(codes [O, I] int, scale [O, I/G], offset [O, I/G] or None) of one matrix.

    bits = 1: Δ̂ = sign(Δ)·s, s = mean |Δ| over the group (the L2-optimal scale for
    signs). bits >= 2: Δ̂ = lo + q·step, lo/hi = group min/max, step = (hi - lo) /
    (2**bits - 1), q = round((Δ - lo) / step): |Δ - Δ̂| <= step / 2.
    """
    d_OGS = delta_OI.unflatten(-1, (-1, group))
    if bits == 1:
        scale = d_OGS.abs().mean(-1)
        return (d_OGS >= 0).flatten(-2).to(torch.int32), scale, None
    lo, hi = d_OGS.amin(-1), d_OGS.amax(-1)
    levels = 2**bits - 1
    step = (hi - lo) / levels
    step = torch.where(step > 0, step, torch.ones_like(step))  # constant group: q = 0 is exact
    q = torch.round((d_OGS - lo.unsqueeze(-1)) / step.unsqueeze(-1)).clamp_(0, levels)
    return q.flatten(-2).to(torch.int32), step, lo


def low_rank(delta_OI: torch.Tensor, rank: int, gram_II: torch.Tensor | None = None, damping: float = 1e-2):
    """(B [O, R], A [R, I]) with B @ A the best rank-R approximation of Δ in the
    Frobenius norm, or in ||(Δ - BA) X^T|| when ``gram_II`` = X^T X is given."""
    if gram_II is None:
        u, s, vh = torch.linalg.svd(delta_OI, full_matrices=False)
        return u[:, :rank] * s[:rank], vh[:rank]
    gram = gram_II.double()
    gram = gram + damping * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype)
    chol = torch.linalg.cholesky(gram)  # C = L L^T, ||Δ X^T||² = ||Δ L||²
    u, s, vh = torch.linalg.svd(delta_OI @ chol, full_matrices=False)
    a_RI = torch.linalg.solve_triangular(chol, vh[:rank], upper=False, left=False)  # V^T L^{-1}
    return u[:, :rank] * s[:rank], a_RI


def storage_bits(codec: Codec, out_features: int, in_features: int) -> float:
    """Bits per expert matrix the codec stores (for reports and size checks)."""
    n = out_features * in_features
    if isinstance(codec, Dare):
        return 32 * codec.delta_config().kept(out_features, in_features)
    if isinstance(codec, Magnitude):
        kept = codec.delta_config().kept(out_features, in_features)
        return kept * (32 + (32 if n <= 2**31 - 1 else 64))
    if isinstance(codec, Quant):
        group = codec.delta_config().group(in_features)
        groups = out_features * in_features // group
        row_bytes = math.ceil(in_features * codec.bits / 8)
        return 8 * out_features * row_bytes + groups * 32 * (1 if codec.bits == 1 else 2)
    return 32 * codec.rank * (out_features + in_features)
