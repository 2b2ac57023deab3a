"""Parameter accounting for upcycled MoE layers, counted the way the DeRS paper counts.

"Added parameters" (paper Tables 1-4, S7-S17) are the values an upcycled MoE
model trains or stores beyond the dense model it came from. Pure Python on
purpose: sizing a run must not need torch, a GPU or megatron-core.

Per MoE layer, with one expert FFN = ``W`` (its weight matrices) + ``b`` (its
biases) and ``units`` = the experts, plus the shared expert when it joins the
DeRS group (``shared_expert="ders"``, the paper's "extended DeRS"):

* vanilla upcycling: ``units`` full copies of ``W + b``, minus the dense FFN;
* DeRS (dense / lowrank / sparse delta): one shared base ``W`` (it *is* the
  dense weight, so it adds nothing) + ``units`` deltas of ``W``;
* a ``shared_expert="full"`` universal FFN (Med-MoE, Coder-MoE) is one more
  full copy, reported apart (the paper's light-gray "0.42B + ..." part);
* the router: ``hidden x num_experts``, no bias (twice that with a noisy gate); megatron's
  router adds an ``[num_experts]`` bias with ``--add-bias-linear`` (``router_bias``).

Choices, each forced by the paper's own numbers (see tests/test_accounting.py):

* Gated (SwiGLU) FFNs have three matrices per expert: gate and up
  ``[ffn, hidden]`` and down ``[hidden, ffn]``; a rank-r delta costs
  ``r*(in+out)`` on *each*. Factorizing gate+up as one ``[2*ffn, hidden]``
  matrix would give 1.11M for MoE-LLaVA-StableLM rank 1; Table 1 prints 1.20M.
* Biases are not delta-encoded: every unit keeps its own full bias, copied
  from the dense model, so they add ``(units - 1) * b``. Only this reproduces
  MoE-LLaVA-Phi (Phi-2 has biases): DeRS-SM 1.11M and DeRS-LM 2.42M.
* Sparse deltas keep ``round((1-p) * rows * cols)`` values per matrix. Their
  positions are not parameters: we report their bytes apart, both as one
  8-byte seed per matrix (what we store) and as an explicit int32 index vector
  (what the paper's torch.scatter formulation stores; int64 past 2**31 - 1).
* Coder-MoE (XFT, built on LLaMA-MoE) routes with a noisy top-k gate, whose
  ``weight_noise`` projection is a second ``hidden x num_experts`` matrix
  (``noisy_gate=True``); every Coder-MoE row in Tables 3, 4, S8 needs it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ders_megatron.core.config import DELTA_KINDS as DERS_DELTA_KINDS
from ders_megatron.core.config import (
    DEFAULTS,
    SHARED_EXPERTS,
    LowRankDeltaConfig,
    QuantDeltaConfig,
    SparseDeltaConfig,
)

SHARED_EXPERT_KINDS = SHARED_EXPERTS
DELTA_KINDS = ("vanilla", *DERS_DELTA_KINDS)  # --moe-ders values the accounting counts (not codec)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
SEED_BYTES = 8  # one int64 RNG seed regenerates a matrix's sparse positions
INT32_MAX = 2**31 - 1

# The side-by-side set `param_report --compare` prints (paper's typical settings).
COMPARE_RANKS = (1, 4, 16)
COMPARE_DROP_RATES = (0.9, 0.99, 0.9999)
COMPARE_QUANT_BITS = (8, 4, 2, 1)  # DeRS-Quantization, paper Tables S12, S14, S16, S18
QUANT_SCALE_BITS = 32  # tools/compress.py stores each group's scale (and offset, k >= 2) in fp32


def _require_int(value, flag: str, minimum: int) -> None:
    """Reject non-integers (bools included) and values below ``minimum``, naming the flag."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{flag} must be an integer >= {minimum}, got {value!r}")


