"""The study's text and tokens.

The text is split into train / held-out documents once (every 50th chapter held out,
``pipeline.text.split_heldout``, as the main job does). Setting A trains a byte-level
BPE on the training split only (the ``tokenizers`` library); Setting B uses the
model's own ``tokenizer.json``. Token files are int32 tensors saved with
``torch.save`` (read back with ``weights_only=True``), each document followed by the
end-of-text id.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

EOT = "<|endoftext|>"


def documents(jsonl: Path) -> list[str]:
    return [json.loads(line)["text"] for line in jsonl.read_text().splitlines() if line.strip()]


def train_bpe(train_jsonl: Path, vocab_size: int, out: Path) -> dict:
    """A byte-level BPE of ``vocab_size`` tokens (id 0 = end of text) on the training split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents(train_jsonl), trainer=trainer)
    save_atomic(lambda tmp: tokenizer.save(str(tmp)), out)
    return {"vocab_size": tokenizer.get_vocab_size(), "tokenizer": str(out)}


def eot_id(tokenizer_json: Path) -> int:
    """The end-of-text id: ours, or the HF model's eos (config.json beside tokenizer.json)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    if (token := tokenizer.token_to_id(EOT)) is not None:
        return token
    config = tokenizer_json.with_name("config.json")
    eos = json.loads(config.read_text()).get("eos_token_id") if config.is_file() else None
    if isinstance(eos, list):
        eos = eos[0]
    if eos is None:
        raise ValueError(f"{tokenizer_json}: no {EOT} token and no eos_token_id in {config}")
    return int(eos)


def tokenize(jsonl: Path, tokenizer_json: Path, out: Path) -> dict:
    """Every document's ids + end of text, as one int32 tensor in ``out`` (.pt)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    end = eot_id(tokenizer_json)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(documents(jsonl)):
        ids.extend(encoding.ids)
        ids.append(end)
    tokens = torch.tensor(ids, dtype=torch.int32)
    save_atomic(lambda tmp: torch.save(tokens, tmp), out)
    return {"tokens": len(ids), "file": str(out)}


def load(path: Path) -> torch.Tensor:
    """1-D int64 token ids (a file :func:`tokenize` wrote)."""
    return torch.load(path, weights_only=True).long()


def save_atomic(write, path: Path) -> None:
    """``write(tmp)`` a file that then replaces ``path`` whole (io/atomic.py)."""
    from ders_megatron.io.atomic import atomic_output_files

    with atomic_output_files([path]) as (tmp,):
        write(tmp)
