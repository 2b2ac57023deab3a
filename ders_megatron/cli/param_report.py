"""``tools/param_report.py`` (``ders-param-report``): the paper's parameter accounting.

Importing this module loads only the standard library and
:mod:`ders_megatron.core` (accounting and config): it answers without building a
model, and stays fast.
"""

from __future__ import annotations

import argparse
import json
import math

from ders_megatron.cli.flags import (
    add_debug_flag,
    add_kind_flags,
    add_shared_expert_flag,
    kind_values,
    parse_moe_layer_freq,
)
from ders_megatron.core.accounting import (
    DELTA_KINDS,
    DTYPE_BYTES,
    PAPER_MODELS,
    AccountingReport,
    DeltaSpec,
    MoEShape,
    QuantSpec,
    added_parameters,
    comparison_variants,
    quant_variants,
)
from ders_megatron.core.config import DEFAULTS
from ders_megatron.io.atomic import write_text_atomic
from ders_megatron.io.errors import report_failure, user_failures


def build_param_report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="param_report",
        description="Added parameters of an upcycled MoE over its dense model, counted as in "
        "the DeRS paper (Tables 1-4): vanilla copies vs DeRS deltas, router included.",
    )
    p.add_argument("--preset", choices=sorted(PAPER_MODELS), help="a model from the paper; "
                   "the dim flags below override its fields")
    _add_shape_flags(p)
    _add_delta_flags(p)
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16",
                   help="storage dtype for the byte columns (default bf16)")
    p.add_argument("--json", metavar="PATH", help="also write the reports as JSON here")
    add_debug_flag(p)
    return p


def _add_shape_flags(p: argparse.ArgumentParser) -> None:
    """Megatron's flag names; default None so a --preset can fill what is not given."""
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--ffn-hidden-size", type=int, help="the dense FFN size")
    p.add_argument("--moe-ffn-hidden-size", type=int, help="expert FFN size (default: dense)")
    p.add_argument("--num-layers", type=int)
    p.add_argument("--moe-layer-freq", type=parse_moe_layer_freq,
                   help="int N (every Nth layer is MoE, default 1) or a 0/1 list per layer")
    p.add_argument("--num-experts", type=int)
    p.add_argument("--moe-router-topk", type=int, help="default 2")
    p.add_argument("--swiglu", action="store_const", const=True, help="gated fc1 (gate, up)")
    bias = p.add_mutually_exclusive_group()
    bias.add_argument("--add-bias-linear", dest="bias", action="store_const", const=True)
    bias.add_argument("--disable-bias-linear", dest="bias", action="store_const", const=False,
                      help="(default)")
    add_shared_expert_flag(p, default=None, help_text="full: a universal FFN copy")
    p.add_argument("--moe-router-noisy-gate", action="store_const", const=True,
                   help="(not a Megatron flag) router has a second hidden x experts noise "
                   "projection, as LLaMA-MoE/XFT's Coder-MoE")


def _add_delta_flags(p: argparse.ArgumentParser) -> None:
    add_kind_flags(p, kinds=DELTA_KINDS)
    p.add_argument("--compare", action="store_true",
                   help="instead of --moe-ders, print vanilla, lowrank r=1/4/16, sparse "
                   "p=0.9/0.99/0.9999 and DeRS-Quantization 8/4/2/1-bit (paper Tables S12-S18: "
                   "as the paper counts, and with the per-group scales tools/compress.py stores) side by side")
    p.add_argument("--moe-ders-quant-group-size", type=int, default=DEFAULTS["quant_group_size"],
                   help="quantized rows of --compare: values per fp32 scale (default "
                   f"{DEFAULTS['quant_group_size']})")


_SHAPE_ARGS = {  # MoEShape field <- argparse dest
    "hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
    "moe_ffn_hidden_size": "moe_ffn_hidden_size", "num_layers": "num_layers",
    "moe_layer_freq": "moe_layer_freq", "num_experts": "num_experts",
    "topk": "moe_router_topk", "gated": "swiglu", "bias": "bias",
    "shared_expert": "moe_ders_shared_expert", "noisy_gate": "moe_router_noisy_gate",
}
_REQUIRED = {"hidden_size": "--hidden-size", "ffn_hidden_size": "--ffn-hidden-size",
             "num_layers": "--num-layers", "num_experts": "--num-experts"}


def shape_from_args(args: argparse.Namespace) -> MoEShape:
    """Preset fields first, then every flag the user gave; ValueError names a missing flag."""
    fields = PAPER_MODELS[args.preset].to_dict() if args.preset else {}
    given = {f: getattr(args, d) for f, d in _SHAPE_ARGS.items() if getattr(args, d) is not None}
    fields.update(given)
    if args.preset and args.ffn_hidden_size is not None and args.moe_ffn_hidden_size is None:
        fields["moe_ffn_hidden_size"] = args.ffn_hidden_size  # don't keep the preset's expert size
    missing = [flag for f, flag in _REQUIRED.items() if f not in fields]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or pick a --preset)")
    return MoEShape(**fields)


