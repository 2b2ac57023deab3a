"""The one DeRS configuration: vocabulary, defaults, validation and the args mapping.

Everything a tool, the training script or a converter knows about "which DeRS
model is this" comes from here, the way megatron-core derives its
``TransformerConfig`` from args in one function (``core_transformer_config_from_args``)
and PEFT registers each method once:

* the vocabulary: :data:`KINDS` (``--moe-ders``), :data:`SHARED_EXPERTS`
  (``--moe-ders-shared-expert``), :data:`IMPLS` (``--moe-ders-impl``), the codec
  names of ``--moe-ders-codecs``; and every default (:data:`DEFAULTS`);
* the configs: one frozen dataclass per delta kind and per codec, validated in
  ``__post_init__`` with errors that name the flag, and :class:`DeRSConfig`;
* the one mapping between them and Megatron args, both ways
  (:func:`ders_config_from_args`, :func:`ders_args`), and the comparison of a
  checkpoint's stored settings with a run's flags (:func:`mismatched_ders_flags`);
* every validation rule on the Megatron flags DeRS depends on
  (:func:`validate_ders_args`).

Nothing here knows about ranks or megatron-core's modules: it reads args by
attribute name (``argparse.Namespace`` or anything alike), and imports neither
torch nor megatron (``tools/param_report.py`` answers without them).
:func:`ders_megatron.core.deltas.build_deltas` turns a delta-kind config into its module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


# --------------------------------------------------------------------------- #
# Vocabulary and defaults
# --------------------------------------------------------------------------- #
# --moe-ders. vanilla: megatron-core's own experts (N full copies, SequentialMLP);
# codec: compressed deltas as tools/compress.py writes them (--moe-ders-codecs).
KINDS = ("vanilla", "lowrank", "sparse", "dense", "codec")
DELTA_KINDS = ("lowrank", "sparse", "dense")  # the trainable kinds a run can start from
LEGACY_KIND_NAMES = {"none": "vanilla"}  # spelling in checkpoints written before the one vocabulary
# --moe-ders-shared-expert: none, megatron's shared expert (a full FFN), or the
# extended DeRS shared expert (the experts' base plus a delta of its own).
SHARED_EXPERTS = ("none", "full", "ders")
IMPLS = ("dropin", "fused")  # --moe-ders-impl
CODECS = ("dare", "magnitude", "quant", "svd", "wsvd")  # --moe-ders-codecs
QUANT_BITS = (1, 2, 3, 4, 8)
MATRIX_NAMES = ("fc1", "fc1_gate", "fc1_up", "fc2")  # what a codec spec may name; fc1 covers gate/up
TRUST_FLAG = "--trust-checkpoint"  # the opt-out of the checkpoint allow-lists (io/safe_load.py), every tool
# --ders-qk-layernorm-width: what megatron's --qk-layernorm normalizes. head: each head's
# head_dim values (megatron-core's own, Qwen3); full: the whole projected q and the whole
# projected k at once, num_heads*head_dim values (OLMoE's q_norm / k_norm).
QK_LAYERNORM_WIDTHS = ("head", "full")
QK_LAYERNORM_WIDTH_FLAG = "--ders-qk-layernorm-width"

DEFAULTS = dict(
    kind="vanilla",  # --moe-ders
    rank=4,  # --moe-ders-rank
    alpha=None,  # --moe-ders-alpha: no scaling
    drop_rate=0.99,  # --moe-ders-drop-rate
    seed=1234,  # --moe-ders-seed (training: Megatron's --seed, whose default this is)
    impl="dropin",  # --moe-ders-impl
    quant_group_size=128,  # --moe-ders-quant-group-size
    shared_expert="none",  # --moe-ders-shared-expert (training: what --moe-shared-expert-intermediate-size says)
    # tools/compress.py --max-delta-norm: largest ||W_e - W_base|| / ||W_e|| of any expert matrix it
    # accepts. Fine-tuned upcycled experts stay near their start (the paper, Fig. 1: cosine > 0.999 to
    # the dense FFN, i.e. a ratio of ~0.05); 0.4 (cosine ~0.92) leaves 8x room for longer training,
    # and still refuses a base off by the split shared-expert scale (ratio 0.5 with the gate, 1.0 without).
    max_delta_norm=0.4,
    qk_layernorm_width="head",  # --ders-qk-layernorm-width (megatron-core's per-head norm)
)

CPU_MODE_HINT = (
    "CUDA is not available on this machine. megatron-core needs CUDA unless the "
    "ders-megatron CPU runtime is on: pass --cpu to our scripts, or call "
    "ders_megatron.layers.runtime.enable_cpu_runtime() before building models."
)


class DeRSArgumentError(ValueError):
    """An invalid flag or flag combination; the message names the flags."""


class CodecError(DeRSArgumentError):
    """An impossible codec for a matrix (rank, bit width, drop rate); names the spec."""


def canonical_kind(kind: str | None) -> str:
    """``--moe-ders`` as stored in any checkpoint's args, in today's vocabulary."""
    kind = kind or DEFAULTS["kind"]
    return LEGACY_KIND_NAMES.get(kind, kind)


# --------------------------------------------------------------------------- #
# Delta kinds
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, kw_only=True)
class LowRankDeltaConfig:
    """DeRS-LM. ``rank``: --moe-ders-rank; ``alpha``: --moe-ders-alpha (scale α/r)."""

    rank: int = DEFAULTS["rank"]
    alpha: float | None = DEFAULTS["alpha"]

    kind = "lowrank"

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"--moe-ders-rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"--moe-ders-alpha must be > 0, got {self.alpha!r}")

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank



@dataclass(frozen=True, kw_only=True)
class SparseDeltaConfig:
    """DeRS-SM. ``drop_rate`` p: --moe-ders-drop-rate (density 1 - p). Positions come from
    --moe-ders-seed (``DeRSConfig.seed``) plus layer, expert and matrix."""

    drop_rate: float = DEFAULTS["drop_rate"]

    kind = "sparse"

    def __post_init__(self):
        p = self.drop_rate
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"--moe-ders-drop-rate must be in [0, 1) (density = 1 - p), got {p!r}")

    def kept(self, out_features: int, in_features: int) -> int:
        """Values kept per matrix: round(density · O · I), which must be >= 1."""
        count = round((1.0 - self.drop_rate) * out_features * in_features)
        if count < 1:
            raise ValueError(
                f"--moe-ders-drop-rate {self.drop_rate} keeps no element of a "
                f"{out_features}x{in_features} matrix; lower it below "
                f"{1 - 0.5 / (out_features * in_features):.8f}"
            )
        return count



@dataclass(frozen=True, kw_only=True)
class DenseDeltaConfig:
    """A full Δ per expert: vanilla upcycling as base + delta (the reference)."""

    kind = "dense"



@dataclass(frozen=True, kw_only=True)
class QuantDeltaConfig:
    """k-bit group-wise quantized deltas (``quant:K``), packed into bytes.

    Groups are ``group_size`` consecutive elements of a row (capped at the row
    length, which it must divide). k = 1 is BitDelta: sign times a per-group
    scale (the mean |Δ|). k >= 2: ``lo + q * step`` with q in [0, 2**k - 1]
    (asymmetric min/max), error <= step / 2.
    """

    bits: int = 4
    group_size: int = DEFAULTS["quant_group_size"]

    kind = "quant"

    def __post_init__(self):
        if self.bits not in QUANT_BITS:
            raise ValueError(f"quant:K needs K in {QUANT_BITS}, got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"--moe-ders-quant-group-size must be an integer >= 1, got {self.group_size!r}")

    def group(self, in_features: int, matrix: str = "") -> int:
        group = min(self.group_size, in_features)
        if in_features % group:
            raise ValueError(
                f"--moe-ders-quant-group-size {self.group_size} must divide the {matrix} matrix's "
                f"{in_features} input features"
            )
        return group



@dataclass(frozen=True, kw_only=True)
class IndexedSparseDeltaConfig:
    """Sparse deltas at explicit positions (``magnitude:P``: the largest 1-P of |Δ|),
    stored as int32 flat indices (int64 past 2**31 - 1 elements) beside the values."""

    drop_rate: float = 0.9

    kind = "magnitude"

    def __post_init__(self):
        SparseDeltaConfig(drop_rate=self.drop_rate)  # same range check

    def kept(self, out_features: int, in_features: int) -> int:
        return SparseDeltaConfig(drop_rate=self.drop_rate).kept(out_features, in_features)



@dataclass(frozen=True, kw_only=True)
class PerMatrixDeltaConfig:
    """A delta config per matrix (``fc1:quant:4,fc2:svd:8``): ``fc1`` also names
    ``fc1_gate`` and ``fc1_up``; ``default`` covers the rest."""

    configs: tuple = ()  # ((matrix, config), ...)
    default: object = None

    kind = "mixed"

    def for_matrix(self, matrix: str):
        table = dict(self.configs)
        for name in (matrix, matrix.split("_")[0]):
            if name in table:
                return table[name]
        if self.default is None:
            raise ValueError(f"no delta codec given for the {matrix} matrix")
        return self.default



DeltaConfig = Union[LowRankDeltaConfig, SparseDeltaConfig, DenseDeltaConfig, QuantDeltaConfig,
                    IndexedSparseDeltaConfig, PerMatrixDeltaConfig]


def delta_config(kind: str, rank: int = DEFAULTS["rank"], alpha: float | None = DEFAULTS["alpha"],
                 drop_rate: float = DEFAULTS["drop_rate"]):
    """The config for ``--moe-ders KIND`` (a trainable kind) from the flag values."""
    if kind == "lowrank":
        return LowRankDeltaConfig(rank=rank, alpha=alpha)
    if kind == "sparse":
        return SparseDeltaConfig(drop_rate=drop_rate)
    if kind == "dense":
        return DenseDeltaConfig()
    raise ValueError(f"--moe-ders must be one of {DELTA_KINDS}, got {kind!r}")


def delta_matrices(hidden_size: int, ffn_hidden_size: int, gated: bool) -> dict[str, tuple[int, int]]:
    """[out, in] of each expert matrix that carries a delta (gate and up apart, as the
    paper's Table 1 counts them)."""
    if gated:
        return {"fc1_gate": (ffn_hidden_size, hidden_size), "fc1_up": (ffn_hidden_size, hidden_size),
                "fc2": (hidden_size, ffn_hidden_size)}
    return {"fc1": (ffn_hidden_size, hidden_size), "fc2": (hidden_size, ffn_hidden_size)}


# --------------------------------------------------------------------------- #
# Codecs (--moe-ders-codecs): what compression stores per matrix
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


@dataclass(frozen=True)
class Magnitude:
    """Keep the largest (1-P)·O·I entries of |Δ| per expert, with explicit indices."""

    drop_rate: float

    @property
    def spec(self) -> str:
        return f"magnitude:{self.drop_rate:g}"

    def delta_config(self):
        return IndexedSparseDeltaConfig(drop_rate=self.drop_rate)


@dataclass(frozen=True)
class Quant:
    """K-bit group-wise quantization (K = 1: BitDelta sign × mean |Δ| per group)."""

    bits: int
    group_size: int = DEFAULTS["quant_group_size"]

    @property
    def spec(self) -> str:
        return f"quant:{self.bits}"

    def delta_config(self):
        return QuantDeltaConfig(bits=self.bits, group_size=self.group_size)


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


Codec = Dare | Magnitude | Quant | SVD


def parse_codec(text: str, group_size: int = DEFAULTS["quant_group_size"]) -> Codec:
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
    _check_codec_values(codec, text)
    return codec


def _check_codec_values(codec, text) -> None:
    if isinstance(codec, (Dare, Magnitude)) and not 0.0 <= codec.drop_rate < 1.0:
        raise CodecError(f"{text}: the drop rate must be in [0, 1)")
    if isinstance(codec, Quant) and codec.bits not in QUANT_BITS:
        raise CodecError(f"{text}: the bit width must be one of {QUANT_BITS}")
    if isinstance(codec, SVD) and codec.rank < 1:
        raise CodecError(f"{text}: the rank must be >= 1")


def parse_codecs(text: str, group_size: int = DEFAULTS["quant_group_size"]) -> dict[str, Codec]:
    """``--moe-ders-codecs``: ``"dare:0.9"`` -> {"*": Dare(0.9)}; ``"fc1:quant:4,fc2:svd:8"``
    -> per matrix (``fc1`` also covers the gated ``fc1_gate``/``fc1_up``)."""
    table = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        head = part.split(":", 1)[0]
        if head in MATRIX_NAMES:
            table[head] = parse_codec(part.split(":", 1)[1], group_size)
        else:
            if "*" in table:
                raise CodecError(f"--moe-ders-codecs {text!r} gives two defaults")
            table["*"] = parse_codec(part, group_size)
    if not table:
        raise CodecError("--moe-ders-codecs is empty")
    return table


def codec_for(table: dict, matrix: str) -> Codec:
    for name in (matrix, matrix.split("_")[0], "*"):
        if name in table:
            return table[name]
    raise CodecError(f"--moe-ders-codecs gives nothing for the {matrix} matrix")


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


def codecs_delta_config(table: dict, matrices) -> object:
    """One delta config for the experts: the codec's own, or per matrix when they differ."""
    configs = {m: codec_for(table, m).delta_config() for m in matrices}
    distinct = set(configs.values())
    if len(distinct) == 1:
        return distinct.pop()
    return PerMatrixDeltaConfig(configs=tuple(sorted(configs.items())))


# --------------------------------------------------------------------------- #
# The DeRS configuration
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, kw_only=True)
class DeRSConfig:
    """What ``--moe-ders*`` asks for. ``delta`` is one of the delta-kind configs.

    ``kernel_tile``: rows per tile of the low-rank SwiGLU kernel (None: chosen
    from the FFN width, :func:`ders_megatron.layers.expert_compute.cpu_token_tile`);
    a tuning knob of the benchmark, not stored in checkpoints.
    """

    delta: DeltaConfig = field(default_factory=LowRankDeltaConfig)
    seed: int = DEFAULTS["seed"]
    freeze_base: bool = False
    extended_shared_expert: bool = False
    impl: str = DEFAULTS["impl"]
    kernel_tile: int | None = None
    # With --add-bias-linear: every expert owns its fc1/fc2 bias (as the paper counts them,
    # core/accounting.py) instead of sharing the base's one. False reads checkpoints written
    # before (their args lack moe_ders_expert_bias); the tools and training turn it on.
    expert_bias: bool = False

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"--moe-ders-impl must be one of {IMPLS}, got {self.impl!r}")
        if self.kernel_tile is not None and (not isinstance(self.kernel_tile, int) or self.kernel_tile < 1):
            raise ValueError(f"kernel_tile must be an integer >= 1, got {self.kernel_tile!r}")

    @property
    def kind(self) -> str:
        return self.delta.kind


