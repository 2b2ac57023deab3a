"""``tools/bench_memory.py``: peak memory of the streamed import, export and upcycling
against the largest layer, on a synthetic model of random weights
(:mod:`ders_megatron.convert.memory_bench`); a markdown table, optionally JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-layers", type=int, default=20)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--ffn-hidden-size", type=int, default=5632)
    p.add_argument("--num-attention-heads", type=int, default=16)
    p.add_argument("--num-key-value-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--steps", nargs="+", default=["import", "export", "upcycle"],
                   choices=["import", "export", "upcycle", "reference"],
                   help="reference: the in-memory float32 import the streamed one replaced")
    p.add_argument("--export-max-shard-size", default="5GB", help="export's --max-shard-size")
    p.add_argument("--upcycle-file-bytes", type=int, default=None, help="upcycle's --file-bytes (default: its own)")
    p.add_argument("--overhead-mib", type=float, default=128, help="the bound's fixed part: 3 x layer + this")
    p.add_argument("--workdir", default=None, help="where the model and outputs go (default: a temporary folder)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    return p


def main(argv=None) -> int:
    from ders_megatron.convert.memory_bench import SyntheticModel, format_table, measure, temporary_workdir

    ns = build_parser().parse_args(argv)
    model = SyntheticModel(num_layers=ns.num_layers, hidden_size=ns.hidden_size, ffn_hidden_size=ns.ffn_hidden_size,
                           num_attention_heads=ns.num_attention_heads, num_key_value_heads=ns.num_key_value_heads,
                           vocab_size=ns.vocab_size, dtype=ns.dtype)
    with temporary_workdir() as tmp:
        report = measure(model, ns.workdir or tmp, steps=tuple(ns.steps), export_shard=ns.export_max_shard_size,
                         upcycle_file_bytes=ns.upcycle_file_bytes)
    print(format_table(report, ns.overhead_mib))
    if ns.json:
        Path(ns.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
