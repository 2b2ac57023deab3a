"""``tools/bench_moe_layer.py`` (``ders-bench-moe-layer``): the MoE layer benchmark
(:mod:`ders_megatron.convert.bench`), a markdown table per top-k.

torch and megatron-core are imported inside the main, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json

from ders_megatron.cli.flags import add_debug_flag
from ders_megatron.io.atomic import write_text_atomic
from ders_megatron.io.errors import report_failure, user_failures

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
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                   help="one table per dtype and --topk, each with its own dense MLP for the ratios")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--token-tile", type=int, default=None,
                   help="(token, slot) pairs per tile of the fused kernel on CPU (default: by FFN width)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--kernel-only", action="store_true",
                   help="only the sparse-delta kernels vs the dense products they replace, per matrix, "
                   "on one expert's rows (tokens·topk/experts) for each --drop-rates and --topk")
    p.add_argument("--json", metavar="PATH", help="also write every figure as JSON here")
    add_debug_flag(p)
    return p


def bench_moe_layer_main(argv: list[str] | None = None) -> int:
    """Run the MoE layer benchmark; print a markdown table per top-k, optionally write --json."""
    import shlex
    import sys

    from ders_megatron.convert import bench

    parser = build_bench_parser()
    args = parser.parse_args(argv)
    try:
        shapes = [bench.BenchShape(hidden=args.hidden_size, ffn=args.ffn_hidden_size, tokens=args.tokens,
                                   experts=args.num_experts, dtype=dtype) for dtype in dict.fromkeys(args.dtype)]
    except ValueError as err:
        parser.error(str(err))
    command = "ders-bench-moe-layer " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"{bench.machine_description()}\nshape: {shapes[0]}, dtypes: {[s.dtype for s in shapes]}")
    if args.kernel_only:
        return _kernel_only(bench, shapes, args, command)
    variant_list = bench.variants(args.baselines, args.impls, args.ranks, args.drop_rates)
    results = []
    with bench.bench_process_group():
        print(bench.memory_method())
        for shape in shapes:
            for topk in args.topk:
                rows = bench.run_topk(shape, topk, variant_list, args.warmup, args.repeats,
                                      memory=not args.no_memory, token_tile=args.token_tile)
                print(bench.format_table(rows), flush=True)
                results += rows
    if args.json:
        payload = bench.results_payload(shapes[0], results, command)
        try:
            write_text_atomic(args.json, json.dumps(payload, indent=2) + "\n")
        except user_failures() as err:
            return report_failure("bench_moe_layer", err, args.debug)
        print(f"wrote {args.json}")
    return 0


def _kernel_only(bench, shapes, args, command: str) -> int:
    rows = []
    for shape in shapes:
        print(f"dtype {shape.dtype}\n{bench.KERNEL_HEAD}")
        for topk in args.topk:
            rows += [dict(row, dtype=shape.dtype)
                     for row in bench.kernel_microbench(shape, topk, args.drop_rates, repeats=args.repeats)]
    if args.json:
        payload = {"shape": shapes[0].__dict__, "dtypes": [s.dtype for s in shapes], "machine": bench.machine_description(), "command": command,
                   "kernel": rows}
        write_text_atomic(args.json, json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