# --------------------------------------------------------------------------- #
# Megatron args <-> DeRSConfig (the one mapping)
# --------------------------------------------------------------------------- #
# Flag -> args attribute (the ``dest`` of ``ders_megatron.training.arguments.add_ders_args``).
FLAG_DESTS = {
    "--moe-ders": "moe_ders",
    "--moe-ders-rank": "moe_ders_rank",
    "--moe-ders-alpha": "moe_ders_alpha",
    "--moe-ders-drop-rate": "moe_ders_drop_rate",
    "--moe-ders-seed": "moe_ders_seed",
    "--moe-ders-impl": "moe_ders_impl",
    "--moe-ders-freeze-base": "moe_ders_freeze_base",
    "--moe-ders-shared-expert": "moe_ders_shared_expert",
    "--moe-ders-codecs": "moe_ders_codecs",
    "--moe-ders-quant-group-size": "moe_ders_quant_group_size",
    "--moe-ders-upcycle-from": "moe_ders_upcycle_from",
    "--moe-ders-shared-bias": "moe_ders_expert_bias",
    QK_LAYERNORM_WIDTH_FLAG: "ders_qk_layernorm_width",
}


def _get(args, dest, default=None):
    value = getattr(args, dest, None)
    return default if value is None else value


def shared_expert_of(args) -> str:
    """``--moe-ders-shared-expert`` as it applies to ``args``: given, or what
    ``--moe-shared-expert-intermediate-size`` implies (``full`` when set).

    Checkpoints written before the one vocabulary stored a bool (True = ``ders``).
    """
    value = getattr(args, "moe_ders_shared_expert", None)
    if value is True:
        return "ders"
    if value in (None, False):
        return "full" if getattr(args, "moe_shared_expert_intermediate_size", None) else "none"
    return value


