"""``convert_hf``: Hugging Face <-> megatron-core checkpoints (``tools/convert_hf.py``).

    convert_hf.py import --hf-dir DIR|ORG/NAME --output CKPT [--make-vocab-size-divisible-by 128]
                         [--tensor-model-parallel-size 1] [--dtype ...] [--force]
    convert_hf.py export --checkpoint CKPT --output DIR
                         --format {mixtral,qwen2_moe,qwen3_moe,olmoe,ders,llama,mistral,qwen2,qwen3}
                         [--tokenizer DIR] [--max-shard-size 5GB] [--dtype ...] [--force]
                         [--trust-checkpoint]
    convert_hf.py adapter --checkpoint CKPT --output DIR [--format {mixtral,qwen2_moe,qwen3_moe,olmoe}]
                          [--dtype ...] [--force] [--trust-checkpoint]

Import streams tensor by tensor (memory: about two layers, docs/benchmarks.md) and
keeps the source's dtype unless ``--dtype`` says otherwise.

Bad input (unknown or refused architecture -- DeepSeek MLA --, OLMoE's clip_qkv, sliding
windows, an embedding tie the weights contradict, unknown format, a checkpoint
without MoE for a MoE format, an existing output without --force, a truncated or
damaged file, a shard missing from the index, a tensor whose shape or dtype is not
what config.json implies, NaN/Inf weights, a full disk) ends with one line
``error: ...`` naming the file and exit status 2, leaving nothing behind
(``--debug``: the traceback too).
"""

from __future__ import annotations

import argparse
import sys

from ders_megatron.cli.flags import add_debug_flag, add_trust_flag
from ders_megatron.convert.hf.dims import EXPORT_FORMATS
from ders_megatron.io.safe_load import trust_checkpoints


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_hf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="HF folder (Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE) "
                         "-> Megatron checkpoint")
    imp.add_argument("--hf-dir", required=True, help="Hugging Face model folder (config.json + weights), or a "
                     "repo id ORG/NAME already in the local Hugging Face cache (never downloaded)")
    imp.add_argument("--output", required=True, help="Megatron checkpoint root to write (use with --load)")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                     help="pad the vocabulary as Megatron does (times --tensor-model-parallel-size)")
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1,
                     help="the TP size you will train with (only the vocabulary padding depends on it)")
    imp.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                     help="dtype of the written weights (default: the source's, which config.json must declare "
                     "consistently)")
    imp.add_argument("--force", action="store_true", help="replace an existing --output")
    imp.add_argument("--transformer-impl", default=None, choices=("local", "transformer_engine"),
                     help="the spec the checkpoint is for, recorded in its args (keys differ in MoE "
                     "layers' norms; default: local without CUDA, Megatron's transformer_engine with it)")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_debug_flag(imp)

    exp = sub.add_parser("export", help="Megatron checkpoint -> HF folder")
    exp.add_argument("--checkpoint", required=True, help="Megatron checkpoint root (any TP/EP/PP layout)")
    exp.add_argument("--output", required=True, help="Hugging Face folder to write")
    exp.add_argument("--format", required=True, help=f"one of {', '.join(EXPORT_FORMATS)}")
    exp.add_argument("--tokenizer", default=None,
                     help="folder with tokenizer files to copy (default: <checkpoint>/hf from our import, "
                     "else the checkpoint's --tokenizer-model folder)")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    exp.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                     help="dtype of the written weights (default: the checkpoint's)")
    exp.add_argument("--force", action="store_true", help="replace an existing --output")
    exp.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_trust_flag(exp)
    add_debug_flag(exp)

    ada = sub.add_parser("adapter", help="DeRS-LM checkpoint -> PEFT LoRA adapter (DIR/adapter) over the upcycled "
                         "base (DIR/base, every expert = the dense FFN)")
    ada.add_argument("--checkpoint", required=True, help="Megatron DeRS-LM checkpoint root (--moe-ders lowrank)")
    ada.add_argument("--output", required=True, help="folder to write: base/ (transformers MoE) and adapter/ (PEFT)")
    ada.add_argument("--format", default=None, help="the base's family: mixtral, qwen2_moe, qwen3_moe or olmoe (default: "
                     "olmoe with --ders-qk-layernorm-width full, qwen3_moe with QK-norm, qwen2_moe with a "
                     "shared expert, else mixtral)")
    ada.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                     help="dtype of the written weights (default: the checkpoint's)")
    ada.add_argument("--force", action="store_true", help="replace an existing --output")
    ada.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_trust_flag(ada)
    add_debug_flag(ada)
    return parser


def run(args: argparse.Namespace):
    if args.command == "import":
        from ders_megatron.convert.hf.importer import import_hf

        return import_hf(
            args.hf_dir,
            args.output,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            tensor_parallel_size=args.tensor_model_parallel_size,
            dtype=args.dtype,
            force=args.force,
            transformer_impl=args.transformer_impl,
            progress=not args.no_progress,
        )
    if args.command == "adapter":
        from ders_megatron.convert.hf.peft_adapter import export_peft

        with trust_checkpoints(args.trust_checkpoint):
            return export_peft(args.checkpoint, args.output, fmt=args.format, dtype=args.dtype, force=args.force,
                               progress=not args.no_progress)
    from ders_megatron.convert.hf.exporter import export_hf

    with trust_checkpoints(args.trust_checkpoint):
        return export_hf(
            args.checkpoint,
            args.output,
            fmt=args.format,
            tokenizer=args.tokenizer,
            max_shard_size=args.max_shard_size,
            dtype=args.dtype,
            force=args.force,
            progress=not args.no_progress,
        )


def main(argv=None) -> int:
    from ders_megatron.io.errors import report_failure, user_failures

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        out = run(args)
    except user_failures() as err:
        parser.exit(report_failure(f"{parser.prog} {args.command}", err, args.debug))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
