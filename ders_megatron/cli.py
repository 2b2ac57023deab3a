"""Command-line entry points: thin argparse mains over importable functions.

Importing this module loads only the standard library and
:mod:`ders_megatron.accounting`. A main that needs torch or megatron-core
imports it inside the function, so ``param_report`` answers on a machine
without them and stays fast.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
from pathlib import Path

from ders_megatron.accounting import (
    DELTA_KINDS,
    DTYPE_BYTES,
    PAPER_MODELS,
    SHARED_EXPERT_KINDS,
    AccountingReport,
    DeltaSpec,
    MoEShape,
    added_parameters,
    comparison_variants,
)

# ---------------------------------------------------------------------------
# param_report: DeRS paper parameter accounting (tools/param_report.py)
# ---------------------------------------------------------------------------

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
    p.add_argument("--moe-shared-expert", choices=SHARED_EXPERT_KINDS,
                   help="none; full = a universal FFN copy; ders = shared expert is base + delta")
    p.add_argument("--moe-router-noisy-gate", action="store_const", const=True,
                   help="(not a Megatron flag) router has a second hidden x experts noise "
                   "projection, as LLaMA-MoE/XFT's Coder-MoE")


def _add_delta_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--moe-ders", choices=DELTA_KINDS, default="vanilla",
                   help="how experts are stored (default vanilla upcycling)")
    p.add_argument("--moe-ders-rank", type=int, help="rank r for --moe-ders lowrank")
    p.add_argument("--moe-ders-drop-rate", type=float, help="drop rate p for --moe-ders sparse")
    p.add_argument("--compare", action="store_true",
                   help="instead of --moe-ders, print vanilla, lowrank r=1/4/16 and sparse "
                   "p=0.9/0.99/0.9999 side by side")


_SHAPE_ARGS = {  # MoEShape field <- argparse dest
    "hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
    "moe_ffn_hidden_size": "moe_ffn_hidden_size", "num_layers": "num_layers",
    "moe_layer_freq": "moe_layer_freq", "num_experts": "num_experts",
    "topk": "moe_router_topk", "gated": "swiglu", "bias": "bias",
    "shared_expert": "moe_shared_expert", "noisy_gate": "moe_router_noisy_gate",
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


def deltas_from_args(args: argparse.Namespace) -> tuple[DeltaSpec, ...]:
    if args.compare:
        return comparison_variants()
    rank, drop_rate = args.moe_ders_rank, args.moe_ders_drop_rate
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
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


# ---------------------------------------------------------------------------
# bench_moe_layer: MoE layer benchmark (tools/bench_moe_layer.py)
#
# Import torch and megatron-core inside the function, never at module level
# (see module doc).
# ---------------------------------------------------------------------------


def build_bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_moe_layer",
        description="Forward+backward time, peak memory and parameters of one MoE layer: the dense "
        "MLP it came from, megatron-core's MoE (SequentialMLP; GroupedMLP where TE runs), DeRS "
        "drop-in experts and the fused DeRS layer, on the same tokens and routing. SwiGLU; "
        "ratios to the dense MLP. CPU (gloo, 1 rank) unless CUDA is present.",
    )
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--ffn-hidden-size", type=int, default=4096, help="dense FFN = each expert's FFN")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank (sequence, batch 1)")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--topk", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--ranks", type=int, nargs="*", default=[1, 4, 16], help="DeRS-LM ranks (none: skip)")
    p.add_argument("--drop-rates", type=float, nargs="*", default=[0.9, 0.99, 0.9999],
                   help="DeRS-SM drop rates (none: skip)")
    p.add_argument("--impls", nargs="*", default=["dropin", "fused"], choices=["dropin", "fused", "dropin-unfused"],
                   help="dropin-unfused: the drop-in layer without the low-rank SwiGLU kernel "
                   "(DeRSExperts.forward_unfused, per-expert delta temporaries; low-rank only)")
    p.add_argument("--baselines", nargs="*", default=["sequential", "grouped"],
                   choices=["sequential", "grouped"], help="the dense MLP always runs")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--token-tile", type=int, default=None,
                   help="(token, slot) pairs per tile of the fused kernel on CPU (default: by FFN width)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--json", metavar="PATH", help="also write every figure as JSON here")
    return p


def bench_moe_layer_main(argv: list[str] | None = None) -> int:
    """Run the MoE layer benchmark; print a markdown table per top-k, optionally write --json."""
    import shlex
    import sys

    from ders_megatron import bench

    parser = build_bench_parser()
    args = parser.parse_args(argv)
    try:
        shape = bench.BenchShape(hidden=args.hidden_size, ffn=args.ffn_hidden_size, tokens=args.tokens,
                                 experts=args.num_experts, dtype=args.dtype)
    except ValueError as err:
        parser.error(str(err))
    variant_list = bench.variants(args.baselines, args.impls, args.ranks, args.drop_rates)
    command = "ders-bench-moe-layer " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"{bench.machine_description()}\nshape: {shape}")
    results = []
    with bench.bench_process_group():
        print(bench.memory_method())
        for topk in args.topk:
            rows = bench.run_topk(shape, topk, variant_list, args.warmup, args.repeats,
                                  memory=not args.no_memory, token_tile=args.token_tile)
            print(bench.format_table(rows), flush=True)
            results += rows
    if args.json:
        payload = bench.results_payload(shape, results, command)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