def expert_matrices_of(args) -> dict[str, tuple[int, int]]:
    """[out, in] of each delta matrix of the MoE that ``args`` describe."""
    ffn = getattr(args, "moe_ffn_hidden_size", None) or args.ffn_hidden_size
    return delta_matrices(args.hidden_size, ffn, bool(getattr(args, "swiglu", False)))


def expert_bias_of(args) -> bool:
    """Whether the experts own their biases: only with ``--add-bias-linear``, and not in
    checkpoints written before per-expert biases (no ``moe_ders_expert_bias`` in their args)
    or with ``--moe-ders-shared-bias``."""
    return bool(getattr(args, "add_bias_linear", False)) and bool(getattr(args, "moe_ders_expert_bias", False))


def qk_layernorm_width_of(args) -> str:
    """``--ders-qk-layernorm-width`` as it applies to ``args`` (checkpoints written before the
    flag: megatron's per-head norm)."""
    return getattr(args, "ders_qk_layernorm_width", None) or DEFAULTS["qk_layernorm_width"]


def ders_config_from_args(args) -> DeRSConfig | None:
    """The DeRSConfig ``--moe-ders*`` (or a checkpoint's stored args) ask for; None for
    megatron's own experts (``vanilla``). Defaults for absent flags: :data:`DEFAULTS`.

    Raises :class:`DeRSArgumentError` naming the flag for values a config rejects.
    """
    kind = canonical_kind(getattr(args, "moe_ders", None))
    if kind == "vanilla":
        return None
    if kind not in KINDS:
        raise DeRSArgumentError(f"--moe-ders must be one of {KINDS}, got {kind!r}")
    try:
        if kind == "codec":
            codecs = getattr(args, "moe_ders_codecs", None)
            if not codecs:
                raise DeRSArgumentError("--moe-ders codec needs --moe-ders-codecs (tools/compress.py writes it)")
            table = parse_codecs(codecs, _get(args, "moe_ders_quant_group_size", DEFAULTS["quant_group_size"]))
            delta = codecs_delta_config(table, expert_matrices_of(args))
        else:
            delta = delta_config(kind, rank=_get(args, "moe_ders_rank", DEFAULTS["rank"]),
                                 alpha=getattr(args, "moe_ders_alpha", None),
                                 drop_rate=_get(args, "moe_ders_drop_rate", DEFAULTS["drop_rate"]))
        return DeRSConfig(
            delta=delta,
            seed=_get(args, "moe_ders_seed", _get(args, "seed", DEFAULTS["seed"])),
            freeze_base=bool(getattr(args, "moe_ders_freeze_base", False)),
            extended_shared_expert=shared_expert_of(args) == "ders",
            impl=_get(args, "moe_ders_impl", DEFAULTS["impl"]),
            expert_bias=expert_bias_of(args),
        )
    except DeRSArgumentError:
        raise
    except ValueError as err:
        raise DeRSArgumentError(str(err)) from err


