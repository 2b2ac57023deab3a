"""Text -> megatron-core indexed datasets, and the GPT datasets and batches for training.

Preprocessing (``tools/preprocess_data.py``) writes megatron-core's format
(``IndexedDatasetBuilder``, ``datasets/indexed_dataset.py:920``): ``PREFIX.bin``
(token ids) and ``PREFIX.idx``, one document per entry, each followed by the
end-of-document id. Tokenizers:

* a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library);
* bytes (no tokenizer given): UTF-8 bytes 0-255, end-of-document 256.

Megatron reads the ids as they are; its tokenizer only supplies the vocabulary
size and the end-of-document id. Both cases train offline with
``--tokenizer-type NullTokenizer --vocab-size V`` (its end-of-document id is
``V - 1`` by default, ``--null-tokenizer-eod-id`` otherwise), which is what
:func:`training_tokenizer_flags` returns. (0.19.2's ``HuggingFaceTokenizer``
loads a folder holding only ``tokenizer.json`` too, but then reports no
end-of-document id, which GPTDataset needs; 0.19.2 has a byte-level tokenizer
class but no ``--tokenizer-type`` for it.)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from ders_megatron.io.errors import InputFileError

BYTE_EOD = 256
BYTE_VOCAB_SIZE = 257
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")
SPLITS = ("blank-line", "line", "file")


# --------------------------------------------------------------------------- #
# Tokenizers
# --------------------------------------------------------------------------- #
class ByteTokenizer:
    """UTF-8 bytes as ids 0-255; 256 ends a document."""

    name = "bytes"
    vocab_size = BYTE_VOCAB_SIZE
    eod = BYTE_EOD

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class HFJsonTokenizer:
    """A Hugging Face ``tokenizer.json`` loaded with the ``tokenizers`` library."""

    def __init__(self, path: str, eod_token: str | None = None):
        from tokenizers import Tokenizer

        self.name = str(path)
        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod = self._eod_id(eod_token)

    def _eod_id(self, eod_token: str | None) -> int:
        names = (eod_token,) if eod_token else EOD_CANDIDATES
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        raise ValueError(
            f"--eod-token: {self.name} has none of {list(names)}; name its end-of-document token"
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids


def load_tokenizer(path: str | None, eod_token: str | None = None):
    """``tokenizer.json`` (or a folder holding one), or bytes when ``path`` is None."""
    if path is None:
        return ByteTokenizer()
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"--tokenizer: no tokenizer.json at {path}")
    return HFJsonTokenizer(str(path), eod_token)


def training_tokenizer_flags(tokenizer) -> list[str]:
    """Megatron flags that train on ids from ``tokenizer`` (offline, no vocab files)."""
    flags = ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(tokenizer.vocab_size)]
    if tokenizer.eod != tokenizer.vocab_size - 1:
        flags += ["--null-tokenizer-eod-id", str(tokenizer.eod)]
    return flags


# --------------------------------------------------------------------------- #
# Documents
# --------------------------------------------------------------------------- #
def read_documents(path, json_key: str = "text", split: str = "blank-line") -> Iterator[str]:
    """Documents of a ``.jsonl``/``.json`` file (one JSON object per line, text under
    ``json_key``) or of a text file, split on blank lines, lines, or not at all.

    A file that is not UTF-8, or a line that is not a JSON object, raises
    :class:`InputFileError` naming the file, the line and the byte offset.
    """
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        yield from _json_documents(path, json_key)
        return
    if split not in SPLITS:
        raise ValueError(f"--split-documents must be one of {SPLITS}, got {split!r}")
    data = path.read_bytes()
    # universal newlines, as text-mode reading had them
    text = decode_utf8(data, path).replace("\r\n", "\n").replace("\r", "\n")
    if split == "file":
        parts = [text]
    elif split == "line":
        parts = text.splitlines()
    else:
        parts = ["\n".join(p.strip("\n").splitlines()) for p in text.split("\n\n")]
    yield from (p for p in parts if p.strip())


def decode_utf8(data: bytes, path, offset: int = 0, line: int | None = None) -> str:
    """``data`` (found at byte ``offset`` of ``path``, on ``line``) as UTF-8 text;
    :class:`InputFileError` naming the file, line and byte where it is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = line if line is not None else data[:err.start].count(b"\n") + 1
        raise InputFileError(
            f"{path} is not UTF-8 text: byte {offset + err.start} (line {line}) is 0x{data[err.start]:02x} "
            f"({err.reason}); convert the file (e.g. iconv -f latin1 -t utf-8) or leave it out"
        ) from None


def _json_documents(path: Path, json_key: str) -> Iterator[str]:
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            line = decode_utf8(raw, path, offset, number)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputFileError(f"{path}:{number}: not a JSON object ({err.msg}, column {err.colno}); "
                                     "give .jsonl files one object per line") from None
            if not isinstance(record, dict) or json_key not in record:
                raise KeyError(f"{path}:{number} has no key {json_key!r} (--json-key)")
            yield record[json_key]


