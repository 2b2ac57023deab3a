"""``tools/analyze.py`` (``ders-analyze``): expert-similarity and compression-sweep plots,
over :mod:`ders_megatron.convert.analyze`."""

from __future__ import annotations

import argparse
import json

from ders_megatron.cli.flags import add_debug_flag, add_seed_flag, add_trust_flag
from ders_megatron.convert.analyze import expert_similarity, plot_similarity, plot_sweep, sweep
from ders_megatron.core.config import DEFAULTS
from ders_megatron.core.decomposition import BASES
from ders_megatron.io.atomic import write_text_atomic
from ders_megatron.io.errors import report_failure, user_failures
from ders_megatron.io.safe_load import trust_checkpoints


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="analyze", description="DeRS analysis plots (PNG) of a vanilla MoE checkpoint.")
    sub = p.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("similarity", help="cosine similarity of every expert to the dense FFN (paper Fig. 1)")
    sim.add_argument("--load", required=True, metavar="DIR", help="vanilla MoE checkpoint")
    sim.add_argument("--dense", default=None, metavar="DIR", help="dense checkpoint (default: compare to the expert mean)")
    sim.add_argument("--out", required=True, metavar="PNG")
    sim.add_argument("--json", default=None, metavar="FILE")
    add_trust_flag(sim)
    add_debug_flag(sim)
    sw = sub.add_parser("sweep", help="held-out loss against drop rate / bit width / rank (paper Figs. 4-6)")
    sw.add_argument("--load", required=True, metavar="DIR", help="vanilla MoE checkpoint")
    sw.add_argument("--sweep-codecs", required=True,
                    help="codecs to compare, comma-separated, e.g. dare:0.5,dare:0.9,dare:0.99")
    sw.add_argument("--base", choices=BASES, default=None,
                    help="dense (the default: needs --dense), mean or fisher (only when asked for); as tools/compress.py")
    sw.add_argument("--dense", default=None, metavar="DIR", help="the dense checkpoint the MoE was upcycled from")
    sw.add_argument("--eval-data", required=True, metavar="FILE")
    sw.add_argument("--calib-data", default=None, metavar="FILE")
    add_seed_flag(sw, "seed of DARE's kept positions")
    sw.add_argument("--moe-ders-quant-group-size", type=int, default=DEFAULTS["quant_group_size"])
    sw.add_argument("--seq-length", type=int, default=None)
    sw.add_argument("--eval-batches", type=int, default=16)
    sw.add_argument("--out", required=True, metavar="PNG")
    sw.add_argument("--json", default=None, metavar="FILE")
    add_trust_flag(sw)
    add_debug_flag(sw)
    return p


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        with trust_checkpoints(ns.trust_checkpoint):
            result = _analysis(ns)
        if ns.json:
            write_text_atomic(ns.json, json.dumps(result, indent=2) + "\n")
    except user_failures() as err:
        return report_failure("analyze", err, ns.debug)
    return 0


def _analysis(ns) -> dict:
    """The subcommand's computation and plot; returns what ``--json`` writes."""
    if ns.command == "similarity":
        result = expert_similarity(ns.load, ns.dense)
        plot_similarity(result, ns.out)
        low = min(v for rows in result["matrices"].values() for r in rows for v in r)
        print(f"expert vs {result['reference']} FFN cosine: min {low:.6f} over "
              f"{len(result['layers'])} MoE layers -> {ns.out}")
        return result
    result = sweep(ns.load, [c for c in ns.sweep_codecs.split(",") if c], base=ns.base, dense_root=ns.dense,
                   eval_data=ns.eval_data, calib_data=ns.calib_data, seed=ns.moe_ders_seed,
                   group_size=ns.moe_ders_quant_group_size, seq_length=ns.seq_length, eval_batches=ns.eval_batches)
    plot_sweep(result, ns.out)
    print(f"vanilla MoE held-out loss {result['baseline']['loss']:.4f}")
    for row in result["results"]:
        print(f"  {row['codec']:>14}: loss {row['loss']:.4f}")
    return result