def ders_args(kind: str = DEFAULTS["kind"], *, rank: int | None = None, alpha: float | None = None,
              drop_rate: float | None = None, seed: int = DEFAULTS["seed"], impl: str | None = None,
              freeze_base: bool = False, shared_expert: str = DEFAULTS["shared_expert"],
              codecs: str | None = None, quant_group_size: int | None = None) -> dict:
    """The ``--moe-ders*`` args attributes (dest -> value) of a DeRS model: what the tools
    write into the args of the checkpoints they save, and what :func:`ders_config_from_args`
    reads back. Kind-specific values are kept only for their kind (None otherwise), as the
    parser leaves flags that were not given."""
    kind = canonical_kind(kind)
    if kind not in KINDS:
        raise DeRSArgumentError(f"--moe-ders must be one of {KINDS}, got {kind!r}")
    if shared_expert not in SHARED_EXPERTS:
        raise DeRSArgumentError(f"--moe-ders-shared-expert must be one of {SHARED_EXPERTS}, got {shared_expert!r}")
    return {
        "moe_ders": kind,
        "moe_ders_rank": rank if kind == "lowrank" else None,
        "moe_ders_alpha": alpha if kind == "lowrank" else None,
        "moe_ders_drop_rate": drop_rate if kind == "sparse" else None,
        "moe_ders_seed": seed,
        "moe_ders_impl": impl,
        "moe_ders_freeze_base": bool(freeze_base),
        "moe_ders_shared_expert": shared_expert,
        "moe_ders_codecs": codecs,
        "moe_ders_quant_group_size": quant_group_size,
        "moe_ders_expert_bias": True,  # what the tools write; with --add-bias-linear, own biases
    }