@dataclasses.dataclass
class PreprocessStats:
    documents: int
    tokens: int
    bin_path: str
    idx_path: str


def write_indexed_dataset(
    documents: Iterable[str], tokenizer, output_prefix, *, append_eod: bool = True,
    progress: bool = True, total_bytes: int | None = None,
) -> PreprocessStats:
    """Tokenize ``documents`` into ``output_prefix.bin/.idx`` (megatron-core format)."""
    from megatron.core.datasets.indexed_dataset import (
        DType,
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )
    from tqdm import tqdm

    prefix = str(output_prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)  # uint16 below 65500 ids
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=dtype)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not progress,
               desc="tokenizing")
    count = tokens = 0
    with bar:
        for doc in documents:
            ids = tokenizer.encode(doc) + ([tokenizer.eod] if append_eod else [])
            if ids:
                builder.add_document(np.asarray(ids, dtype=np.int64), [len(ids)])
                count += 1
                tokens += len(ids)
            bar.update(len(doc.encode("utf-8")))
    builder.finalize(get_idx_path(prefix))
    return PreprocessStats(count, tokens, get_bin_path(prefix), get_idx_path(prefix))


# --------------------------------------------------------------------------- #
# Training: datasets and batches (as Megatron-LM's pretrain_gpt.py)
# --------------------------------------------------------------------------- #
# GPTDatasetConfig field -> the args attribute holding it, where the names differ.
_RENAMED = {
    "random_seed": "seed",
    "sequence_length": "seq_length",
    "path_to_cache": "data_cache_path",
    "create_attention_mask": "create_attention_mask_in_dataloader",
    "fast_cache_load": "dataloader_fast_cache_load",
    "defer_npy_index_mmap": "dataloader_defer_npy_index_mmap",
    "inter_document_masking": "dataloader_inter_document_masking",
}


def gpt_dataset_config(args, tokenizer):
    """GPTDatasetConfig from the Megatron flags (``--data-path`` blends, ``--split``,
    per-split paths, ``--mock-data``...)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.training.utils import get_blend_and_blend_per_split

    blend, blend_per_split = get_blend_and_blend_per_split(args)
    kwargs = {"blend": blend, "blend_per_split": blend_per_split, "tokenizer": tokenizer}
    for f in dataclasses.fields(GPTDatasetConfig):
        source = _RENAMED.get(f.name, f.name)
        if f.init and f.name not in kwargs and hasattr(args, source):
            kwargs[f.name] = getattr(args, source)
    return GPTDatasetConfig(**kwargs)


def is_dataset_built_on_rank(vp_stage=None) -> bool:
    from megatron.core import parallel_state
    from megatron.training.utils import is_first_or_last_pipeline_stage

    return (is_first_or_last_pipeline_stage(vp_stage)
            and parallel_state.get_tensor_model_parallel_rank() == 0)


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """megatron.training's dataset hook: GPTDataset over indexed files, or MockGPTDataset."""
    from functools import partial

    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset
    from megatron.training import get_args, get_tokenizer, print_rank_0

    args = get_args()
    config = gpt_dataset_config(args, get_tokenizer())
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0(f"> building train, validation, and test datasets ({dataset_type.__name__}) ...")
    on_rank = partial(is_dataset_built_on_rank, vp_stage=vp_stage)
    return BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples, on_rank, config
    ).build()


# Data loaders run on every rank's own datasets: megatron-core datasets are distributed-aware.
train_valid_test_datasets_provider.is_distributed = True

BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")


def get_batch(data_iterator, vp_stage=None) -> dict:
    """The microbatch on this rank: read on TP rank 0, broadcast over TP, sliced for CP."""
    from megatron.core import parallel_state as mpu
    from megatron.core.utils import get_batch_on_this_cp_rank, get_batch_on_this_tp_rank
    from megatron.training import get_args
    from megatron.training.utils import is_first_or_last_pipeline_stage

    if not is_first_or_last_pipeline_stage(vp_stage):
        return {key: None for key in BATCH_KEYS}
    args = get_args()
    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch = {}
    if tp_rank == 0:
        batch = next(data_iterator)
        batch = {k: (v.cuda(non_blocking=True) if torch.is_tensor(v) else v)
                 for k, v in batch.items()}
        batch.setdefault("attention_mask", None)
        batch.setdefault("cu_seqlens", None)
    batch = get_batch_on_this_tp_rank(
        batch,
        has_cu_seqlens=False,
        is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(),
        cp_size=args.context_parallel_size,
        tp_rank=tp_rank,
        micro_batch_size=args.micro_batch_size,
        seq_length=args.seq_length,
        mtp_on_this_rank=False,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(),
        is_pipeline_last_stage=mpu.is_pipeline_last_stage(),
    )
    batch.setdefault("cu_seqlens", None)
    if args.context_parallel_size > 1:
        batch = get_batch_on_this_cp_rank(
            batch, is_hybrid_cp=False, cp_group=mpu.get_context_parallel_group()
        )
    return {key: batch.get(key) for key in BATCH_KEYS}
