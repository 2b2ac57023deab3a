"""``tools/compress.py`` (``ders-compress``): a trained vanilla MoE checkpoint -> a DeRS
checkpoint of compressed deltas, over :func:`ders_megatron.convert.compress.pipeline.compress_checkpoint`;
``--load`` may also be a Hugging Face MoE folder (Mixtral, Qwen2-MoE), streamed through
:func:`ders_megatron.convert.compress.from_hf.compress_hf`, with ``--hf-output`` for a
``ders`` HF folder."""

from __future__ import annotations

import argparse

from ders_megatron.cli.flags import add_codec_flags, add_debug_flag, add_seed_flag, add_shared_expert_flag, add_trust_flag
from ders_megatron.convert.compress.pipeline import SHARED_MODES, CompressConfig, CompressError, compress_checkpoint
from ders_megatron.core.config import DEFAULTS
from ders_megatron.convert.compress.report import format_report
from ders_megatron.core.decomposition import BASES
from ders_megatron.io.atomic import write_text_atomic
from ders_megatron.io.errors import report_failure, user_failures
from ders_megatron.io.upcycle_state import SHARED_INITS
from ders_megatron.io.safe_load import trust_checkpoints


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compress",
        description="DeRS compression of a trained vanilla MoE megatron checkpoint: one shared base "
        "(the dense FFN, the expert mean, or a Fisher-weighted mean) plus compressed per-expert deltas.",
    )
    p.add_argument("--load", required=True, metavar="DIR",
                   help="trained vanilla MoE checkpoint root, or a Hugging Face MoE folder (Mixtral, Qwen2-MoE)")
    p.add_argument("--save", default=None, metavar="DIR", help="output DeRS checkpoint root")
    p.add_argument("--hf-output", default=None, metavar="DIR",
                   help="with a Hugging Face --load: also (or instead of --save) write a ders-format HF folder")
    p.add_argument("--force", action="store_true", help="replace an existing --save directory")
    add_trust_flag(p)
    add_debug_flag(p)
    add_codec_flags(p, required=True)
    p.add_argument("--base", choices=BASES, default=None,
                   help="dense (the default, the paper's base): the FFN the experts were upcycled from "
                   "(--dense); mean: expert mean; fisher: D2-MoE Fisher-weighted mean (--calib-data); "
                   "mean and fisher only when asked for")
    p.add_argument("--dense", default=None, metavar="DIR",
                   help="the dense checkpoint the MoE was upcycled from: the base (--base dense)")
    p.add_argument("--shared-expert-init", choices=SHARED_INITS, default=None,
                   help="--base dense: how tools/upcycle.py made the MoE's shared expert (split: routed and "
                   "shared fc2 scaled by 1/(1+gate), its default; copy: unscaled), hence the fc2 base; "
                   "default: read off the first MoE layer's weights")
    p.add_argument("--max-delta-norm", type=float, default=DEFAULTS["max_delta_norm"], metavar="R",
                   help="refuse, before writing, experts farther from the base than ||W_e - W_base|| / ||W_e|| "
                   f"= R (default {DEFAULTS['max_delta_norm']}: fine-tuned experts stay within a few percent "
                   "of their start, so a larger ratio means a wrong base)")
    add_seed_flag(p, "seed of DARE's kept positions")
    add_shared_expert_flag(p, choices=SHARED_MODES, default="full",
                           help_text="full keeps the checkpoint's shared expert (if any) as it is; ders folds it in.")
    p.add_argument("--calib-data", default=None, metavar="FILE",
                   help="token ids (.npy/.pt/.txt bytes, or an indexed dataset prefix) for fisher/wsvd")
    p.add_argument("--eval-data", default=None, metavar="FILE", help="held-out token ids: loss before/after")
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--file-bytes", type=int, default=None, help="max bytes per output file")
    p.add_argument("--json", default=None, metavar="FILE", help="write the report as JSON")
    return p


def main(argv=None) -> int:
    import json

    ns = build_parser().parse_args(argv)
    try:
        cfg = CompressConfig(
            codecs=ns.moe_ders_codecs, base=ns.base, dense_root=ns.dense, shared_expert_init=ns.shared_expert_init,
            max_delta_norm=ns.max_delta_norm, seed=ns.moe_ders_seed,
            group_size=ns.moe_ders_quant_group_size, shared_expert=ns.moe_ders_shared_expert, calib_data=ns.calib_data, eval_data=ns.eval_data,
            seq_length=ns.seq_length, batch_size=ns.batch_size, calib_batches=ns.calib_batches,
            eval_batches=ns.eval_batches,
        )
        with trust_checkpoints(ns.trust_checkpoint):
            report = _compress(ns, cfg)
        if ns.json:
            write_text_atomic(ns.json, json.dumps(report, indent=2) + "\n")
    except user_failures() as err:
        return report_failure("compress", err, ns.debug)
    print(format_report(report))
    return 0


def _compress(ns, cfg: CompressConfig) -> dict:
    from ders_megatron.convert.compress.from_hf import compress_hf, is_hf_folder

    if is_hf_folder(ns.load):
        return compress_hf(ns.load, ns.save, cfg, hf_output=ns.hf_output, force=ns.force, file_bytes=ns.file_bytes)
    if ns.hf_output is not None or ns.save is None:
        raise CompressError("--load is a megatron checkpoint: give --save (--hf-output is for a Hugging Face "
                              "--load; export the result with tools/convert_hf.py export --format ders)")
    return compress_checkpoint(ns.load, ns.save, cfg, force=ns.force, file_bytes=ns.file_bytes)