def set_ders_args(args, **values) -> None:
    """Write :func:`ders_args` (``values`` as its keywords) onto ``args``."""
    for dest, value in ders_args(**values).items():
        setattr(args, dest, value)


# What a checkpoint's stored settings are compared on, per flag: the value that
# builds the model (defaults filled in, legacy spellings read).
def _model_settings(args) -> dict[str, object]:
    kind = canonical_kind(getattr(args, "moe_ders", None))
    settings = {"--moe-ders": kind, QK_LAYERNORM_WIDTH_FLAG: qk_layernorm_width_of(args)}
    if kind == "vanilla":
        return settings
    settings["--moe-ders-shared-expert"] = shared_expert_of(args)
    if getattr(args, "add_bias_linear", False):
        settings["--moe-ders-shared-bias"] = not expert_bias_of(args)
    if kind == "lowrank":
        settings["--moe-ders-rank"] = _get(args, "moe_ders_rank", DEFAULTS["rank"])
        settings["--moe-ders-alpha"] = getattr(args, "moe_ders_alpha", None)
    if kind == "sparse":
        settings["--moe-ders-drop-rate"] = _get(args, "moe_ders_drop_rate", DEFAULTS["drop_rate"])
    if kind == "codec":
        settings["--moe-ders-codecs"] = getattr(args, "moe_ders_codecs", None)
        settings["--moe-ders-quant-group-size"] = _get(args, "moe_ders_quant_group_size",
                                                       DEFAULTS["quant_group_size"])
    return settings


def mismatched_ders_flags(run_args, checkpoint_args) -> list[str]:
    """The ``--moe-ders*`` flags whose value in this run would build another model than
    the one the checkpoint holds, each as ``"--flag: run X, checkpoint Y"``.

    Compared: the kind and everything that shapes or scales the experts (rank, alpha,
    drop rate, codecs, shared expert), and ``--ders-qk-layernorm-width`` (the QK norm's
    weight shape). Not compared: ``--moe-ders-seed`` (it seeds the
    init, and the sparse positions come from the ``position_seed`` stored in the
    checkpoint), ``--moe-ders-impl`` (both paths read the same keys) and
    ``--moe-ders-freeze-base`` (a training choice).
    """
    run, stored = _model_settings(run_args), _model_settings(checkpoint_args)
    differing = []
    for flag in sorted(set(run) | set(stored), key=list(FLAG_DESTS).index):
        if run.get(flag) != stored.get(flag):
            differing.append(f"{flag}: run {_show(run.get(flag))}, checkpoint {_show(stored.get(flag))}")
    return differing


def _show(value) -> str:
    return "(not set)" if value is None else str(value)


# --------------------------------------------------------------------------- #
# Validation of the Megatron flags DeRS depends on
# --------------------------------------------------------------------------- #
def effective_ffn(args) -> int:
    """--ffn-hidden-size as Megatron will set it (``training/arguments.py:1280``)."""
    if args.ffn_hidden_size is not None:
        return args.ffn_hidden_size
    if args.swiglu:
        return int((4 * args.hidden_size * 2 / 3) / 64) * 64
    return 4 * args.hidden_size


def moe_ffn(args) -> int:
    """--moe-ffn-hidden-size, defaulting to the FFN size (``arguments.py:1595``)."""
    return args.moe_ffn_hidden_size or effective_ffn(args)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DeRSArgumentError(message)


def check_kind_flags(kind: str, *, rank=None, alpha=None, drop_rate=None) -> None:
    """``--moe-ders-rank``/``--moe-ders-alpha`` apply to ``lowrank`` only and
    ``--moe-ders-drop-rate`` to ``sparse`` only: given with another kind, they would be
    silently ignored. (None: not given.)"""
    kind = canonical_kind(kind)
    for flag, value, needed in (("--moe-ders-rank", rank, "lowrank"), ("--moe-ders-alpha", alpha, "lowrank"),
                                ("--moe-ders-drop-rate", drop_rate, "sparse")):
        _check(value is None or kind == needed, f"{flag} applies to --moe-ders {needed} only, not {kind}")


