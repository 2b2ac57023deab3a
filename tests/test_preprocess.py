"""tools/preprocess_data.py: text/jsonl -> megatron-core indexed dataset that GPTDataset reads."""

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import preprocess_data  # noqa: E402

from ders_megatron.training.data import BYTE_EOD, read_documents  # noqa: E402

TEXT = "In the beginning God created the heaven and the earth.\nAnd the earth was without form.\n\n" \
       "And God said, Let there be light: and there was light. \u00e9\n"


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))], dataset


def test_bytes_fallback_round_trips(tmp_path):
    src = tmp_path / "book.txt"
    src.write_text(TEXT, encoding="utf-8")
    assert preprocess_data.main(["--input", str(src), "--output-prefix", str(tmp_path / "book"), "--quiet"]) == 0
    docs, dataset = _read(tmp_path / "book")
    paragraphs = list(read_documents(src))
    assert len(paragraphs) == 2
    assert docs == [list(p.encode("utf-8")) + [BYTE_EOD] for p in paragraphs]
    assert dataset.index.dtype == np.uint16  # 257 ids fit
    summary = json.loads((tmp_path / "book.json").read_text())
    assert summary["training_flags"][:4] == ["--tokenizer-type", "NullTokenizer", "--vocab-size", "257"]


def _train_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    tok.save(str(path))
    return tok


def test_hf_tokenizer_json_and_jsonl(tmp_path):
    tok = _train_tokenizer(tmp_path / "tokenizer.json")
    src = tmp_path / "corpus.jsonl"
    rows = [{"text": "And God said, Let there be light"}, {"text": "and there was light."}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix = tmp_path / "out" / "corpus"
    assert preprocess_data.main(["--input", str(src), "--output-prefix", str(prefix),
                                 "--tokenizer", str(tmp_path), "--quiet"]) == 0
    docs, _ = _read(prefix)
    eod = tok.token_to_id("<|endoftext|>")
    assert docs == [tok.encode(r["text"], add_special_tokens=False).ids + [eod] for r in rows]
    flags = json.loads((prefix.parent / "corpus.json").read_text())["training_flags"]
    assert flags[:4] == ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(tok.get_vocab_size())]
    assert flags[4:6] == ["--null-tokenizer-eod-id", str(eod)]


def test_gpt_dataset_reads_the_output(tmp_path):
    """What training reads: megatron-core's GPTDataset over the .bin/.idx, NullTokenizer ids."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.tokenizers import MegatronTokenizer

    src = tmp_path / "book.txt"
    src.write_text(TEXT * 30, encoding="utf-8")
    preprocess_data.main(["--input", str(src), "--output-prefix", str(tmp_path / "book"), "--quiet"])
    tokenizer = MegatronTokenizer.from_pretrained(metadata_path={"library": "null-text"}, vocab_size=257)
    config = GPTDatasetConfig(
        random_seed=1, sequence_length=32, blend=([str(tmp_path / "book")], None), split="100,0,0",
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        path_to_cache=str(tmp_path / "cache"),
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [8, None, None], lambda: True, config).build()
    sample = train[0]
    assert sample["tokens"].shape == (32,) and int(sample["tokens"].max()) <= BYTE_EOD
    assert tokenizer.eod == BYTE_EOD
    text = bytes(t for t in sample["tokens"].tolist() if t < 256).decode("utf-8", errors="replace")
    assert "light" in text or "earth" in text or "God" in text


def test_errors_name_the_flag(tmp_path, capsys):
    assert preprocess_data.main(["--input", str(tmp_path / "missing.txt"), "--output-prefix",
                                 str(tmp_path / "x"), "--quiet"]) == 2
    assert "--input" in capsys.readouterr().err
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"body": "x"}) + "\n")
    assert preprocess_data.main(["--input", str(src), "--output-prefix", str(tmp_path / "y"), "--quiet"]) == 2
    assert "--json-key" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        preprocess_data.preprocess(preprocess_data.build_parser().parse_args(
            ["--input", str(src), "--output-prefix", str(tmp_path / "z"), "--tokenizer", str(tmp_path)]))
