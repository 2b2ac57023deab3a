"""``--moe-ders*`` and ``--cpu`` for Megatron-LM's own argument parser.

megatron-core 0.19.2 ships ``megatron.training``, whose ``parse_and_validate_args``
(``training/arguments.py:87``) is: parse (Megatron's flags plus an
``extra_args_provider``), validate, ``set_global_variables`` (builds the tokenizer).
:func:`initialize_args` is that flow with two steps put in right after parsing,
so a bad combination fails before any work (tokenizer, process groups, data):

1. ``--cpu`` fills in the settings a CPU/gloo run needs (:data:`CPU_SETTINGS`);
2. :func:`validate_ders_args` rejects what DeRS cannot run, naming the flags.

Flag -> :class:`~ders_megatron.experts.DeRSConfig`:

=========================== ==================================================
``--moe-ders KIND``         ``delta`` = ``delta_config(KIND, ...)``; ``none``
                            keeps megatron's own experts (no DeRSConfig)
``--moe-ders-rank R``       ``LowRankDeltaConfig.rank`` (lowrank only, default 4)
``--moe-ders-alpha A``      ``LowRankDeltaConfig.alpha``: scale A/R (lowrank only)
``--moe-ders-drop-rate P``  ``SparseDeltaConfig.drop_rate`` (sparse only, 0.99)
``--moe-ders-seed S``       ``seed`` (default: Megatron's ``--seed``)
``--moe-ders-impl``         ``impl``: ``dropin`` (megatron MoELayer + DeRS
                            experts) or ``fused`` (``ders_megatron.fused``)
``--moe-ders-freeze-base``  ``freeze_base``: the shared base gets no gradient
``--moe-ders-shared-expert`` ``extended_shared_expert``: megatron's shared
                            expert becomes the base plus its own delta
``--moe-ders codec``        compressed deltas (``--moe-ders-codecs``), as
                            ``tools/compress.py`` writes them
=========================== ==================================================
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Any

from ders_megatron.deltas import SparseDeltaConfig, delta_config
from ders_megatron.experts import IMPLS, DeRSConfig

DERS_KINDS = ("none", "lowrank", "sparse", "dense", "codec")

# Flag -> default used when the flag is absent (None in the parser, so that a
# flag given without --moe-ders, or with the wrong kind, can be told apart).
DELTA_DEFAULTS = {"rank": 4, "drop_rate": 0.99}

# --cpu: (args attribute, value for CPU, megatron 0.19.2 default, flag to pass).
# tests/test_arguments.py checks the defaults against Megatron's parser.
CPU_SETTINGS = (
    ("distributed_backend", "gloo", "nccl", "--distributed-backend gloo"),
    ("use_cpu_initialization", True, None, "--use-cpu-initialization"),
    ("transformer_impl", "local", "transformer_engine", "--transformer-impl local"),
    ("gradient_accumulation_fusion", False, True, "--no-gradient-accumulation-fusion"),
    ("masked_softmax_fusion", False, True, "--no-masked-softmax-fusion"),
    ("bias_gelu_fusion", False, True, "--no-bias-gelu-fusion"),
    ("bias_swiglu_fusion", False, True, "--no-bias-swiglu-fusion"),
    ("bias_dropout_fusion", False, True, "--no-bias-dropout-fusion"),
    ("apply_rope_fusion", False, True, "--no-rope-fusion"),
    ("num_workers", 0, 2, "--num-workers 0"),
)


class DeRSArgumentError(ValueError):
    """An invalid flag or flag combination; the message names the flags."""


# --------------------------------------------------------------------------- #
# Parser
# --------------------------------------------------------------------------- #
def add_ders_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron's ``extra_args_provider`` hook: adds the DeRS and CPU flags."""
    group = parser.add_argument_group(title="DeRS experts (ders-megatron)")
    group.add_argument("--moe-ders", choices=DERS_KINDS, default="none",
                       help="Experts as one shared base + a light delta each: lowrank (DeRS-LM), "
                       "sparse (DeRS-SM) or dense; none keeps megatron's experts.")
    group.add_argument("--moe-ders-codecs", default=None, metavar="SPEC",
                       help="codec: the compressed deltas tools/compress.py wrote, per matrix "
                       "(e.g. 'quant:4' or 'fc1_gate=quant:4,fc1_up=quant:4,fc2=magnitude:0.9'); "
                       "written into the checkpoint args by the compressor.")
    group.add_argument("--moe-ders-quant-group-size", type=int, default=None,
                       help="codec with quant:K: values per quantization group (default 128).")
    group.add_argument("--moe-ders-rank", type=int, default=None,
                       help="lowrank: rank of each expert's delta "
                       f"(default {DELTA_DEFAULTS['rank']}).")
    group.add_argument("--moe-ders-alpha", type=float, default=None,
                       help="lowrank: scale deltas by alpha/rank (default: no scaling).")
    group.add_argument("--moe-ders-drop-rate", type=float, default=None,
                       help="sparse: fraction p of zero entries, density 1-p "
                       f"(default {DELTA_DEFAULTS['drop_rate']}).")
    group.add_argument("--moe-ders-seed", type=int, default=None,
                       help="Seed of the base/delta init and sparse positions (default: --seed).")
    group.add_argument("--moe-ders-impl", choices=IMPLS, default=None,
                       help="dropin: megatron's MoELayer with DeRS experts (default); "
                       "fused: base GEMM shared across experts (ders_megatron.fused).")
    group.add_argument("--moe-ders-freeze-base", action="store_true",
                       help="Train the deltas only: the shared base stays as loaded.")
    group.add_argument("--moe-ders-shared-expert", action="store_true",
                       help="Extended DeRS: the shared expert (--moe-shared-expert-intermediate-"
                       "size) becomes the base plus its own delta.")
    group.add_argument("--ders-loss-log", default=None, metavar="FILE",
                       help="Append each training iteration's LM loss at full precision as a "
                       "JSON line (rank 0 writes).")
    group = parser.add_argument_group(title="CPU runtime (ders-megatron)")
    group.add_argument("--cpu", action="store_true",
                       help="Run megatron-core on CPU with gloo (ders_megatron.runtime); implies "
                       + ", ".join(flag for *_, flag in CPU_SETTINGS) + ".")
    return parser