def _check_flags_need_ders(args) -> None:
    """DeRS-only flags without DeRS, and kind-only flags with another kind."""
    kind = canonical_kind(args.moe_ders)
    generic = {
        "--moe-ders-seed": args.moe_ders_seed is not None,
        "--moe-ders-impl": args.moe_ders_impl is not None,
        "--moe-ders-freeze-base": args.moe_ders_freeze_base,
        "--moe-ders-shared-expert ders": args.moe_ders_shared_expert == "ders",
    }
    for flag, given in generic.items():
        _check(not (given and kind == "vanilla"), f"{flag} needs --moe-ders lowrank|sparse|dense|codec")
    check_kind_flags(kind, rank=args.moe_ders_rank, alpha=args.moe_ders_alpha, drop_rate=args.moe_ders_drop_rate)


def _check_moe_shape(args) -> None:
    num_experts = args.num_experts or 0
    kind = canonical_kind(args.moe_ders)
    _check(num_experts >= 2, f"--moe-ders {kind} needs --num-experts >= 2 (got {args.num_experts})")
    hidden, ffn = args.hidden_size, moe_ffn(args)
    if kind == "lowrank":
        rank = _get(args, "moe_ders_rank", DEFAULTS["rank"])
        _check(rank <= min(hidden, ffn),
               f"--moe-ders-rank {rank} exceeds the expert FFN: min(--hidden-size {hidden}, "
               f"--moe-ffn-hidden-size {ffn}) = {min(hidden, ffn)}")
    if kind == "sparse":
        try:
            SparseDeltaConfig(drop_rate=_get(args, "moe_ders_drop_rate", DEFAULTS["drop_rate"])).kept(
                min(hidden, ffn), max(hidden, ffn))
        except ValueError as err:
            raise DeRSArgumentError(str(err)) from err
    etp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    _check(ffn % etp == 0,
           f"--moe-ffn-hidden-size {ffn} is not divisible by --expert-tensor-parallel-size {etp}")
    ep = args.expert_model_parallel_size
    _check(num_experts % ep == 0,
           f"--expert-model-parallel-size {ep} does not divide --num-experts {num_experts}")
    if args.moe_layer_freq is not None and not isinstance(args.moe_layer_freq, int):
        _check(len(args.moe_layer_freq) == args.num_layers,
               f"--moe-layer-freq lists {len(args.moe_layer_freq)} layers but --num-layers is "
               f"{args.num_layers}")


def check_expert_tp(etp: int, tp: int, etp_flag: str = "--expert-tensor-parallel-size",
                    tp_flag: str = "--tensor-model-parallel-size") -> None:
    """Where the shared base can live (ders_megatron/layers/placement.py placement table):
    expert-TP 1 (whole base per rank) or equal to TP (sharded like the dense layers)."""
    _check(etp in (1, tp),
           f"{etp_flag} {etp} must be 1 or {tp_flag} ({tp}): the shared base is sharded like the dense layers")


def _check_placement(args) -> None:
    tp = args.tensor_model_parallel_size
    check_expert_tp(args.expert_tensor_parallel_size or tp, tp)  # Megatron's default ETP = TP (arguments.py:569)
    _check(tp == 1 or args.sequence_parallel,
           f"--tensor-model-parallel-size {tp} with MoE needs --sequence-parallel "
           "(transformer/moe/moe_layer.py:630)")


def check_shared_expert(shared_expert: str, kind: str, size: int | None, ffn: int | None = None) -> None:
    """The shared-expert rules, for training and the tools alike.

    ``size``: the shared expert's FFN (``--moe-shared-expert-intermediate-size``,
    None when there is none); ``ffn``: the experts' FFN (the base the extended
    shared expert shares).
    """
    _check(shared_expert in SHARED_EXPERTS,
           f"--moe-ders-shared-expert must be one of {SHARED_EXPERTS}, got {shared_expert!r}")
    if shared_expert == "none":
        _check(not size, f"--moe-shared-expert-intermediate-size {size} builds a shared expert: pass "
               "--moe-ders-shared-expert full (megatron's) or ders (base + delta), or drop the size")
        return
    if shared_expert == "ders":
        _check(canonical_kind(kind) != "vanilla",
               "--moe-ders-shared-expert ders shares the DeRS base; it needs --moe-ders lowrank|sparse|dense|codec")
    _check(size is not None,
           f"--moe-ders-shared-expert {shared_expert} needs --moe-shared-expert-intermediate-size")
    if shared_expert == "ders" and ffn is not None:
        _check(size == ffn,
               f"--moe-ders-shared-expert ders shares the experts' base, so "
               f"--moe-shared-expert-intermediate-size ({size}) must equal --moe-ffn-hidden-size ({ffn})")


