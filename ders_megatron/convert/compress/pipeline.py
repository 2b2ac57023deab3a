"""DeRS compression of a trained vanilla MoE checkpoint (``tools/compress.py``).

Input: a megatron checkpoint with ``SequentialMLP`` experts
(``mlp.experts.experts.linear_fc*``), optionally the dense checkpoint it was
upcycled from. Output: a DeRS release checkpoint whose experts are the base
plus compressed deltas, which DeRSExperts runs for inference and can keep
training (bases, routers, scales, values, factors train; codes and indices are
fixed). Streaming as upcycling is: one MoE layer's experts of one matrix at a time.
With ``--add-bias-linear`` each expert keeps its own trained fc1/fc2 bias
(``experts.biases.*``; the paper counts a bias per expert and does not compress it).

The output args say how to rebuild the model: ``moe_ders`` is ``sparse``
(``dare:P``) or ``lowrank`` (``svd:R``/``wsvd:R``) when every matrix uses that
codec, so the training script's own flags rebuild it; otherwise ``codec`` with
``moe_ders_codecs`` (:func:`ders_megatron.core.config.ders_config_from_args` reads both).
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ders_megatron.io.checkpoint import CheckpointError, atomic_output_dir, load_common, load_model
from ders_megatron.core.config import (
    DEFAULTS,
    SVD,
    CodecError,
    Dare,
    canonical_kind,
    check_codec,
    codec_for,
    codecs_spec,
    ders_config_from_args,
    expert_matrices_of,
    parse_codecs,
    set_ders_args,
)
from ders_megatron.core.decomposition import BASES, MatrixCalibration, compress_experts, make_base, split_fc1
from ders_megatron.io.upcycle_state import SHARED_INITS, shared_fc2_scale

SHARED_MODES = ("full", "ders")  # --moe-ders-shared-expert values compression can produce


class CompressError(CheckpointError):
    """Bad input or settings for compression; the message names the flag or file."""


@dataclass(frozen=True, kw_only=True)
class CompressConfig:
    """What ``tools/compress.py`` asks for (flag names in the error messages)."""

    codecs: str  # --moe-ders-codecs, e.g. "dare:0.9" or "fc1:quant:4,fc2:svd:8"
    base: str | None = None  # --base: dense | mean | fisher; None: dense, which needs --dense (the paper's base)
    dense_root: str | None = None  # --dense
    shared_expert_init: str | None = None  # --shared-expert-init: split | copy; None: read off the weights
    max_delta_norm: float = DEFAULTS["max_delta_norm"]  # --max-delta-norm: refuse larger ||Δ_e|| / ||W_e||
    seed: int = DEFAULTS["seed"]  # --moe-ders-seed: DARE positions
    group_size: int = DEFAULTS["quant_group_size"]  # --moe-ders-quant-group-size
    shared_expert: str = "full"  # --moe-ders-shared-expert: full (kept as it is, if any) | ders (base + its own delta)
    calib_data: str | None = None  # --calib-data
    eval_data: str | None = None  # --eval-data
    seq_length: int | None = None  # --seq-length (default: the checkpoint's)
    batch_size: int = 4
    calib_batches: int = 8
    eval_batches: int = 16

    def __post_init__(self):
        if self.base is None:  # the paper's base is the experts' shared initial weight: the dense FFN
            if not self.dense_root:
                raise CompressError(
                    "no base: pass --dense DIR (the dense checkpoint the MoE was upcycled from, the default "
                    "base) or ask for --base mean|fisher")
            object.__setattr__(self, "base", "dense")
        if self.base not in BASES:
            raise CompressError(f"--base must be one of {BASES}, got {self.base!r}")
        if self.base == "dense" and not self.dense_root:
            raise CompressError("--base dense needs --dense DIR (the checkpoint the MoE was upcycled from)")
        if self.base != "dense" and self.dense_root:
            raise CompressError(f"--dense is read only with --base dense, not --base {self.base}: drop one of them")
        if self.shared_expert_init is not None and self.shared_expert_init not in SHARED_INITS:
            raise CompressError(f"--shared-expert-init must be one of {SHARED_INITS}, got {self.shared_expert_init!r}")
        if isinstance(self.max_delta_norm, bool) or not isinstance(self.max_delta_norm, (int, float)) \
                or not self.max_delta_norm > 0:
            raise CompressError(f"--max-delta-norm must be > 0, got {self.max_delta_norm!r}")
        if self.shared_expert not in SHARED_MODES:
            raise CompressError(f"--moe-ders-shared-expert must be one of {SHARED_MODES}, got {self.shared_expert!r}")
        if self.shared_expert == "ders" and self.base == "fisher":
            raise CompressError("--moe-ders-shared-expert ders needs --base mean or dense (the shared expert is not routed)")
        table = self.table  # parse errors now
        if (self.base == "fisher" or any(isinstance(c, SVD) and c.whiten for c in table.values())) and not self.calib_data:
            raise CompressError("--base fisher and wsvd:R need --calib-data (token ids for calibration)")

    @property
    def table(self) -> dict:
        try:
            return parse_codecs(self.codecs, self.group_size)
        except CodecError as err:
            raise CompressError(f"--moe-ders-codecs: {err}") from err


# --------------------------------------------------------------------------- #
# Args and configs
# --------------------------------------------------------------------------- #
def compressed_args(moe_args, cfg: CompressConfig, table: dict) -> argparse.Namespace:
    """The DeRS model's args: the MoE args with the compressed delta kind (module doc)."""
    args = copy.copy(moe_args)
    codecs = {codec_for(table, m) for m in expert_matrices_of(moe_args)}
    single = codecs.pop() if len(codecs) == 1 else None
    kind, rank, drop_rate = "codec", None, None
    if isinstance(single, Dare):
        kind, drop_rate = "sparse", single.drop_rate
    elif isinstance(single, SVD):
        kind, rank = "lowrank", single.rank
    has_shared = bool(args.moe_shared_expert_intermediate_size)
    set_ders_args(
        args, kind=kind, rank=rank, drop_rate=drop_rate, seed=cfg.seed,
        impl=getattr(args, "moe_ders_impl", None), freeze_base=bool(getattr(args, "moe_ders_freeze_base", False)),
        shared_expert=(cfg.shared_expert if has_shared else "none"),
        codecs=codecs_spec(table), quant_group_size=cfg.group_size,
    )
    args.consumed_train_samples = args.skipped_train_samples = args.consumed_valid_samples = 0
    args.ders_compression = compression_record(cfg)
    return args