def ders_flags() -> tuple[str, ...]:
    """The option strings :func:`add_ders_args` adds (the frozen CLI surface)."""
    parser = add_ders_args(argparse.ArgumentParser(add_help=False))
    return tuple(sorted(o for a in parser._actions for o in a.option_strings))


# --------------------------------------------------------------------------- #
# Flags -> DeRSConfig
# --------------------------------------------------------------------------- #
def ders_config_from_args(args) -> DeRSConfig | None:
    """The DeRSConfig ``--moe-ders*`` asks for, or None for ``--moe-ders none``.

    Raises :class:`DeRSArgumentError` for values the delta configs reject
    (their messages name the flag).
    """
    if args.moe_ders == "none":
        return None
    if args.moe_ders == "codec":
        if not getattr(args, "moe_ders_codecs", None):
            raise DeRSArgumentError("--moe-ders codec needs --moe-ders-codecs (tools/compress.py writes it)")
        from ders_megatron.compress.pipeline import ders_config_from_args as codec_config

        try:
            return codec_config(args)
        except ValueError as err:
            raise DeRSArgumentError(str(err)) from err
    rank = args.moe_ders_rank if args.moe_ders_rank is not None else DELTA_DEFAULTS["rank"]
    drop = args.moe_ders_drop_rate
    drop = drop if drop is not None else DELTA_DEFAULTS["drop_rate"]
    try:
        delta = delta_config(args.moe_ders, rank=rank, alpha=args.moe_ders_alpha, drop_rate=drop)
        return DeRSConfig(
            delta=delta,
            seed=args.moe_ders_seed if args.moe_ders_seed is not None else args.seed,
            freeze_base=args.moe_ders_freeze_base,
            extended_shared_expert=args.moe_ders_shared_expert,
            impl=args.moe_ders_impl or "dropin",
        )
    except ValueError as err:
        raise DeRSArgumentError(str(err)) from err


# --------------------------------------------------------------------------- #
# --cpu
# --------------------------------------------------------------------------- #
def apply_cpu_settings(args) -> None:
    """Fill in :data:`CPU_SETTINGS` for ``--cpu``; a flag set against them is an error.

    A value left at Megatron's default is overridden; one the user changed to
    something else (e.g. ``--num-workers 4``) conflicts.
    """
    if not args.cpu:
        return
    for attr, cpu_value, default, flag in CPU_SETTINGS:
        value = getattr(args, attr)
        if value not in (cpu_value, default):
            raise DeRSArgumentError(f"--cpu needs {flag}, but {attr} = {value!r} was given")
        setattr(args, attr, cpu_value)


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #
def _effective_ffn(args) -> int:
    """--ffn-hidden-size as Megatron will set it (``training/arguments.py:1280``)."""
    if args.ffn_hidden_size is not None:
        return args.ffn_hidden_size
    if args.swiglu:
        return int((4 * args.hidden_size * 2 / 3) / 64) * 64
    return 4 * args.hidden_size


