"""Delta codecs: turn trained deltas Δ_e = W_e - W_base into a light delta module.

Each codec names the delta module that stores it (``ders_megatron.deltas``) and
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

``parse_codecs("fc1:quant:4,fc2:svd:8")`` gives a codec per matrix (``fc1`` also
covers the gated ``fc1_gate``/``fc1_up``); a single spec applies to all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ders_megatron.deltas import (
    QUANT_BITS,
    IndexedSparseDeltaConfig,
    LowRankDeltaConfig,
    PerMatrixDeltaConfig,
    QuantDeltaConfig,
    SparseDeltaConfig,
    pack_bits,
)

MATRIX_NAMES = ("fc1", "fc1_gate", "fc1_up", "fc2")


class CodecError(ValueError):
    """An impossible codec for a matrix (rank, bit width, drop rate); names the spec."""


# --------------------------------------------------------------------------- #
# Codecs
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Dare:
    """DARE: random drop with rate P, survivors rescaled so E[Δ̂] = Δ."""

    drop_rate: float

    @property
    def spec(self) -> str:
        return f"dare:{self.drop_rate:g}"

    def delta_config(self):
        return SparseDeltaConfig(drop_rate=self.drop_rate)

    @torch.no_grad()
    def encode(self, delta_EOI, module, calib=None) -> None:
        out, inp = module.out_features, module.in_features
        scale = out * inp / module.kept  # exactly 1/(1-P) up to the rounding of K
        for e in range(module.num_experts):
            row, col, index = module.positions(e)
            values = torch.empty(module.kept, dtype=torch.float32)
            values[index] = delta_EOI[e][row, col] * scale
            module.values[e].copy_(values.to(module.values.dtype))


@dataclass(frozen=True)
class Magnitude:
    """Keep the largest (1-P)·O·I entries of |Δ| per expert, with explicit indices."""

    drop_rate: float

    @property
    def spec(self) -> str:
        return f"magnitude:{self.drop_rate:g}"

    def delta_config(self):
        return IndexedSparseDeltaConfig(drop_rate=self.drop_rate)

    @torch.no_grad()
    def encode(self, delta_EOI, module, calib=None) -> None:
        for e in range(module.num_experts):
            flat = delta_EOI[e].reshape(-1)
            index = torch.topk(flat.abs(), module.kept, sorted=False).indices.sort().values
            module.indices[e].copy_(index.to(module.indices.dtype))
            module.values[e].copy_(flat[index].to(module.values.dtype))


@dataclass(frozen=True)
class Quant:
    """K-bit group-wise quantization (K = 1: BitDelta sign × mean |Δ| per group)."""

    bits: int
    group_size: int = 128

    @property
    def spec(self) -> str:
        return f"quant:{self.bits}"

    def delta_config(self):
        return QuantDeltaConfig(bits=self.bits, group_size=self.group_size)

    @torch.no_grad()
    def encode(self, delta_EOI, module, calib=None) -> None:
        for e in range(module.num_experts):
            codes, scale, offset = quantize(delta_EOI[e].float(), self.bits, module.group)
            module.codes[e].copy_(pack_bits(codes, self.bits))
            module.scales[e].copy_(scale)
            if offset is not None:
                module.offsets[e].copy_(offset)


@dataclass(frozen=True)
class SVD:
    """Truncated SVD of rank R; ``whiten`` uses calibration input covariances (D2-MoE)."""

    rank: int
    whiten: bool = False
    damping: float = 1e-2  # relative to the mean diagonal of X^T X

    @property
    def spec(self) -> str:
        return f"{'wsvd' if self.whiten else 'svd'}:{self.rank}"

    def delta_config(self):
        return LowRankDeltaConfig(rank=self.rank)

    @torch.no_grad()
    def encode(self, delta_EOI, module, calib=None) -> None:
        if self.whiten and calib is None:
            raise CodecError(f"{self.spec} needs calibration inputs (--calib-data)")
        for e in range(module.num_experts):
            gram = calib[e] if self.whiten else None
            b_OR, a_RI = low_rank(delta_EOI[e].double(), self.rank, gram, self.damping)
            module.lora_B[e].copy_(b_OR.to(module.lora_B.dtype))
            module.lora_A[e].copy_(a_RI.to(module.lora_A.dtype))


Codec = Dare | Magnitude | Quant | SVD


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


# --------------------------------------------------------------------------- #
# Parsing and checks
# --------------------------------------------------------------------------- #
def parse_codec(text: str, group_size: int = 128) -> Codec:
    """``dare:P``, ``magnitude:P``, ``quant:K``, ``svd:R`` or ``wsvd:R``."""
    name, _, value = text.strip().partition(":")
    try:
        if name == "dare":
            codec = Dare(float(value))
        elif name == "magnitude":
            codec = Magnitude(float(value))
        elif name == "quant":
            codec = Quant(int(value), group_size)
        elif name in ("svd", "wsvd"):
            codec = SVD(int(value), whiten=name == "wsvd")
        else:
            raise CodecError(f"unknown codec {name!r} in {text!r}: use dare:P, magnitude:P, quant:K, svd:R or wsvd:R")
    except ValueError as err:
        if isinstance(err, CodecError):
            raise
        raise CodecError(f"cannot read the value of codec {text!r}: {err}") from err
    _check_values(codec, text)
    return codec


def _check_values(codec, text) -> None:
    if isinstance(codec, (Dare, Magnitude)) and not 0.0 <= codec.drop_rate < 1.0:
        raise CodecError(f"{text}: the drop rate must be in [0, 1)")
    if isinstance(codec, Quant) and codec.bits not in QUANT_BITS:
        raise CodecError(f"{text}: the bit width must be one of {QUANT_BITS}")
    if isinstance(codec, SVD) and codec.rank < 1:
        raise CodecError(f"{text}: the rank must be >= 1")


def parse_codecs(text: str, group_size: int = 128) -> dict[str, Codec]:
    """``"dare:0.9"`` -> {"*": Dare(0.9)}; ``"fc1:quant:4,fc2:svd:8"`` -> per matrix."""
    table = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        head = part.split(":", 1)[0]
        if head in MATRIX_NAMES:
            table[head] = parse_codec(part.split(":", 1)[1], group_size)
        else:
            if "*" in table:
                raise CodecError(f"--codec {text!r} gives two defaults")
            table["*"] = parse_codec(part, group_size)
    if not table:
        raise CodecError("--codec is empty")
    return table


def codec_for(table: dict, matrix: str) -> Codec:
    for name in (matrix, matrix.split("_")[0], "*"):
        if name in table:
            return table[name]
    raise CodecError(f"--codec gives nothing for the {matrix} matrix")


def codecs_spec(table: dict) -> str:
    """The canonical text of a codec table (stored in checkpoint args)."""
    parts = [codec.spec for name, codec in table.items() if name == "*"]
    parts += [f"{name}:{codec.spec}" for name, codec in sorted(table.items()) if name != "*"]
    return ",".join(parts)


def check_codec(codec: Codec, matrix: str, out_features: int, in_features: int) -> None:
    """Fail before any work for a codec the matrix cannot take."""
    try:
        config = codec.delta_config()
        if isinstance(codec, (Dare, Magnitude)):
            config.kept(out_features, in_features)
        if isinstance(codec, Quant):
            config.group(in_features, matrix)
    except ValueError as err:
        raise CodecError(f"{codec.spec} for the {matrix} matrix: {err}") from err
    if isinstance(codec, SVD) and codec.rank > min(out_features, in_features):
        raise CodecError(
            f"{codec.spec}: rank {codec.rank} exceeds min(out, in) = {min(out_features, in_features)} "
            f"of the {matrix} matrix [{out_features}, {in_features}]"
        )


def delta_config(table: dict, matrices) -> object:
    """One delta config for DeRSExperts: the codec's own, or per matrix when they differ."""
    configs = {m: codec_for(table, m).delta_config() for m in matrices}
    distinct = set(configs.values())
    if len(distinct) == 1:
        return distinct.pop()
    return PerMatrixDeltaConfig(configs=tuple(sorted(configs.items())))


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