def compression_record(cfg: CompressConfig, dense_base: "DenseBase | None" = None) -> dict:
    """What the compressed experts' base is (written into the output args and the report)."""
    record = {"base": cfg.base, "dense": None if cfg.base != "dense" else str(cfg.dense_root), "codecs": cfg.codecs}
    if dense_base is not None:
        record.update(dense_base.record())
    return record


def read_moe_args(root) -> argparse.Namespace:
    """A vanilla MoE checkpoint's args; clear errors for anything else."""
    from ders_megatron.io.checkpoint import tensor_shapes
    from ders_megatron.io.streaming import check_full_args

    args = load_common(root).get("args")
    if args is None:
        raise CompressError(f"{root} holds no 'args': cannot tell the model's shape")
    check_full_args(args, root)
    experts = [k for k in tensor_shapes(root) if ".mlp.experts.experts." in k]
    if not getattr(args, "num_experts", None) or not experts:
        kind = "a DeRS checkpoint" if canonical_kind(getattr(args, "moe_ders", None)) != "vanilla" else "not a MoE checkpoint"
        raise CompressError(
            f"{root} is {kind}: compression needs a trained vanilla MoE (megatron SequentialMLP experts)"
        )
    if getattr(args, "moe_grouped_gemm", False):
        raise CompressError(f"{root}: grouped-GEMM expert checkpoints are not supported; save with SequentialMLP")
    return args