def deltas_from_args(args: argparse.Namespace) -> tuple[DeltaSpec | QuantSpec, ...]:
    if args.compare:
        return comparison_variants() + quant_variants(group_size=args.moe_ders_quant_group_size,
                                                      dtype_bytes=DTYPE_BYTES[args.dtype])
    values = kind_values(args)
    rank = args.moe_ders_rank if args.moe_ders != "lowrank" else values["rank"]
    drop_rate = args.moe_ders_drop_rate if args.moe_ders != "sparse" else values["drop_rate"]
    return (DeltaSpec(kind=args.moe_ders, rank=rank, drop_rate=drop_rate),)


def _format_scaled(x: float, units: tuple[str, ...], base: float) -> str:
    """Three significant digits with a unit suffix: 1.25B, 264K, 2.32 GiB."""
    i = 0
    while abs(x) >= base - 0.5 and i < len(units) - 1:
        x, i = x / base, i + 1
    if x == 0:
        return f"0{units[i]}"
    decimals = max(0, 2 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals if i else 0}f}{units[i]}"


def format_count(n: int) -> str:
    return _format_scaled(n, ("", "K", "M", "B", "T"), 1000.0)


def format_bytes(n: int) -> str:
    return _format_scaled(n, (" B", " KiB", " MiB", " GiB", " TiB"), 1024.0)


def _describe_shape(shape: MoEShape, dense_per_layer: int, layers: int) -> list[str]:
    ffn = f"FFN {shape.ffn_hidden_size}"
    if shape.moe_ffn_hidden_size != shape.ffn_hidden_size:
        ffn += f" (experts {shape.moe_ffn_hidden_size})"
    kind = ("SwiGLU" if shape.gated else "not gated") + (", bias" if shape.bias else ", no bias")
    router = format_count(shape.router_params) + (" (noisy gate)" if shape.noisy_gate else "")
    return [
        f"MoE layers: {layers} of {shape.num_layers} | hidden {shape.hidden_size}, {ffn}, {kind}",
        f"experts: {shape.num_experts}, top-{shape.topk} | shared expert: {shape.shared_expert} | "
        f"router per layer: {router}",
        f"dense FFN params in those layers: {format_count(dense_per_layer * layers)} "
        f"({format_count(dense_per_layer)} per layer)",
    ]


def _report_row(r: AccountingReport, vanilla: AccountingReport) -> list[str]:
    rest = r.routed_added_params
    ratio = vanilla.routed_added_params / rest if rest > 0 else math.nan
    univ = f"{format_count(r.universal_ffn_params)} + " if r.universal_ffn_params else ""
    return [
        r.label,
        univ + format_count(r.routed_added_params),
        format_count(r.added_params_per_layer),
        f"{ratio:,.0f}x" if ratio >= 10 else f"{ratio:.2f}x",
        format_bytes(r.added_bytes),
        format_bytes(r.sparse_seed_bytes) if r.delta.kind == "sparse" else "-",
        format_bytes(r.sparse_index_bytes) if r.delta.kind == "sparse" else "-",
        format_count(r.active_params_per_token),
    ]


def format_report_table(reports: list[AccountingReport], dtype: str = "bf16") -> str:
    """Shape summary, then one row per variant, paper style.

    A universal FFN is shown apart ("812M + 9.09M"), as the paper's light-gray
    numbers; 'reduction' = vanilla / this, universal FFN excluded, as its "2270x".
    """
    shape = reports[0].shape
    vanilla = added_parameters(shape, DeltaSpec(kind="vanilla"), dtype_bytes=reports[0].dtype_bytes)
    added = "added (univ. FFN + rest)" if shape.shared_expert == "full" else "added"
    header = ["variant", added, "added/layer", "reduction",
              f"added bytes ({dtype})", "seed bytes", "int32 index bytes", "active/token"]
    rows = [header] + [_report_row(r, vanilla) for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = _describe_shape(shape, reports[0].dense_ffn_params_per_layer, reports[0].num_moe_layers)
    lines.append("")
    for row in rows:  # label left-aligned, numbers right-aligned
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def param_report_main(argv: list[str] | None = None) -> int:
    """Print the accounting table for one variant (or --compare), optionally write --json."""
    parser = build_param_report_parser()
    args = parser.parse_args(argv)
    try:
        shape = shape_from_args(args)
        dtype_bytes = DTYPE_BYTES[args.dtype]
        deltas = deltas_from_args(args)
        reports = [added_parameters(shape, d, dtype_bytes=dtype_bytes) for d in deltas]
    except ValueError as err:
        parser.error(str(err))
    print(format_report_table(reports, args.dtype))
    if args.json:
        variants = [r.to_dict() for r in reports]
        payload = {"shape": shape.to_dict(), "dtype": args.dtype, "variants": variants}
        try:
            write_text_atomic(args.json, json.dumps(payload, indent=2) + "\n")
        except user_failures() as err:
            return report_failure("param_report", err, args.debug)
        print(f"\nwrote {args.json}")
    return 0