def _moe_ffn(args) -> int:
    """--moe-ffn-hidden-size, defaulting to the FFN size (``arguments.py:1595``)."""
    return args.moe_ffn_hidden_size or _effective_ffn(args)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DeRSArgumentError(message)


def _check_flags_need_ders(args) -> None:
    """DeRS-only flags without DeRS, and kind-only flags with another kind."""
    kind = args.moe_ders
    kind_only = {
        "--moe-ders-rank": (args.moe_ders_rank is not None, "lowrank"),
        "--moe-ders-alpha": (args.moe_ders_alpha is not None, "lowrank"),
        "--moe-ders-drop-rate": (args.moe_ders_drop_rate is not None, "sparse"),
    }
    generic = {
        "--moe-ders-seed": args.moe_ders_seed is not None,
        "--moe-ders-impl": args.moe_ders_impl is not None,
        "--moe-ders-freeze-base": args.moe_ders_freeze_base,
        "--moe-ders-shared-expert": args.moe_ders_shared_expert,
    }
    for flag, given in generic.items():
        _check(not (given and kind == "none"), f"{flag} needs --moe-ders lowrank|sparse|dense")
    for flag, (given, needed) in kind_only.items():
        _check(not given or kind == needed,
               f"{flag} applies to --moe-ders {needed} only, not {kind}")


def _check_moe_shape(args) -> None:
    num_experts = args.num_experts or 0
    kind = args.moe_ders
    _check(num_experts >= 2, f"--moe-ders {kind} needs --num-experts >= 2 (got {args.num_experts})")
    hidden, ffn = args.hidden_size, _moe_ffn(args)
    if kind == "lowrank":
        rank = args.moe_ders_rank if args.moe_ders_rank is not None else DELTA_DEFAULTS["rank"]
        _check(rank <= min(hidden, ffn),
               f"--moe-ders-rank {rank} exceeds the expert FFN: min(--hidden-size {hidden}, "
               f"--moe-ffn-hidden-size {ffn}) = {min(hidden, ffn)}")
    if kind == "sparse":
        drop = args.moe_ders_drop_rate
        drop = drop if drop is not None else DELTA_DEFAULTS["drop_rate"]
        try:
            SparseDeltaConfig(drop_rate=drop).kept(min(hidden, ffn), max(hidden, ffn))
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


def _check_placement(args) -> None:
    """Where the shared base can live (ders_megatron/parallel.py placement table)."""
    tp = args.tensor_model_parallel_size
    etp = args.expert_tensor_parallel_size or tp  # Megatron's default (arguments.py:569)
    _check(etp in (1, tp),
           f"--expert-tensor-parallel-size {etp} must be 1 or --tensor-model-parallel-size "
           f"({tp}): the shared base is sharded like the dense layers")
    _check(tp == 1 or args.sequence_parallel,
           f"--tensor-model-parallel-size {tp} with MoE needs --sequence-parallel "
           "(transformer/moe/moe_layer.py:630)")


def _check_shared_expert(args) -> None:
    if not args.moe_ders_shared_expert:
        return
    size = args.moe_shared_expert_intermediate_size
    _check(size is not None,
           "--moe-ders-shared-expert needs --moe-shared-expert-intermediate-size (the shared "
           "expert it turns into base + delta)")
    _check(size == _moe_ffn(args),
           f"--moe-ders-shared-expert shares the experts' base, so "
           f"--moe-shared-expert-intermediate-size ({size}) must equal --moe-ffn-hidden-size "
           f"({_moe_ffn(args)})")
    _check(not args.moe_shared_expert_overlap,
           "--moe-shared-expert-overlap is not supported with --moe-ders-shared-expert")
    _check(not args.add_bias_linear,
           "--moe-ders-shared-expert needs --disable-bias-linear (shared experts have no bias)")


def _check_ders_conflicts(args) -> None:
    _check(not args.moe_use_upcycling,
           "--moe-use-upcycling converts to megatron's SequentialMLP/TEGroupedMLP experts "
           "(upcycling_utils.py) and cannot build DeRS experts; drop it with --moe-ders")
    _check(not args.moe_grouped_gemm,
           "--moe-grouped-gemm selects megatron's grouped-GEMM experts, which --moe-ders "
           "replaces; drop one of them")
    if (args.moe_ders_impl or "dropin") == "fused":
        _check(importlib.util.find_spec("ders_megatron.fused") is not None,
               "--moe-ders-impl fused needs ders_megatron.fused, which is not installed")
        # The fused layer dispatches no tokens and keeps every delta on every rank.
        _check(args.expert_model_parallel_size == 1,
               f"--moe-ders-impl fused does not use expert parallelism: set "
               f"--expert-model-parallel-size 1 (got {args.expert_model_parallel_size}) or use "
               "--moe-ders-impl dropin")