# --------------------------------------------------------------------------- #
# Per-layer compression, streamed
# --------------------------------------------------------------------------- #
class LayerSource:
    """Expert stacks of one MoE layer from the MoE checkpoint, base from the dense one."""

    def __init__(self, root, dense_root=None):
        from ders_megatron.io.checkpoint import tensor_shapes

        self.root = root
        self.shapes = tensor_shapes(root)
        self.dense = None
        if dense_root is not None:
            from ders_megatron.io.upcycle_state import DenseSource, read_dense_args

            read_dense_args(dense_root)
            self.dense = DenseSource(dense_root)

    def key(self, layer: int, suffix: str) -> tuple[str, tuple]:
        """The checkpoint key (either impl's layout) and layer index of a layer's tensor."""
        from ders_megatron.io.layout import resolve_key

        stacked = resolve_key(f"decoder.layers.{suffix}", self.shapes)
        if stacked in self.shapes:
            return stacked, (layer,)
        return resolve_key(f"decoder.layers.{layer}.{suffix}", self.shapes), ()

    def read(self, layer: int, suffix: str) -> torch.Tensor:
        from ders_megatron.io.checkpoint import check_finite, describe_source
        from ders_megatron.io.streaming import SliceRequest, read_slices

        key, prefix = self.key(layer, suffix)
        if key not in self.shapes:
            raise CompressError(f"{self.root} has no {suffix} for layer {layer}")
        shape = tuple(self.shapes[key][0])[len(prefix):]
        tensor = read_slices(self.root, [SliceRequest(key, prefix, (0,) * len(shape), shape)], self.shapes)[0]
        # A NaN in the source is named here, where it is read: a base or a delta-norm guard
        # computed from it would only report a NaN of its own.
        check_finite(tensor, key, lambda: describe_source(self.root, key))
        return tensor

    def dense_weight(self, layer: int, suffix: str, shape) -> torch.Tensor:
        from ders_megatron.io.streaming import read_slices

        request = self.dense.request(layer, suffix, (0,) * len(shape), shape)
        global_shape = tuple(self.dense.shapes[request.key][0])
        if global_shape[len(request.prefix):] != tuple(shape):
            raise CompressError(
                f"--dense {self.dense.root}: {suffix} of layer {layer} has shape "
                f"{global_shape[len(request.prefix):]}, the experts {tuple(shape)}: not the dense model "
                "this MoE was upcycled from"
            )
        return read_slices(self.dense.root, [request], self.dense.shapes)[0]


def upcycle_fc2_scales(args) -> dict[str, float]:
    """The fc2 scale the upcycler gives routed and shared experts, for each ``--shared-expert-init``
    (:func:`ders_megatron.io.upcycle_state.shared_fc2_scale`): 1 without a shared expert."""
    shared = "full" if getattr(args, "moe_shared_expert_intermediate_size", None) else "none"
    gate = bool(getattr(args, "moe_shared_expert_gate", False))
    return {init: shared_fc2_scale(shared, gate, init) for init in SHARED_INITS}


class DenseBase:
    """``--base dense``: per MoE layer, what the upcycler started every expert from.

    That is the dense FFN, with fc2 scaled by 1/(1+g) when a shared expert was split in
    (``--shared-expert-init split``, the upcycler's default; :mod:`ders_megatron.convert.upcycle`).
    A trained checkpoint's args are the training run's, which do not say how it was
    upcycled, so unless ``init`` (``--shared-expert-init``) says, the scale is read off the
    first MoE layer: the candidate whose base is nearest the routed experts' fc2. Fine-tuning
    moves experts by a few percent; the candidates differ by 50-100%.
    """

    def __init__(self, source: "LayerSource", args, init: str | None = None):
        self.source, self.scales = source, upcycle_fc2_scales(args)
        self.init, self.inferred = init, False
        self.scaled = len(set(self.scales.values())) > 1  # a shared expert: split and copy differ
        if not self.scaled:
            self.init = self.init or "copy"

    @property
    def fc2_scale(self) -> float:
        return self.scales[self.init]

    def __call__(self, layer: int, weights: dict[str, torch.Tensor], gated: bool) -> dict[str, torch.Tensor]:
        """matrix -> W_base [out, in] of one MoE layer; ``weights``: the experts' [E, out, in]."""
        fc1_parts = [weights[m] for m in ("fc1_gate", "fc1_up", "fc1") if m in weights]
        fc1_shape = (sum(w.shape[1] for w in fc1_parts), fc1_parts[0].shape[2])  # [F·g, H]
        fc1 = self.source.dense_weight(layer, "mlp.linear_fc1.weight", fc1_shape)
        fc2 = self.source.dense_weight(layer, "mlp.linear_fc2.weight", tuple(weights["fc2"].shape[1:]))  # [H, F]
        if self.init is None:
            self.init, self.inferred = self._nearest_init(weights["fc2"], fc2), True
        scaled = fc2 if self.fc2_scale == 1.0 else (fc2.float() * self.fc2_scale).to(fc2.dtype)  # as the upcycler rounds
        return {**split_fc1(fc1, gated), "fc2": scaled}

    def _nearest_init(self, fc2_EOI: torch.Tensor, dense_OI: torch.Tensor) -> str:
        distance = {init: (fc2_EOI.float() - scale * dense_OI.float()).norm().item() for init, scale in self.scales.items()}
        return min(distance, key=distance.get)

    def record(self) -> dict:
        return {"fc2_scale": self.fc2_scale if self.init else None, "shared_expert_init": self.init,
                "shared_expert_init_inferred": self.inferred}


