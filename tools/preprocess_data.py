"""Text or JSON lines -> megatron-core indexed dataset (PREFIX.bin / PREFIX.idx).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer path/to/tokenizer.json            # Hugging Face tokenizers file
    python tools/preprocess_data.py --input book.txt --output-prefix data/book   # bytes

The three files of a prefix are replaced together or not at all; bad input (a
missing, empty or undecodable file, a full disk) is one line naming the file, exit
status 2 (``--debug``: the traceback too).

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
    from ders_megatron.cli.flags import add_debug_flag
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
    add_debug_flag(p)
    return p


def preprocess(args) -> dict:
    """Tokenize ``args.input`` into ``args.output_prefix``; returns the summary written to JSON.

    The prefix's three files are written into a temporary directory beside them and
    replace the old ones together, ``.idx`` last (``io/atomic.py``
    ``atomic_output_files``): a failure part-way (an undecodable input, a full disk, a
    kill) leaves an existing dataset as it was, never a new ``.bin`` beside an old
    ``.idx``.
    """
    from ders_megatron.io.atomic import atomic_output_files
    from ders_megatron.io.errors import InputFileError
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
            count = 0
            for document in read_documents(path, args.json_key, args.split_documents):
                count += 1
                yield document
            if count == 0:
                raise InputFileError(f"--input {path} holds no text (empty, or only blank lines): "
                                     "nothing to tokenize; leave it out")

    prefix = str(args.output_prefix)
    total = sum(Path(p).stat().st_size for p in args.input)
    with atomic_output_files([f"{prefix}.json", f"{prefix}.bin", f"{prefix}.idx"]) as (json_tmp, bin_tmp, _):
        stats = write_indexed_dataset(
            documents(), tokenizer, str(bin_tmp)[: -len(".bin")], append_eod=not args.no_append_eod,
            progress=not args.quiet, total_bytes=total,
        )
        if stats.tokens == 0:
            raise InputFileError(f"--input {' '.join(args.input)}: the tokenizer made no tokens of it")
        summary = {
            "inputs": [str(p) for p in args.input],
            "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "eod_id": tokenizer.eod,
            "documents": stats.documents,
            "tokens": stats.tokens,
            "data_path": prefix,
            "training_flags": [*training_tokenizer_flags(tokenizer), "--data-path", prefix],
        }
        json_tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv=None) -> int:
    from ders_megatron.io.errors import report_failure, user_failures

    args = build_parser().parse_args(argv)
    try:
        summary = preprocess(args)
    except user_failures() as err:
        return report_failure("preprocess_data", err, args.debug)
    print(f"{summary['documents']:,} documents, {summary['tokens']:,} tokens -> "
          f"{args.output_prefix}.bin/.idx")
    print("train with: " + " ".join(summary["training_flags"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
