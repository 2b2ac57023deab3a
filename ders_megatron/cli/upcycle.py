"""``tools/upcycle.py`` (``ders-upcycle``): a dense megatron checkpoint -> a DeRS or
vanilla MoE checkpoint, over :func:`ders_megatron.convert.upcycle.upcycle_checkpoint`."""

from __future__ import annotations

import argparse

from ders_megatron.cli.flags import (
    add_debug_flag,
    add_impl_flag,
    add_kind_flags,
    add_seed_flag,
    add_shared_expert_flag,
    add_trust_flag,
    kind_values,
    parse_moe_layer_freq,
)
from ders_megatron.convert.upcycle import KINDS, SHARED_INITS, UpcycleConfig, upcycle_checkpoint
from ders_megatron.io.atomic import write_text_atomic
from ders_megatron.io.errors import report_failure, user_failures
from ders_megatron.io.safe_load import trust_checkpoints


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="upcycle",
        description="Upcycle a dense megatron-core torch_dist checkpoint (any TP/PP layout) into a "
        "DeRS or vanilla MoE release checkpoint that the training script loads with --load. "
        "Streams tensor by tensor; the output is layout-free (loads at any TP/EP/PP).",
    )
    p.add_argument("--load", required=True, metavar="DIR", help="dense checkpoint root (with its tracker file)")
    p.add_argument("--save", required=True, metavar="DIR", help="output checkpoint root (must not exist)")
    p.add_argument("--force", action="store_true", help="replace an existing --save directory")
    add_trust_flag(p)
    add_debug_flag(p)
    add_kind_flags(p, kinds=KINDS)
    p.add_argument("--num-experts", type=int, required=True)
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--moe-layer-freq", type=parse_moe_layer_freq, default=1,
                   help="1 = every layer MoE, 2 = every other layer, or a list such as '[1,0]*6'")
    p.add_argument("--moe-ders-alpha", type=float, default=None, help="lowrank: scale alpha/rank")
    add_seed_flag(p, "seed of delta init, sparse positions and router init")
    add_impl_flag(p)
    p.add_argument("--moe-ders-freeze-base", action="store_true", help="stored in the checkpoint args for training")
    add_shared_expert_flag(p, help_text="full: a copy of the dense FFN")
    p.add_argument("--moe-shared-expert-gate", action="store_true",
                   help="sigmoid gate on the shared expert (initialised to zero: gate 1/2)")
    p.add_argument("--shared-expert-init", choices=SHARED_INITS, default="split",
                   help="split: fc2 of routed and shared experts scaled so the MoE equals the dense "
                   "model at step 0; copy: plain copies (output (1+gate)x the dense FFN)")
    p.add_argument("--router-init-std", type=float, default=None,
                   help="router weights ~ N(0, std^2) (default: the checkpoint's --init-method-std)")
    p.add_argument("--no-renormalize-topk", dest="renormalize_topk", action="store_false",
                   help="softmax before top-k (moe_router_pre_softmax): top-k probabilities sum to < 1, "
                   "so the MoE does NOT equal the dense model at step 0")
    p.add_argument("--moe-token-dispatcher-type", default=None, choices=("alltoall", "allgather", "flex"))
    p.add_argument("--transformer-impl", default=None, choices=("local", "transformer_engine"),
                   help="spec of the MoE model (its checkpoint keys); default: the dense checkpoint's")
    p.add_argument("--target-tp", type=int, default=None, help="check divisibility for this TP")
    p.add_argument("--target-ep", type=int, default=None, help="check --num-experts divisibility for this EP")
    p.add_argument("--target-etp", type=int, default=None, help="check expert-TP for DeRS (1 or --target-tp)")
    p.add_argument("--file-bytes", type=int, default=None, help="max bytes per output file (bounds memory)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the summary as JSON")
    return p


def config_from_cli(ns) -> UpcycleConfig:
    return UpcycleConfig(
        kind=ns.moe_ders, num_experts=ns.num_experts, topk=ns.moe_router_topk,
        moe_layer_freq=tuple(ns.moe_layer_freq) if isinstance(ns.moe_layer_freq, list) else ns.moe_layer_freq,
        **kind_values(ns), alpha=ns.moe_ders_alpha,
        seed=ns.moe_ders_seed, shared_expert=ns.moe_ders_shared_expert, shared_expert_gate=ns.moe_shared_expert_gate,
        shared_expert_init=ns.shared_expert_init, router_init_std=ns.router_init_std,
        renormalize_topk=ns.renormalize_topk, freeze_base=ns.moe_ders_freeze_base, impl=ns.moe_ders_impl,
        token_dispatcher=ns.moe_token_dispatcher_type, target_tp=ns.target_tp, target_ep=ns.target_ep,
        target_etp=ns.target_etp,
    )


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None) -> int:
    import json

    ns = build_parser().parse_args(argv)
    try:
        cfg = config_from_cli(ns)
        with trust_checkpoints(ns.trust_checkpoint):
            summary = upcycle_checkpoint(ns.load, ns.save, cfg, force=ns.force,
                                         transformer_impl=ns.transformer_impl, file_bytes=ns.file_bytes)
        summary["peak_rss_bytes"] = peak_rss_bytes()
        if ns.json:
            write_text_atomic(ns.json, json.dumps(summary, indent=2) + "\n")
    except user_failures() as err:
        return report_failure("upcycle", err, ns.debug)
    print(
        f"upcycled {ns.load} -> {ns.save} ({cfg.kind}, {cfg.num_experts} experts): "
        f"{summary['dense_bytes'] / 2**20:.1f} MiB dense -> {summary['moe_bytes'] / 2**20:.1f} MiB MoE, "
        f"{summary['tensors']} tensor chunks, {summary['seconds']:.1f} s, "
        f"peak RSS {summary['peak_rss_bytes'] / 2**20:.0f} MiB"
    )
    return 0