def check_delta_norms(stats: dict, layer: int, owner: str, cfg: CompressConfig, dense_base=None) -> None:
    """Refuse deltas that fine-tuning cannot have made (``--max-delta-norm``): the base is wrong."""
    for matrix, values in stats.items():
        if values["delta_norm"] <= cfg.max_delta_norm:
            continue
        if dense_base is not None:
            cause = f"is --dense {cfg.dense_root} the checkpoint this MoE was upcycled from"
            if dense_base.scaled:
                cause += (f", and was its fc2 scaled x{dense_base.fc2_scale:.4g} (--shared-expert-init "
                          f"{dense_base.init}{', read off the weights' if dense_base.inferred else ''})")
            cause += "?"
        else:
            cause = f"were these experts upcycled from one FFN? (--base {cfg.base})"
        raise CompressError(
            f"layer {layer} {owner} {matrix}: ||W_e - W_base|| / ||W_e|| = {values['delta_norm']:.3f} is above "
            f"--max-delta-norm {cfg.max_delta_norm:g} (fine-tuned experts stay within a few percent of their "
            f"start): wrong base? {cause} Nothing written.")


class _LayerCompressor:
    """Compress one MoE layer at a time (the plan visits layers in order)."""

    def __init__(self, source: LayerSource, cfg: CompressConfig, table, gated: bool, shared: bool, calibration,
                 dense_base: DenseBase | None = None):
        self.source, self.cfg, self.table, self.gated, self.shared = source, cfg, table, gated, shared
        self.calibration = calibration or {}
        self.dense_base = dense_base
        self.stats: dict[int, dict] = {}
        self._layer: tuple[int, object, object] | None = None

    def get(self, layer: int):
        if self._layer is None or self._layer[0] != layer:
            self._layer = None
            self._layer = (layer, *self._compress(layer))
        return self._layer[1], self._layer[2]

    def _weights(self, layer, owner):
        fc1 = self.source.read(layer, f"mlp.{owner}linear_fc1.weight")
        fc2 = self.source.read(layer, f"mlp.{owner}linear_fc2.weight")
        if owner == "shared_experts.":
            fc1, fc2 = fc1.unsqueeze(0), fc2.unsqueeze(0)
        return {**split_fc1(fc1, self.gated), "fc2": fc2}

    def _base(self, layer, weights, shared_weights):
        if self.dense_base is not None:
            return self.dense_base(layer, weights, self.gated)
        if shared_weights is None:
            return self.cfg.base  # mean / fisher over the routed experts
        # Extended DeRS: one base over the N routed experts and the shared one.
        return {m: make_base(torch.cat([w, shared_weights[m]]), "mean", None, m) for m, w in weights.items()}

    def _compress(self, layer):
        weights = self._weights(layer, "experts.experts.")
        shared_weights = self._weights(layer, "shared_experts.") if self.shared else None
        calib = self.calibration.get(layer + 1)
        base = self._base(layer, weights, shared_weights)
        routed = compress_experts(weights, self.table, base=base, layer_number=layer + 1, seed=self.cfg.seed,
                                  calibration=calib)
        check_delta_norms(routed.stats, layer, "routed", self.cfg, self.dense_base)
        shared = None
        if shared_weights is not None:
            shared = compress_experts(shared_weights, self.table, base=routed.base, layer_number=layer + 1,
                                      seed=self.cfg.seed, expert_ids=[next(iter(weights.values())).shape[0]])
            check_delta_norms(shared.stats, layer, "shared", self.cfg, self.dense_base)
        self.stats[layer] = {"routed": routed.stats, **({"shared": shared.stats} if shared else {})}
        return routed, shared