# Flags whose effect the DeRS layer spec (ders_megatron/specs.py) does not build:
# rejected instead of silently ignored.
_UNSUPPORTED_MODEL_FLAGS = (
    ("spec", "--spec (this entry point builds its own layer spec)"),
    ("hybrid_layer_pattern", "--hybrid-layer-pattern (GPTModel only)"),
    ("multi_latent_attention", "--multi-latent-attention"),
    ("qk_layernorm", "--qk-layernorm"),
    ("experimental_attention_variant", "--experimental-attention-variant"),
    ("mtp_num_layers", "--mtp-num-layers"),
    ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path"),
    ("use_legacy_models", "--use-legacy-models"),
)


def _check_model_flags(args) -> None:
    for attr, flag in _UNSUPPORTED_MODEL_FLAGS:
        _check(not getattr(args, attr, None), f"{flag} is not supported by the DeRS model provider")


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
        from ders_megatron.runtime import CPU_MODE_HINT

        _check(cuda_available, CPU_MODE_HINT)


def validate_ders_args(args, cuda_available: bool | None = None) -> DeRSConfig | None:
    """Reject invalid DeRS/CPU flag combinations; return the DeRSConfig (or None).

    Runs on the raw parsed args, before Megatron's own ``validate_args``, so it
    computes Megatron's later defaults (FFN size, expert-TP) itself.
    """
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    _check_runtime(args, cuda_available)
    _check_model_flags(args)
    _check_megatron_preconditions(args)
    _check_flags_need_ders(args)
    ders = ders_config_from_args(args)
    if args.num_experts:
        _check_placement(args)
    if ders is None:
        return None
    _check_moe_shape(args)
    _check_shared_expert(args)
    _check_ders_conflicts(args)
    return ders


# --------------------------------------------------------------------------- #
# The 0.19.2 parse_and_validate_args flow with the DeRS steps
# --------------------------------------------------------------------------- #
def parse_ders_args(argv: list[str] | None = None, cuda_available: bool | None = None):
    """Megatron's ``parse_args`` + ``--cpu`` settings + :func:`validate_ders_args`.

    No side effects beyond parsing. ``argv`` replaces ``sys.argv[1:]`` (Megatron's
    ``parse_args``, ``arguments.py:116``, reads ``sys.argv``).
    """
    from megatron.training.arguments import parse_args

    saved = sys.argv
    if argv is not None:
        sys.argv = [saved[0], *argv]
    try:
        args = parse_args(extra_args_provider=add_ders_args)
    finally:
        sys.argv = saved
    apply_cpu_settings(args)
    # Not stored on args: Megatron pickles args into checkpoints, read back with
    # torch.load(weights_only=True); call ders_config_from_args(args) instead.
    validate_ders_args(args, cuda_available)
    return args


def validated_args(argv: list[str] | None = None, args_defaults: dict[str, Any] | None = None):
    """Parse, DeRS checks, ``--cpu`` runtime, Megatron's ``validate_args``; no globals set.

    ``parse_and_validate_args`` (``arguments.py:87-113``) minus its last step.
    """
    from megatron.training.arguments import validate_args

    from ders_megatron.runtime import select_runtime
    from ders_megatron.training_utils import patch_megatron_training

    args_defaults = args_defaults or {}
    args = parse_ders_args(argv)
    select_runtime(args.cpu)
    patch_megatron_training(cpu=args.cpu)  # validate_args needs it on CPU
    if args.use_checkpoint_args or args_defaults.get("use_checkpoint_args", False):
        from megatron.training.checkpointing import load_args_from_checkpoint

        if args.load is None and args.pretrained_checkpoint is None:
            raise DeRSArgumentError("--use-checkpoint-args needs --load or --pretrained-checkpoint")
        load_args_from_checkpoint(args, load_arg="pretrained_checkpoint")
        load_args_from_checkpoint(args)
        validate_ders_args(args)
    if args.yaml_cfg is not None:
        raise DeRSArgumentError("--yaml-cfg is not supported with the DeRS flags")
    validate_args(args, args_defaults)
    return args


def initialize_args(argv: list[str] | None = None, args_defaults: dict[str, Any] | None = None):
    """:func:`validated_args`, then ``set_global_variables`` (tokenizer, timers...).

    Returns the args, now Megatron's global args.
    """
    from megatron.training.global_vars import set_global_variables

    args = validated_args(argv, args_defaults)
    set_global_variables(args)
    return args
