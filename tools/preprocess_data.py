"""Text or JSON lines -> megatron-core indexed dataset (PREFIX.bin / PREFIX.idx).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer path/to/tokenizer.json            # Hugging Face tokenizers file
    python tools/preprocess_data.py --input book.txt --output-prefix data/book   # bytes

Then train with ``--data-path PREFIX`` and the tokenizer flags this prints
(also written to ``PREFIX.json``), e.g. ``--tokenizer-type NullTokenizer
--vocab-size 257`` for bytes. The logic is in :mod:`ders_megatron.training.data`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    from ders_megatron.training.data import SPLITS

    p = argparse.ArgumentParser(prog="preprocess_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, nargs="+",
                   help=".txt files, or .jsonl/.json files with one JSON object per line")
    p.add_argument("--output-prefix", required=True,
                   help="writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    p.add_argument("--tokenizer", default=None,
                   help="a Hugging Face tokenizer.json (or its folder); default: UTF-8 bytes")
    p.add_argument("--eod-token", default=None,
                   help="end-of-document token of --tokenizer (default: the first of "
                   "<|endoftext|>, </s>, ... that it has)")
    p.add_argument("--json-key", default="text", help="text field of each JSON line")
    p.add_argument("--split-documents", choices=SPLITS, default="blank-line",
                   help="how a .txt file splits into documents")
    p.add_argument("--no-append-eod", action="store_true", help="do not end documents with EOD")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def preprocess(args) -> dict:
    """Tokenize ``args.input`` into ``args.output_prefix``; returns the summary written to JSON."""
    from ders_megatron.training.data import (
        load_tokenizer,
        read_documents,
        training_tokenizer_flags,
        write_indexed_dataset,
    )

    for path in args.input:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--input {path} does not exist")
    tokenizer = load_tokenizer(args.tokenizer, args.eod_token)

    def documents():
        for path in args.input:
            yield from read_documents(path, args.json_key, args.split_documents)

    total = sum(Path(p).stat().st_size for p in args.input)
    stats = write_indexed_dataset(
        documents(), tokenizer, args.output_prefix, append_eod=not args.no_append_eod,
        progress=not args.quiet, total_bytes=total,
    )
    summary = {
        "inputs": [str(p) for p in args.input],
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eod_id": tokenizer.eod,
        "documents": stats.documents,
        "tokens": stats.tokens,
        "data_path": str(args.output_prefix),
        "training_flags": [*training_tokenizer_flags(tokenizer),
                           "--data-path", str(args.output_prefix)],
    }
    Path(f"{args.output_prefix}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = preprocess(args)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"preprocess_data: error: {err}", file=sys.stderr)
        return 2
    print(f"{summary['documents']:,} documents, {summary['tokens']:,} tokens -> "
          f"{args.output_prefix}.bin/.idx")
    print("train with: " + " ".join(summary["training_flags"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