class _Values:
    """Full values of the DeRS model's parameters for the lazy writer."""

    def __init__(self, plan, source: LayerSource, compressor: _LayerCompressor):
        from ders_megatron.io.streaming import SliceCache

        self.plan, self.source, self.compressor = plan, source, compressor
        self.cache = SliceCache(source.root, size=1, shapes=source.shapes)

    def __call__(self, name):
        from ders_megatron.io.streaming import SliceRequest, layer_of, layer_suffix

        entry = self.plan.entries[name]
        st = self.plan.entry_tensors(name)[0]
        layer = layer_of(st)
        suffix = layer_suffix(st.key) if layer is not None else st.key
        shape = tuple(entry.data.shape)
        if suffix in ("mlp.experts.linear_fc1.weight", "mlp.experts.linear_fc2.weight"):
            routed, _ = self.compressor.get(layer)
            if suffix.endswith("fc2.weight"):
                return routed.base["fc2"]
            parts = ("fc1_gate", "fc1_up") if "fc1_gate" in routed.base else ("fc1",)
            return torch.cat([routed.base[m] for m in parts])
        if suffix.startswith("mlp.experts.biases."):  # own biases: each vanilla expert's, as trained
            which = suffix.rsplit(".", 1)[1]
            return self.source.read(layer, f"mlp.experts.experts.linear_{which}.bias")
        if ".deltas." in suffix:
            owner, _, rest = suffix.partition(".deltas.")
            matrix, _, param = rest.partition(".")
            routed, shared = self.compressor.get(layer)
            result = shared if owner.endswith("shared_experts") else routed
            return result.deltas[matrix].state_dict()[param]
        if layer is None:
            return self.cache.get(SliceRequest(st.key, (), (0,) * len(shape), shape))
        key, prefix = self.source.key(layer, suffix)
        return self.cache.get(SliceRequest(key, prefix, (0,) * len(shape), shape))

    def origin(self, name) -> str:
        """Where ``name``'s values come from (the writer's NaN/Inf message): the expert
        tensors of its layer for bases and deltas, else the tensor it copies."""
        from ders_megatron.io.checkpoint import describe_source
        from ders_megatron.io.streaming import layer_of, layer_suffix

        st = self.plan.entry_tensors(name)[0]
        layer = layer_of(st)
        if layer is None:
            return f"copied from {describe_source(self.source.root, st.key)}"
        suffix = layer_suffix(st.key)
        if suffix.startswith("mlp.experts.linear_fc") or ".deltas." in suffix:
            keys = [self.source.key(layer, f"mlp.experts.experts.linear_fc{i}.weight")[0] for i in (1, 2)]
            dense = f" and the --dense {self.source.dense.root}" if self.source.dense is not None else ""
            return f"compressed from layer {layer} of {describe_source(self.source.root, keys)}{dense}"
        return f"copied from {describe_source(self.source.root, self.source.key(layer, suffix)[0])}"


# --------------------------------------------------------------------------- #
# Entry point
# --------------------------------------------------------------------------- #
def first_moe_layer(model) -> int:
    """0-based global index of the model's first MoE layer."""
    return next(layer.layer_number - 1 for layer in model.decoder.layers if hasattr(layer.mlp, "experts"))


def _check_matrices(args, table) -> None:
    for matrix, (out, inp) in expert_matrices_of(args).items():
        try:
            check_codec(codec_for(table, matrix), matrix, out, inp)
        except CodecError as err:
            raise CompressError(f"--moe-ders-codecs {err}") from err


def _check_source_keys(root, args, shapes) -> None:
    """Every tensor the MoE model of ``args`` has is in the checkpoint, under either
    --transformer-impl's name: a real incompatibility is named before any work."""
    from ders_megatron.io.layout import impl_of, missing_tensors
    from ders_megatron.io.streaming import build_model, plan_model, single_rank_args

    missing = missing_tensors(plan_model(build_model(single_rank_args(args), use_te=False)), shapes)
    if missing:
        raise CompressError(
            f"{root} (saved with --transformer-impl {impl_of(args)}) lacks {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}: not the MoE model its args describe"
        )


