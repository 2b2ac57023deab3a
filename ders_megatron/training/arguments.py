"""``--moe-ders*`` and ``--cpu`` for Megatron-LM's own argument parser.

megatron-core 0.19.2 ships ``megatron.training``, whose ``parse_and_validate_args``
(``training/arguments.py:87``) is: parse (Megatron's flags plus an
``extra_args_provider``), validate, ``set_global_variables`` (builds the tokenizer).
:func:`initialize_args` is that flow with two steps put in right after parsing,
so a bad combination fails before any work (tokenizer, process groups, data):

1. ``--cpu`` fills in the settings a CPU/gloo run needs (:data:`CPU_SETTINGS`);
2. :func:`ders_megatron.core.config.validate_ders_args` rejects what DeRS cannot
   run, naming the flags; with ``--load``, the checkpoint is read through the
   allow-lists of :mod:`ders_megatron.io.safe_load` before megatron reads it
   (:func:`check_load_is_data`; ``--trust-checkpoint`` opts out) and the DeRS
   settings stored in it are compared with the flags (:func:`check_load_matches_flags`).

The flags' values, defaults and their mapping to a
:class:`~ders_megatron.core.config.DeRSConfig` live in :mod:`ders_megatron.core.config`
(``ders_config_from_args``); this module only declares them to argparse.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ders_megatron.io.checkpoint import CheckpointError, stored_args
from ders_megatron.core.config import (
    TRUST_FLAG,
    CODECS,
    DEFAULTS,
    IMPLS,
    KINDS,
    QK_LAYERNORM_WIDTH_FLAG,
    QK_LAYERNORM_WIDTHS,
    SHARED_EXPERTS,
    DeRSArgumentError,
    DeRSConfig,
    mismatched_ders_flags,
    validate_ders_args,
)
from ders_megatron.io.safe_load import trust_checkpoints, vet_checkpoint, vet_legacy_checkpoint

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


# --------------------------------------------------------------------------- #
# Parser
# --------------------------------------------------------------------------- #
def add_ders_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron's ``extra_args_provider`` hook: adds the DeRS and CPU flags."""
    group = parser.add_argument_group(title="DeRS experts (ders-megatron)")
    group.add_argument("--moe-ders", choices=KINDS, default=DEFAULTS["kind"],
                       help="Experts: vanilla (megatron's own, N full copies), or one shared base + a "
                       "light delta each: lowrank (DeRS-LM), sparse (DeRS-SM), dense, or codec "
                       "(compressed deltas from tools/compress.py).")
    group.add_argument("--moe-ders-codecs", default=None, metavar="SPEC",
                       help="codec: the compressed deltas, per matrix (e.g. 'quant:4' or "
                       f"'fc1:quant:4,fc2:magnitude:0.9'; codecs {', '.join(CODECS)}); "
                       "tools/compress.py writes it into the checkpoint args.")
    group.add_argument("--moe-ders-quant-group-size", type=int, default=None,
                       help=f"codec with quant:K: values per quantization group (default {DEFAULTS['quant_group_size']}).")
    group.add_argument("--moe-ders-rank", type=int, default=None,
                       help=f"lowrank: rank of each expert's delta (default {DEFAULTS['rank']}).")
    group.add_argument("--moe-ders-alpha", type=float, default=None,
                       help="lowrank: scale deltas by alpha/rank (default: no scaling).")
    group.add_argument("--moe-ders-drop-rate", type=float, default=None,
                       help=f"sparse: fraction p of zero entries, density 1-p (default {DEFAULTS['drop_rate']}).")
    group.add_argument("--moe-ders-seed", type=int, default=None,
                       help="Seed of the base/delta init and sparse positions (default: --seed).")
    group.add_argument("--moe-ders-impl", choices=IMPLS, default=None,
                       help=f"dropin: megatron's MoELayer with DeRS experts (default {DEFAULTS['impl']}); "
                       "fused: base GEMM shared across experts (ders_megatron.layers.fused).")
    group.add_argument("--moe-ders-shared-bias", dest="moe_ders_expert_bias", action="store_false",
                       help="with --add-bias-linear: the experts share the base's one bias, as checkpoints "
                       "written before per-expert biases (default: every expert owns its fc1/fc2 bias, as "
                       "the DeRS paper counts them)")
    group.add_argument("--moe-ders-freeze-base", action="store_true",
                       help="Train the deltas only: the shared base stays as loaded.")
    group.add_argument("--moe-ders-shared-expert", choices=SHARED_EXPERTS, default=None,
                       help="The shared expert: none, full (megatron's SharedExpertMLP) or ders (extended "
                       "DeRS: the experts' base plus its own delta); its size is "
                       "--moe-shared-expert-intermediate-size. Default: full when that size is given, "
                       "else none.")
    group.add_argument("--moe-ders-upcycle-from", default=None, metavar="DIR",
                       help="Upcycle at start: build the MoE at this run's TP/PP/EP layout and fill each "
                       "rank's shard from this dense checkpoint (tools/upcycle.py's rules), then train "
                       "from iteration 0. Skipped when --load holds a checkpoint to resume.")
    group.add_argument(QK_LAYERNORM_WIDTH_FLAG, choices=QK_LAYERNORM_WIDTHS, default=None,
                       help="With --qk-layernorm: head normalizes each attention head on its own "
                       "(megatron-core's, Qwen3; the default); full normalizes the whole projected q and "
                       "the whole projected k at once (OLMoE's q_norm / k_norm), local spec only.")
    group.add_argument("--ders-loss-log", default=None, metavar="FILE",
                       help="Append each training iteration's LM loss at full precision as a "
                       "JSON line (rank 0 writes).")
    group.add_argument(TRUST_FLAG, action="store_true",
                       help="Read --load / --pretrained-checkpoint without the allow-list of what a "
                       "checkpoint may hold: its pickles can then run code on this machine (a warning "
                       "says so). Only for checkpoints you made or whose source you trust.")
    group = parser.add_argument_group(title="CPU runtime (ders-megatron)")
    group.add_argument("--cpu", action="store_true",
                       help="Run megatron-core on CPU with gloo (ders_megatron.layers.runtime); implies "
                       + ", ".join(flag for *_, flag in CPU_SETTINGS) + ".")
    return parser