def _check_shared_expert_args(args) -> None:
    value = getattr(args, "moe_ders_shared_expert", None)
    if value is None:
        return  # follows --moe-shared-expert-intermediate-size
    size = args.moe_shared_expert_intermediate_size
    check_shared_expert(value, args.moe_ders, size, moe_ffn(args) if args.num_experts else None)
    if value == "ders":
        _check(not args.moe_shared_expert_overlap,
               "--moe-shared-expert-overlap is not supported with --moe-ders-shared-expert ders")
        _check(not args.add_bias_linear,
               "--moe-ders-shared-expert ders needs --disable-bias-linear (shared experts have no bias)")


def _check_upcycle_from(args) -> None:
    if not getattr(args, "moe_ders_upcycle_from", None):
        return
    _check(bool(args.num_experts), "--moe-ders-upcycle-from builds a MoE: it needs --num-experts")
    _check(canonical_kind(args.moe_ders) != "codec",
           "--moe-ders-upcycle-from starts deltas from their initialisation; --moe-ders codec models come "
           "from tools/compress.py (load them with --load)")
    _check(not args.moe_use_upcycling,
           "--moe-ders-upcycle-from and megatron's --moe-use-upcycling both upcycle at start: use one")


def _check_ders_conflicts(args) -> None:
    _check(not args.moe_use_upcycling,
           "--moe-use-upcycling converts to megatron's SequentialMLP/TEGroupedMLP experts "
           "(upcycling_utils.py) and cannot build DeRS experts; drop it with --moe-ders")
    _check(not args.moe_grouped_gemm,
           "--moe-grouped-gemm selects megatron's grouped-GEMM experts, which --moe-ders "
           "replaces; drop one of them")
    # megatron DDP waits for each bucket's overlapped parameter all-gather in forward pre-hooks
    # of the modules whose forward runs (distributed/distributed_data_parallel.py:400-467);
    # the delta modules' forward never runs and the shared expert reads the base weights
    # directly, so DP ranks would compute with parameters whose all-gather is unfinished.
    _check(not getattr(args, "overlap_param_gather", False),
           "--overlap-param-gather is not supported with --moe-ders: the DeRS deltas and shared "
           "base are used without their module's forward, which is where megatron DDP waits for the "
           "overlapped all-gather; drop the flag (the distributed optimizer itself works)")
    _check_gpu_features(args)
    if _get(args, "moe_ders_impl", DEFAULTS["impl"]) == "fused":
        # The fused layer dispatches no tokens and keeps every delta on every rank.
        _check(args.expert_model_parallel_size == 1,
               f"--moe-ders-impl fused does not use expert parallelism: set "
               f"--expert-model-parallel-size 1 (got {args.expert_model_parallel_size}) or use "
               "--moe-ders-impl dropin")


def _check_gpu_features(args) -> None:
    """GPU features the DeRS experts do not implement (yet): refused by name, never silently
    wrong."""
    quantized = getattr(args, "fp8", None) or getattr(args, "fp4", None)
    padded = getattr(args, "moe_router_padding_for_quantization", False) or getattr(
        args, "moe_router_padding_for_fp8", False)
    _check(not quantized or padded,
           "--fp8-format/--fp4-format with --moe-ders needs --moe-router-padding-for-quantization: the shared "
           "base's GEMM runs over all dispatched rows, whose count Transformer Engine's FP8/FP4 GEMMs need "
           "divisible by 16 (megatron pads the routing map for that)")
    _check(not getattr(args, "delay_wgrad_compute", False),
           "--delay-wgrad-compute is not supported with --moe-ders: the DeRS experts compute their weight "
           "gradients in the backward pass (backward_dw is a no-op), so deferred ones would be dropped")
    graphs = getattr(args, "cuda_graph_impl", "none") not in (None, "none") or getattr(args, "enable_cuda_graph", False) \
        or getattr(args, "external_cuda_graph", False)
    modules = {getattr(m, "name", m) for m in (getattr(args, "cuda_graph_modules", None) or [])}
    _check(not graphs or (modules and modules <= {"attn", "mlp", "mamba"}),
           "CUDA graphs that capture the MoE layer (--cuda-graph-impl with no --cuda-graph-modules, or "
           "moe/moe_router/moe_preprocess) are not supported with --moe-ders: the experts read "
           "tokens_per_expert on the host. Capture attention only: --cuda-graph-modules attn")


# Flags whose effect the DeRS layer spec (ders_megatron/layers/specs.py) does not build:
# rejected instead of silently ignored.
UNSUPPORTED_MODEL_FLAGS = (
    ("spec", "--spec (this entry point builds its own layer spec)"),
    ("hybrid_layer_pattern", "--hybrid-layer-pattern (GPTModel only)"),
    ("multi_latent_attention", "--multi-latent-attention"),
    ("experimental_attention_variant", "--experimental-attention-variant"),
    ("mtp_num_layers", "--mtp-num-layers"),
    ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path"),
    ("use_legacy_models", "--use-legacy-models"),
)


