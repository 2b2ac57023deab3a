"""DeRS in a user's own Megatron-LM ``pretrain_gpt.py`` (issue 16, item 3).

Megatron-LM's ``pretrain_gpt.py`` is not in the megatron-core wheel, so these tests
take its two seams from megatron.training 0.19.2 itself: its argument parser with
``extra_args_provider=add_ders_args`` and ``pretrain``'s ``model_provider`` hook.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import sys

import pytest

GPT = ("--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 --seq-length 16 "
       "--max-position-embeddings 16 --micro-batch-size 2 --global-batch-size 2 --swiglu "
       "--disable-bias-linear --vocab-size 128 --tokenizer-type NullTokenizer --train-iters 4 "
       "--lr 1e-3 --num-experts 4 --moe-router-topk 2 --moe-ders lowrank").split()


def megatron_parse(extra: list[str]):
    """What a Megatron-LM pretrain_gpt.py parses, with the DeRS flags added by its hook."""
    from megatron.training.arguments import parse_args

    from ders_megatron.training.arguments import add_ders_args

    saved = sys.argv
    sys.argv = ["pretrain_gpt.py", *GPT, *extra]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return parse_args(extra_args_provider=add_ders_args)
    finally:
        sys.argv = saved


@pytest.fixture
def gpu_box(monkeypatch):
    """The checks as they run on a GPU node (this machine has none)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_extra_args_provider_adds_the_ders_flags_to_megatrons_parser(gpu_box):
    from ders_megatron.training.arguments import check_args_parsed_by_megatron

    args = megatron_parse(["--moe-ders-rank", "8"])
    assert (args.moe_ders, args.moe_ders_rank) == ("lowrank", 8)
    check_args_parsed_by_megatron(args)  # a valid DeRS run passes


@pytest.mark.parametrize("extra,message", [
    (["--mtp-num-layers", "1"], "--mtp-num-layers"),
    (["--moe-ders-rank", "0"], "--moe-ders-rank"),
    (["--cpu"], "examples/pretrain_gpt_ders.py"),
], ids=["mtp", "bad-rank", "cpu"])
def test_flags_the_model_provider_cannot_honour_are_refused_by_name(gpu_box, extra, message):
    from ders_megatron.core.config import DeRSArgumentError
    from ders_megatron.training.arguments import check_args_parsed_by_megatron

    with pytest.raises(DeRSArgumentError, match=message.replace("-", r"\-")):
        check_args_parsed_by_megatron(megatron_parse(extra))


def test_megatron_lm_data_flags_are_its_own_providers_business(gpu_box):
    """--sft / --fim-data: refused by examples/pretrain_gpt_ders.py, whose dataset provider
    ignores them; a pretrain_gpt.py keeps Megatron's provider, which honours them."""
    from ders_megatron.core.config import DeRSArgumentError
    from ders_megatron.training.arguments import check_args_parsed_by_megatron, check_ders_args

    args = megatron_parse(["--sft"])
    with pytest.raises(DeRSArgumentError, match="--sft"):
        check_ders_args(args)
    check_args_parsed_by_megatron(args)


def test_model_provider_fits_megatrons_pretrain_and_get_model():
    """pretrain(cfg, datasets, model_type, forward_step, model_provider=...) (training.py:1014)
    and get_model's call (pre_process=, post_process=, config=, pg_collection=, vp_stage=)."""
    from megatron.training import pretrain

    from ders_megatron.training.provider import DeRSModelProvider

    assert "model_provider" in inspect.signature(pretrain).parameters
    inspect.signature(DeRSModelProvider()).bind(
        pre_process=True, post_process=True, config=None, pg_collection=None, vp_stage=None
    )