def _layer_pattern(freq, num_layers: int) -> tuple[int, ...]:
    """Megatron's --moe-layer-freq: int N = layers 0, N, 2N... are MoE; or one 0/1 per layer."""
    if isinstance(freq, int) and not isinstance(freq, bool):
        _require_int(freq, "--moe-layer-freq", 1)
        return tuple(1 if i % freq == 0 else 0 for i in range(num_layers))
    pattern = tuple(freq)
    if len(pattern) != num_layers:
        raise ValueError(
            f"--moe-layer-freq lists {len(pattern)} layers but --num-layers is {num_layers}"
        )
    if any(isinstance(v, bool) or v not in (0, 1) for v in pattern):
        raise ValueError(f"--moe-layer-freq entries must be 0 or 1, got {list(pattern)}")
    if not any(pattern):
        raise ValueError("--moe-layer-freq selects no MoE layer")
    return pattern


def ffn_matrices(hidden: int, ffn: int, gated: bool) -> tuple[tuple[int, int], ...]:
    """The [rows, cols] weight matrices of one FFN; gate and up stay separate (see module doc)."""
    up = ((ffn, hidden), (ffn, hidden)) if gated else ((ffn, hidden),)
    return up + ((hidden, ffn),)


def ffn_bias_params(hidden: int, ffn: int, gated: bool) -> int:
    """fc1 bias (2*ffn when gated, as Megatron's fused fc1) plus fc2 bias."""
    return (2 * ffn if gated else ffn) + hidden


@dataclass(frozen=True, kw_only=True)
class MoEShape:
    """The dims of an upcycled MoE model that decide its parameter count (Megatron flag names)."""

    hidden_size: int  # --hidden-size
    ffn_hidden_size: int  # --ffn-hidden-size: the dense FFN the experts are upcycled from
    num_layers: int  # --num-layers
    num_experts: int  # --num-experts
    moe_layer_freq: int | tuple[int, ...] = 1  # --moe-layer-freq
    topk: int = 2  # --moe-router-topk
    gated: bool = False  # --swiglu: fc1 is gate and up
    bias: bool = False  # --add-bias-linear
    shared_expert: str = "none"  # none | full (universal FFN) | ders (base + its own delta)
    moe_ffn_hidden_size: int | None = None  # --moe-ffn-hidden-size, default ffn_hidden_size
    noisy_gate: bool = False  # router has a second hidden x num_experts noise projection
    # megatron's router has an [E] bias with --add-bias-linear (transformer/moe/router.py:64);
    # the paper's routers (DeepSpeed-MoE's gate) have none, so its counts leave it out
    router_bias: bool = False

    def __post_init__(self):
        _require_int(self.hidden_size, "--hidden-size", 1)
        _require_int(self.ffn_hidden_size, "--ffn-hidden-size", 1)
        _require_int(self.num_layers, "--num-layers", 1)
        if self.moe_ffn_hidden_size is None:
            object.__setattr__(self, "moe_ffn_hidden_size", self.ffn_hidden_size)
        _require_int(self.moe_ffn_hidden_size, "--moe-ffn-hidden-size", 1)
        self._check_experts()
        freq = self.moe_layer_freq
        _layer_pattern(freq, self.num_layers)  # validates
        if not isinstance(freq, int):
            object.__setattr__(self, "moe_layer_freq", tuple(freq))  # frozen => hashable

    def _check_experts(self) -> None:
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or (
            self.num_experts < 2
        ):
            raise ValueError(f"--num-experts must be >= 2, got {self.num_experts!r}")
        topk = self.topk
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= self.num_experts:
            raise ValueError(
                f"--moe-router-topk must be in [1, num_experts={self.num_experts}], got {topk!r}"
            )
        if self.shared_expert not in SHARED_EXPERT_KINDS:
            raise ValueError(
                f"--moe-ders-shared-expert must be one of {', '.join(SHARED_EXPERT_KINDS)}; "
                f"got {self.shared_expert!r}"
            )

    @property
    def moe_layer_pattern(self) -> tuple[int, ...]:
        return _layer_pattern(self.moe_layer_freq, self.num_layers)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layer_pattern)

    @property
    def expert_matrices(self) -> tuple[tuple[int, int], ...]:
        return ffn_matrices(self.hidden_size, self.moe_ffn_hidden_size, self.gated)

    @property
    def expert_bias_params(self) -> int:
        if not self.bias:
            return 0
        return ffn_bias_params(self.hidden_size, self.moe_ffn_hidden_size, self.gated)

    @property
    def dense_weight_params(self) -> int:
        """Weight matrices of the dense FFN one MoE layer replaces."""
        mats = ffn_matrices(self.hidden_size, self.ffn_hidden_size, self.gated)
        return sum(r * c for r, c in mats)

    @property
    def dense_bias_params(self) -> int:
        if not self.bias:
            return 0
        return ffn_bias_params(self.hidden_size, self.ffn_hidden_size, self.gated)

    @property
    def dense_ffn_params(self) -> int:
        return self.dense_weight_params + self.dense_bias_params

    @property
    def router_params(self) -> int:
        """The router: one [num_experts, hidden] matrix (x2 for a noisy gate), plus megatron's
        [num_experts] bias when ``router_bias``."""
        return (2 if self.noisy_gate else 1) * self.hidden_size * self.num_experts + (
            self.num_experts if self.router_bias else 0)

    @property
    def units(self) -> int:
        """FFNs sharing one base under DeRS: the experts, plus the shared one if it joins."""
        return self.num_experts + (1 if self.shared_expert == "ders" else 0)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if isinstance(self.moe_layer_freq, tuple):
            out["moe_layer_freq"] = list(self.moe_layer_freq)
        return out