# Data flags Megatron parses that the entry script's dataset provider (training/data.py,
# GPTDataset) does not honour: refused instead of parsed and ignored.
UNSUPPORTED_DATA_FLAGS = (
    ("sft", "--sft (SFT datasets)"),
    ("fim_data", "--fim-data (fill-in-the-middle datasets)"),
)


def check_qk_layernorm_width(width: str, *, qk_layernorm: bool, num_query_groups: int | None = None,
                             tensor_parallel_size: int = 1, use_te: bool = False) -> None:
    """Refuse, naming the flag, a full-width QK norm that cannot be built: it needs
    --qk-layernorm, the local spec (TE's spec builds TENorm per head), and whole key heads
    on each TP rank (with fewer query groups than TP ranks megatron replicates key heads
    over ranks, ``transformer/attention.py:1839-1857``, and their squares would count twice)."""
    _check(width in QK_LAYERNORM_WIDTHS,
           f"{QK_LAYERNORM_WIDTH_FLAG} must be one of {QK_LAYERNORM_WIDTHS}, got {width!r}")
    if width == "head":
        return
    _check(qk_layernorm, f"{QK_LAYERNORM_WIDTH_FLAG} full needs --qk-layernorm")
    _check(not use_te, f"{QK_LAYERNORM_WIDTH_FLAG} full needs --transformer-impl local (TE's QK norm is per head)")
    _check(num_query_groups is None or num_query_groups % tensor_parallel_size == 0,
           f"{QK_LAYERNORM_WIDTH_FLAG} full needs --num-query-groups ({num_query_groups}) divisible by "
           f"--tensor-model-parallel-size ({tensor_parallel_size})")


def _check_qk_layernorm_width(args) -> None:
    heads = args.num_attention_heads
    groups = (getattr(args, "num_query_groups", None) if getattr(args, "group_query_attention", False)
              else None) or heads
    check_qk_layernorm_width(
        qk_layernorm_width_of(args), qk_layernorm=bool(getattr(args, "qk_layernorm", False)), num_query_groups=groups,
        tensor_parallel_size=getattr(args, "tensor_model_parallel_size", 1) or 1,
        use_te=getattr(args, "transformer_impl", "local") == "transformer_engine",
    )


def _check_model_flags(args, own_data_provider: bool = True) -> None:
    for attr, flag in UNSUPPORTED_MODEL_FLAGS:
        _check(not getattr(args, attr, None), f"{flag} is not supported by the DeRS model provider")
    for attr, flag in UNSUPPORTED_DATA_FLAGS if own_data_provider else ():
        _check(not getattr(args, attr, None),
               f"{flag} is not supported by the entry script's GPT dataset provider (ders_megatron/training/data.py)")


def _check_megatron_preconditions(args) -> None:
    """Megatron asserts these with no message, one of them only after building the model."""
    _check(args.save is None or args.save_interval is not None,  # arguments.py:1322
           "--save needs --save-interval")
    decay = args.lr_decay_iters or args.train_iters
    if args.train_iters and args.lr_warmup_iters:  # optimizer_param_scheduler.py:160
        _check(args.lr_warmup_iters < decay,
               f"--lr-warmup-iters {args.lr_warmup_iters} must be below --lr-decay-iters "
               f"(default --train-iters) {decay}")


def _check_runtime(args, cuda_available: bool) -> None:
    if args.cpu:
        _check(not cuda_available,
               "--cpu asks for the CPU runtime, but CUDA is available here; the runtime only "
               "replaces CUDA on machines without it (drop --cpu)")
        _check(args.moe_token_dispatcher_type != "flex",
               "--moe-token-dispatcher-type flex needs DeepEP/HybridEP (CUDA); use alltoall or "
               "allgather with --cpu")
        _check(not args.fp16, "--fp16 needs CUDA loss scaling; use fp32 or --bf16 with --cpu")
        _check(not args.moe_grouped_gemm, "--moe-grouped-gemm needs Transformer Engine (CUDA)")
    else:
        _check(cuda_available, CPU_MODE_HINT)


def validate_ders_args(args, cuda_available: bool, own_data_provider: bool = True) -> DeRSConfig | None:
    """Reject invalid DeRS/CPU flag combinations; return the DeRSConfig (or None).

    Runs on the raw parsed args, before Megatron's own ``validate_args``, so it
    computes Megatron's later defaults (FFN size, expert-TP) itself.
    ``own_data_provider``: the run uses training/data.py (examples/pretrain_gpt_ders.py),
    which does not honour ``UNSUPPORTED_DATA_FLAGS``; a Megatron-LM ``pretrain_gpt.py``
    keeps its own dataset provider, which does.
    """
    _check_runtime(args, cuda_available)
    _check_model_flags(args, own_data_provider)
    _check_qk_layernorm_width(args)
    _check_megatron_preconditions(args)
    _check_flags_need_ders(args)
    _check_upcycle_from(args)
    ders = ders_config_from_args(args)
    if args.num_experts:
        _check_placement(args)
        _check_shared_expert_args(args)
    if ders is None:
        return None
    _check_moe_shape(args)
    _check_ders_conflicts(args)
    return ders