def _batches(path, args, cfg: CompressConfig, count: int):
    from ders_megatron.convert.compress.calibration import DataError, load_tokens, token_batches

    try:
        tokens = load_tokens(path, args.padded_vocab_size)
        return token_batches(tokens, cfg.seq_length or args.seq_length, cfg.batch_size, count)
    except DataError as err:
        raise CompressError(str(err)) from err


def _model(args, root, ders):
    from ders_megatron.io.streaming import build_model, single_rank_args

    model = build_model(single_rank_args(args), ders, meta=False, use_te=False)
    load_model(model, root)
    return model


def compress_checkpoint(moe_root, out_root, cfg: CompressConfig, *, force: bool = False,
                        file_bytes: int | None = None) -> dict:
    """Compress the MoE checkpoint at ``moe_root`` into a DeRS checkpoint at ``out_root``;
    returns the report (:mod:`.report`). Nothing is written on error."""
    from ders_megatron.convert.compress.calibration import calibrate, evaluate
    from ders_megatron.convert.compress.report import build_report
    from ders_megatron.io.streaming import (
        DEFAULT_FILE_BYTES,
        build_model,
        plan_model,
        release_common,
        single_rank_args,
        write_release,
    )
    from ders_megatron.io.layout import impl_of, plan_in_layout
    from ders_megatron.io.session import single_rank_megatron

    start = time.perf_counter()
    out_root = Path(out_root)
    if out_root.exists() and not force:
        raise CompressError(f"{out_root} exists; pass --force to overwrite it")
    table = cfg.table
    with single_rank_megatron():
        args = read_moe_args(moe_root)
        _check_matrices(args, table)
        shared = cfg.shared_expert == "ders" and bool(args.moe_shared_expert_intermediate_size)
        source = LayerSource(moe_root, cfg.dense_root if cfg.base == "dense" else None)
        _check_source_keys(moe_root, args, source.shapes)
        calibration, evaluation = None, {}
        need_calib = cfg.base == "fisher" or any(isinstance(c, SVD) and c.whiten for c in table.values())
        if need_calib or cfg.eval_data:
            model = _model(args, moe_root, None)
            if need_calib:
                calibration = calibrate(model, _batches(cfg.calib_data, args, cfg, cfg.calib_batches),
                                        fisher=cfg.base == "fisher", gram=True)
            if cfg.eval_data:
                evaluation["before"] = evaluate(model, _batches(cfg.eval_data, args, cfg, cfg.eval_batches))
            del model
        out_args = compressed_args(args, cfg, table)  # keeps the source's --transformer-impl
        ders = ders_config_from_args(out_args)
        target = build_model(single_rank_args(out_args), ders, use_te=False)
        plan = plan_in_layout(plan_model(target), impl_of(out_args))
        dense_base = DenseBase(source, args, cfg.shared_expert_init) if cfg.base == "dense" else None
        compressor = _LayerCompressor(source, cfg, table, target.config.gated_linear_unit, shared, calibration,
                                      dense_base)
        compressor.get(first_moe_layer(target))  # the base checked (and the fc2 scale read) before any write
        out_args.ders_compression = compression_record(cfg, dense_base)
        with atomic_output_dir(out_root, force=force) as tmp:
            write_release(tmp, plan, _Values(plan, source, compressor), release_common(out_args),
                          file_bytes or DEFAULT_FILE_BYTES)
        if cfg.eval_data:
            model = _model(out_args, out_root, ders)
            evaluation["after"] = evaluate(model, _batches(cfg.eval_data, args, cfg, cfg.eval_batches))
            del model
    report = build_report(moe_root, out_root, cfg, table, compressor.stats, evaluation)
    report.update(dense_base.record() if dense_base is not None else {})
    report["seconds"] = time.perf_counter() - start
    return report


__all__ = ["CompressConfig", "CompressError", "DenseBase", "MatrixCalibration", "compress_checkpoint"]