def sparse_nnz(numel: int, drop_rate: float) -> int:
    """Values a sparse delta keeps in a matrix of ``numel`` elements: round((1-p) * numel).

    Nearest, not floor: (1 - 0.9) * 10 is 0.9999999999999998 in floats.
    """
    return round((1.0 - drop_rate) * numel)


def _index_bytes(numel: int, nnz: int) -> int:
    """An explicit index vector: int32 while every position fits, int64 beyond."""
    return nnz * (4 if numel - 1 <= INT32_MAX else 8)


@dataclass(frozen=True, kw_only=True)
class DeltaSpec:
    """How each expert's weights are stored: vanilla full copies, or base + a light delta."""

    kind: str = "vanilla"  # --moe-ders: vanilla | dense | lowrank | sparse
    rank: int | None = None  # --moe-ders-rank (lowrank)
    drop_rate: float | None = None  # --moe-ders-drop-rate p (sparse; density 1 - p)

    def __post_init__(self):
        if self.kind not in DELTA_KINDS:
            kinds = ", ".join(DELTA_KINDS)
            raise ValueError(f"--moe-ders must be one of {kinds}; got {self.kind!r}")
        self._check_rank()
        self._check_drop_rate()

    def _check_rank(self) -> None:
        if self.kind != "lowrank":
            if self.rank is not None:
                raise ValueError(
                    f"--moe-ders-rank applies only to --moe-ders lowrank, not {self.kind}"
                )
            return
        LowRankDeltaConfig(rank=self.rank)  # the config's range check (names the flag)

    def _check_drop_rate(self) -> None:
        if self.kind != "sparse":
            if self.drop_rate is not None:
                raise ValueError(
                    f"--moe-ders-drop-rate applies only to --moe-ders sparse, not {self.kind}"
                )
            return
        SparseDeltaConfig(drop_rate=self.drop_rate)  # the config's range check (names the flag)

    @property
    def is_ders(self) -> bool:
        """True when the experts share a base (every kind but vanilla)."""
        return self.kind != "vanilla"

    @property
    def label(self) -> str:
        if self.kind == "lowrank":
            return f"lowrank r={self.rank}"
        if self.kind == "sparse":
            return f"sparse p={self.drop_rate:g}"
        return self.kind

    def matrix_params(self, rows: int, cols: int) -> int:
        """Stored values for one expert's version of one [rows, cols] matrix."""
        if self.kind == "lowrank":
            return self.rank * (rows + cols)
        if self.kind == "sparse":
            return sparse_nnz(rows * cols, self.drop_rate)
        return rows * cols  # vanilla copy or dense delta

    def check_fits(self, shape: MoEShape) -> None:
        """Reject deltas the shape cannot hold (raised before any counting)."""
        if self.is_ders and shape.moe_ffn_hidden_size != shape.ffn_hidden_size:
            raise ValueError(
                "--moe-ders needs --moe-ffn-hidden-size == --ffn-hidden-size: the shared base is "
                f"the dense FFN (got {shape.moe_ffn_hidden_size} vs {shape.ffn_hidden_size})"
            )
        for rows, cols in shape.expert_matrices:
            self._check_matrix(rows, cols)

    def _check_matrix(self, rows: int, cols: int) -> None:
        if self.kind == "lowrank" and self.rank > min(rows, cols):
            raise ValueError(
                f"--moe-ders-rank {self.rank} exceeds min(in, out) = {min(rows, cols)} "
                f"of a [{rows}, {cols}] expert matrix"
            )
        if self.kind == "sparse" and sparse_nnz(rows * cols, self.drop_rate) < 1:
            raise ValueError(
                f"--moe-ders-drop-rate {self.drop_rate} keeps no element of a [{rows}, {cols}] "
                "expert matrix; lower it"
            )


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """DeRS-Quantization: every unit's delta (W_e - W_dense of a trained vanilla MoE) stored
    in ``bits`` bits per value (paper Tables S12, S14, S16, S18).

    Counted, as the paper counts, in parameters of the model's dtype (``dtype_bytes``; the
    paper's 16-bit): a k-bit delta of a [rows, cols] matrix is ``rows * cols * k / 16``
    parameters, so N experts add ``N * W * k / 16`` (Med-MoE-StableLM, 4 bits: 0.42B). That
    leaves out what a quantizer must also store; with ``scale_overhead`` the count is what
    ``tools/compress.py`` writes (``core/codecs.py`` ``storage_bits``): each row's codes
    padded to whole bytes, and per group of ``group_size`` values of a row an fp32 scale
    plus, for k >= 2, an fp32 offset (0.5 bit per value at k >= 2 with groups of 128).
    """

    bits: int
    group_size: int = DEFAULTS["quant_group_size"]  # --moe-ders-quant-group-size
    scale_overhead: bool = False
    dtype_bytes: int = 2

    kind = "quant"
    is_ders = True

    def __post_init__(self):
        QuantDeltaConfig(bits=self.bits, group_size=self.group_size)  # the config's checks (name the flag)
        _require_int(self.dtype_bytes, "dtype_bytes", 1)

    @property
    def label(self) -> str:
        return f"quant {self.bits}-bit" + (f" +scales/{self.group_size}" if self.scale_overhead else "")

    def matrix_bits(self, rows: int, cols: int) -> int:
        """Stored bits of one expert's delta of one [rows, cols] matrix."""
        if not self.scale_overhead:
            return rows * cols * self.bits
        group = QuantDeltaConfig(bits=self.bits, group_size=self.group_size).group(cols)
        per_group = QUANT_SCALE_BITS * (1 if self.bits == 1 else 2)  # scale (+ offset)
        return 8 * rows * -(-cols * self.bits // 8) + rows * (cols // group) * per_group

    def matrix_params(self, rows: int, cols: int) -> float:
        """The same in parameters of ``dtype_bytes`` (fractional)."""
        return self.matrix_bits(rows, cols) / (8 * self.dtype_bytes)

    def check_fits(self, shape: MoEShape) -> None:
        DeltaSpec(kind="dense").check_fits(shape)
        if self.scale_overhead:
            for _rows, cols in shape.expert_matrices:
                QuantDeltaConfig(bits=self.bits, group_size=self.group_size).group(cols)


@dataclass(frozen=True, kw_only=True)
class LayerBreakdown:
    """Added parameters of one MoE layer, by where they live."""

    router: int
    expert_weights: int  # vanilla copies or DeRS deltas, beyond the dense FFN weight
    expert_biases: int  # (units - 1) full bias copies
    universal_ffn: int  # shared_expert="full": one more full FFN

    @property
    def total(self) -> int:
        return self.router + self.expert_weights + self.expert_biases + self.universal_ffn


@dataclass(frozen=True, kw_only=True)
class AccountingReport:
    """Added parameters of an upcycled model over its dense model, paper-style, plus bytes."""

    label: str
    shape: MoEShape
    delta: DeltaSpec
    num_moe_layers: int
    dense_ffn_params_per_layer: int
    dense_ffn_params: int  # the dense FFNs the MoE layers replace, all layers
    per_layer: LayerBreakdown
    added_params_per_layer: int
    added_params: int  # everything below, universal FFN included
    universal_ffn_params: int  # the paper's light-gray part, inside added_params
    routed_added_params: int  # added_params - universal_ffn_params (paper's right-hand number)
    active_params_per_token: int  # stored MoE-layer values one token reads, all MoE layers
    dtype_bytes: int
    added_bytes: int  # DeRS-Quantization (QuantSpec): fractional parameters, whole bytes
    sparse_seed_bytes: int  # positions as one 8-byte seed per matrix (0 unless sparse)
    sparse_index_bytes: int  # positions as explicit int32 index vectors (0 unless sparse)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["shape"] = self.shape.to_dict()
        out["per_layer"]["total"] = self.per_layer.total
        return out


def _unit_weight_params(shape: MoEShape, delta: DeltaSpec) -> int:
    """Stored weight values of one unit: a full copy (vanilla) or its delta."""
    return sum(delta.matrix_params(r, c) for r, c in shape.expert_matrices)


def _base_weight_params(shape: MoEShape, delta: DeltaSpec) -> int:
    """The shared base (DeRS only); equal in size to the dense FFN weight."""
    return sum(r * c for r, c in shape.expert_matrices) if delta.is_ders else 0


def _layer_breakdown(shape: MoEShape, delta: DeltaSpec) -> LayerBreakdown:
    """Stored values of one MoE layer minus the dense FFN it replaces."""
    stored = _base_weight_params(shape, delta) + shape.units * _unit_weight_params(shape, delta)
    full_ffn = sum(r * c for r, c in shape.expert_matrices) + shape.expert_bias_params
    return LayerBreakdown(
        router=shape.router_params,
        expert_weights=stored - shape.dense_weight_params,
        expert_biases=shape.units * shape.expert_bias_params - shape.dense_bias_params,
        universal_ffn=full_ffn if shape.shared_expert == "full" else 0,
    )


def _active_params_per_layer(shape: MoEShape, delta: DeltaSpec, universal: int) -> int:
    """Stored values one token reads: router, base, its top-k units (+ the always-on shared one).

    Under DeRS this counts the base once plus k deltas; the compute per token is
    still k synthesized FFNs (the fused path brings it back to about one).
    """
    per_unit = _unit_weight_params(shape, delta) + shape.expert_bias_params
    always_on = 1 if shape.shared_expert == "ders" else 0
    return (
        shape.router_params
        + _base_weight_params(shape, delta)
        + (shape.topk + always_on) * per_unit
        + universal
    )


def _sparse_position_bytes(shape: MoEShape, delta: DeltaSpec) -> tuple[int, int]:
    """(seed bytes, int32 index bytes) for one MoE layer's sparse positions."""
    if delta.kind != "sparse":
        return 0, 0
    mats = shape.expert_matrices
    index = sum(_index_bytes(r * c, sparse_nnz(r * c, delta.drop_rate)) for r, c in mats)
    return shape.units * len(mats) * SEED_BYTES, shape.units * index


def added_parameters(
    shape: MoEShape, delta: DeltaSpec | QuantSpec, *, dtype_bytes: int = 2
) -> AccountingReport:
    """Count what ``delta`` adds to the dense model of ``shape``, as the DeRS paper does.

    With a :class:`QuantSpec` the counts are in parameters of its ``dtype_bytes`` (floats)."""
    _require_int(dtype_bytes, "dtype_bytes", 1)
    delta.check_fits(shape)
    layers = shape.num_moe_layers
    per_layer = _layer_breakdown(shape, delta)
    seed, index = _sparse_position_bytes(shape, delta)
    added = per_layer.total * layers
    universal = per_layer.universal_ffn * layers
    active = _active_params_per_layer(shape, delta, per_layer.universal_ffn) * layers
    return AccountingReport(
        label=delta.label,
        shape=shape,
        delta=delta,
        num_moe_layers=layers,
        dense_ffn_params_per_layer=shape.dense_ffn_params,
        dense_ffn_params=shape.dense_ffn_params * layers,
        per_layer=per_layer,
        added_params_per_layer=per_layer.total,
        added_params=added,
        universal_ffn_params=universal,
        routed_added_params=added - universal,
        active_params_per_token=active,
        dtype_bytes=dtype_bytes,
        added_bytes=math.ceil(added * dtype_bytes),
        sparse_seed_bytes=seed * layers,
        sparse_index_bytes=index * layers,
    )


def comparison_variants(
    ranks=COMPARE_RANKS, drop_rates=COMPARE_DROP_RATES
) -> tuple[DeltaSpec, ...]:
    """Vanilla, then low-rank and sparse deltas at the paper's typical settings."""
    lowrank = tuple(DeltaSpec(kind="lowrank", rank=r) for r in ranks)
    sparse = tuple(DeltaSpec(kind="sparse", drop_rate=p) for p in drop_rates)
    return (DeltaSpec(kind="vanilla"),) + lowrank + sparse


def quant_variants(bits=COMPARE_QUANT_BITS, *, group_size: int = DEFAULTS["quant_group_size"],
                   dtype_bytes: int = 2) -> tuple[QuantSpec, ...]:
    """DeRS-Quantization at each bit width, as the paper counts it and with the scales stored."""
    return tuple(QuantSpec(bits=k, group_size=group_size, scale_overhead=overhead, dtype_bytes=dtype_bytes)
                 for k in bits for overhead in (False, True))


# The paper's upcycled models (dims from each dense model's Hugging Face config).
PAPER_MODELS: dict[str, MoEShape] = {
    # MoE-LLaVA: every other layer's FFN -> 4 experts, top-2 (paper Sec. 4.1).
    "moe-llava-stablelm": MoEShape(  # StableLM-2-1.6B
        hidden_size=2048, ffn_hidden_size=5632, num_layers=24, moe_layer_freq=2,
        num_experts=4, topk=2, gated=True,
    ),
    "moe-llava-qwen": MoEShape(  # Qwen-1.8B: config intermediate_size 11008 = 2 x 5504 (gate, up)
        hidden_size=2048, ffn_hidden_size=5504, num_layers=24, moe_layer_freq=2,
        num_experts=4, topk=2, gated=True,
    ),
    "moe-llava-phi": MoEShape(  # Phi-2-2.7B: GELU MLP with biases
        hidden_size=2560, ffn_hidden_size=10240, num_layers=32, moe_layer_freq=2,
        num_experts=4, topk=2, bias=True,
    ),
    # Med-MoE: every other layer -> universal FFN + 4 experts, top-1 (Sec. 4.2).
    "med-moe-stablelm": MoEShape(
        hidden_size=2048, ffn_hidden_size=5632, num_layers=24, moe_layer_freq=2,
        num_experts=4, topk=1, gated=True, shared_expert="full",
    ),
    "med-moe-phi": MoEShape(
        hidden_size=2560, ffn_hidden_size=10240, num_layers=32, moe_layer_freq=2,
        num_experts=4, topk=1, bias=True, shared_expert="full",
    ),
    # Coder-MoE (XFT): every layer -> universal FFN + 4 experts, top-1, noisy gate (Sec. 4.3).
    "coder-moe": MoEShape(  # DeepSeek-Coder-1.3B
        hidden_size=2048, ffn_hidden_size=5504, num_layers=24, moe_layer_freq=1,
        num_experts=4, topk=1, gated=True, shared_expert="full", noisy_gate=True,
    ),
}
