"""The flags every tool spells the same way (README "One vocabulary"): declared here
once, with the values and defaults of :mod:`ders_megatron.core.config`."""

from __future__ import annotations

import argparse
import ast

from ders_megatron.core.config import CODECS, DEFAULTS, IMPLS, KINDS, SHARED_EXPERTS, TRUST_FLAG, check_kind_flags


_FREQ_MAX_LAYERS = 100_000  # bound on list expressions such as "[1]*10**9"


def _repeat(seq, times):
    if not isinstance(seq, list) or type(times) is not int:
        raise ValueError("'*' must repeat a list by an integer")
    if len(seq) * times > _FREQ_MAX_LAYERS:
        raise ValueError(f"more than {_FREQ_MAX_LAYERS} layers")
    return seq * times


def _eval_freq(node: ast.AST):
    """Evaluate ints, lists, + and * only: Megatron eval()s this flag; we do not eval."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_eval_freq(e) for e in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        left, right = _eval_freq(node.left), _eval_freq(node.right)
        return _repeat(right, left) if isinstance(right, list) else _repeat(left, right)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _eval_freq(node.left) + _eval_freq(node.right)
    raise ValueError(f"unsupported element {type(node).__name__}")


def parse_moe_layer_freq(text: str) -> int | list[int]:
    """--moe-layer-freq as Megatron takes it: an int, or a list such as "([1]*3+[0])*6"."""
    try:
        value = _eval_freq(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} ({err})") from err
    if isinstance(value, int) or (isinstance(value, list) and all(type(v) is int for v in value)):
        return value
    raise argparse.ArgumentTypeError(f"want an int or a flat list of ints, got {text!r}")


def add_kind_flags(p: argparse.ArgumentParser, kinds=KINDS) -> None:
    """``--moe-ders`` and the per-kind flags, with the config's defaults."""
    p.add_argument("--moe-ders", choices=kinds, default=DEFAULTS["kind"],
                   help="experts: vanilla (megatron's own, N full copies) or a shared base + light "
                   f"deltas: {', '.join(k for k in kinds if k != 'vanilla')} (default {DEFAULTS['kind']})")
    p.add_argument("--moe-ders-rank", type=int, default=None,
                   help=f"lowrank: rank of each delta (default {DEFAULTS['rank']})")
    p.add_argument("--moe-ders-drop-rate", type=float, default=None,
                   help=f"sparse: fraction p of zeros, density 1-p (default {DEFAULTS['drop_rate']})")


def add_trust_flag(p: argparse.ArgumentParser) -> None:
    """``--trust-checkpoint``: the opt-out of :mod:`ders_megatron.io.safe_load`'s allow-lists."""
    p.add_argument(TRUST_FLAG, action="store_true",
                   help="read the checkpoints without the allow-list of what a checkpoint may hold: their "
                   "pickles can then run code on this machine (a warning says so). Only for files you "
                   "made or whose source you trust.")


def add_debug_flag(p: argparse.ArgumentParser) -> None:
    """``--debug``: a failure prints its traceback too (``io/errors.py``: one line otherwise)."""
    p.add_argument("--debug", action="store_true",
                   help="on error, print the traceback as well (default: one line naming the file and the problem)")


def add_seed_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--moe-ders-seed", type=int, default=DEFAULTS["seed"], help=f"{what} (default {DEFAULTS['seed']})")


def add_shared_expert_flag(p: argparse.ArgumentParser, choices=SHARED_EXPERTS, default=DEFAULTS["shared_expert"],
                           help_text: str = "") -> None:
    p.add_argument("--moe-ders-shared-expert", choices=choices, default=default,
                   help="the shared expert: none, full (a full FFN, megatron's shared expert) or ders "
                   f"(extended DeRS: the experts' base plus its own delta); default {default}. " + help_text)


def add_impl_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--moe-ders-impl", choices=IMPLS, default=None,
                   help=f"stored in the checkpoint args for training (default {DEFAULTS['impl']})")


def add_codec_flags(p: argparse.ArgumentParser, required: bool) -> None:
    """``--moe-ders-codecs`` and ``--moe-ders-quant-group-size``."""
    p.add_argument("--moe-ders-codecs", required=required, metavar="SPEC",
                   help=f"codecs {', '.join(CODECS)}: dare:P | magnitude:P | quant:K (K in 1,2,3,4,8) | svd:R | "
                   "wsvd:R, or per matrix: 'fc1:quant:4,fc2:svd:8' (fc1 covers gate and up)")
    p.add_argument("--moe-ders-quant-group-size", type=int, default=DEFAULTS["quant_group_size"],
                   help=f"quant:K: elements per quantization scale (default {DEFAULTS['quant_group_size']})")


def kind_values(ns) -> dict:
    """rank / drop rate from the parsed flags, the config's defaults where not given; a
    kind-only flag given with another kind is an error (``config.check_kind_flags``)."""
    check_kind_flags(ns.moe_ders, rank=ns.moe_ders_rank, alpha=getattr(ns, "moe_ders_alpha", None),
                     drop_rate=ns.moe_ders_drop_rate)
    return dict(
        rank=ns.moe_ders_rank if ns.moe_ders_rank is not None else DEFAULTS["rank"],
        drop_rate=ns.moe_ders_drop_rate if ns.moe_ders_drop_rate is not None else DEFAULTS["drop_rate"],
    )