def ders_flags() -> tuple[str, ...]:
    """The option strings :func:`add_ders_args` adds (the frozen CLI surface)."""
    parser = add_ders_args(argparse.ArgumentParser(add_help=False))
    return tuple(sorted(o for a in parser._actions for o in a.option_strings))


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


def check_ders_args(args, cuda_available: bool | None = None, own_data_provider: bool = True) -> DeRSConfig | None:
    """:func:`ders_megatron.core.config.validate_ders_args` with this machine's CUDA."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return validate_ders_args(args, cuda_available, own_data_provider)


def check_args_parsed_by_megatron(args) -> None:
    """The checks :func:`validated_args` runs, for args that came through Megatron-LM's own
    ``parse_and_validate_args(extra_args_provider=add_ders_args)`` (a user's
    ``pretrain_gpt.py``, README "DeRS in your own pretrain_gpt.py"). Run by the model
    provider before it builds anything and before megatron reads ``--load``
    (``setup_model_and_optimizer`` loads after ``get_model``)."""
    if args.cpu:
        raise DeRSArgumentError("--cpu needs examples/pretrain_gpt_ders.py (it sets the CPU runtime up "
                                "before Megatron validates the flags); Megatron-LM's pretrain_gpt.py runs on GPUs")
    check_ders_args(args, own_data_provider=False)  # its own dataset provider honours --sft, --fim-data
    with trust_checkpoints(args.trust_checkpoint):
        check_load_is_data(args)
        check_load_matches_flags(args)
        check_upcycle_source(args)


def check_upcycle_source(args) -> None:
    """``--moe-ders-upcycle-from``: a complete dense checkpoint with its args, before any work.

    Reads the common state only: torch.distributed is not initialised yet, and must not be
    (a process group made here would be the world megatron then finds). The tensors are
    checked against the args when the model is built (``read_dense_args``)."""
    source = getattr(args, "moe_ders_upcycle_from", None)
    if source is None:
        return
    try:
        dense_args = stored_args(source)
    except (CheckpointError, OSError) as err:
        raise DeRSArgumentError(f"--moe-ders-upcycle-from {source}: {err}") from err
    if dense_args is None:
        raise DeRSArgumentError(f"--moe-ders-upcycle-from {source}: no complete checkpoint with args there "
                                "(latest_checkpointed_iteration.txt and the directory it names)")
    if getattr(dense_args, "num_experts", None):
        raise DeRSArgumentError(f"--moe-ders-upcycle-from {source} is already a MoE checkpoint "
                                f"(--num-experts {dense_args.num_experts}); upcycling starts from a dense one")


def check_load_is_data(args) -> None:
    """Read every pickle of the checkpoints ``--load`` and ``--pretrained-checkpoint``
    name through the allow-lists (:func:`ders_megatron.io.safe_load.vet_checkpoint`)
    before megatron.training reads them: it reads the common state and builds its
    load strategy itself (``training/checkpointing.py:1562,1575``), with no seam for a
    safe reader. Inside ``trust_checkpoints`` (``--trust-checkpoint``) nothing is checked.
    The legacy ``--ckpt-format torch`` files are scanned for what ``weights_only`` would
    refuse (:func:`~ders_megatron.io.safe_load.vet_legacy_checkpoint`): megatron would
    refuse it too, but with exit status 0.
    """
    from ders_megatron.training.utils import checkpoint_to_resume

    legacy = args.ckpt_format == "torch"
    roots = [(args.pretrained_checkpoint, None)]
    if args.non_persistent_ckpt_type != "local":
        roots.append((args.load, getattr(args, "ckpt_step", None)))
    for root, step in roots:
        found = checkpoint_to_resume(root, not legacy, step) if root is not None else None
        if found is not None:
            (vet_legacy_checkpoint if legacy else vet_checkpoint)(found[1])


def check_load_matches_flags(args) -> None:
    """With ``--load`` of a checkpoint that holds args (Megatron-LM and our tools save
    them), refuse flags that would build another DeRS model than the one stored, naming
    each flag, before any work. ``--use-checkpoint-args`` takes them from the checkpoint
    instead (Megatron's ``load_args_from_checkpoint``, ``training/checkpointing.py``).
    """
    for root in (args.load, getattr(args, "pretrained_checkpoint", None)):
        if root is None:
            continue
        stored = stored_args(root)
        if stored is None or not getattr(stored, "num_experts", None):
            continue
        differing = mismatched_ders_flags(args, stored)
        if differing:
            raise DeRSArgumentError(
                f"{root} holds another DeRS model than these flags build; set them as the checkpoint "
                "has them (or pass --use-checkpoint-args):\n  " + "\n  ".join(differing)
            )


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
    # torch.load(weights_only=True); call config.ders_config_from_args(args) instead.
    check_ders_args(args, cuda_available)
    return args


def validated_args(argv: list[str] | None = None, args_defaults: dict[str, Any] | None = None):
    """Parse, DeRS checks, ``--cpu`` runtime, Megatron's ``validate_args``; no globals set.

    ``parse_and_validate_args`` (``arguments.py:87-113``) minus its last step.
    """
    from megatron.training.arguments import validate_args

    from ders_megatron.layers.runtime import select_runtime
    from ders_megatron.training.utils import patch_megatron_training

    args_defaults = args_defaults or {}
    args = parse_ders_args(argv)
    select_runtime(args.cpu)
    patch_megatron_training(cpu=args.cpu)  # validate_args needs it on CPU
    with trust_checkpoints(args.trust_checkpoint):  # --trust-checkpoint: says so, loudly
        check_load_is_data(args)  # before megatron reads the checkpoint (load_args_from_checkpoint)
        if args.use_checkpoint_args or args_defaults.get("use_checkpoint_args", False):
            from megatron.training.checkpointing import load_args_from_checkpoint

            if args.load is None and args.pretrained_checkpoint is None:
                raise DeRSArgumentError("--use-checkpoint-args needs --load or --pretrained-checkpoint")
            load_args_from_checkpoint(args, load_arg="pretrained_checkpoint")
            load_args_from_checkpoint(args)
            check_ders_args(args)
        check_load_matches_flags(args)
        check_upcycle_source(args)  # reads the dense checkpoint's common state: vetted too
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
