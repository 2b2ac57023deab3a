"""--moe-ders* / --cpu flags: the frozen surface, the DeRSConfig mapping, and every
invalid combination rejected at parse time (before tokenizer, process groups, data)."""

import argparse

import pytest

from pathlib import Path

from ders_megatron.core.config import (
    DenseDeltaConfig,
    LowRankDeltaConfig,
    SparseDeltaConfig,
    ders_config_from_args,
    mismatched_ders_flags,
)
from ders_megatron.training.arguments import (
    CPU_SETTINGS,
    DeRSArgumentError,
    check_load_matches_flags,
    ders_flags,
    parse_ders_args,
)

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"  # checkpoints with their args (tests/golden.py)

# Changing this list changes the CLI: update README/examples and say so in the changelog.
FROZEN_FLAGS = (
    "--cpu",
    "--ders-loss-log",
    "--ders-qk-layernorm-width",  # issue 18: OLMoE's full-width QK norm
    "--moe-ders",
    "--moe-ders-alpha",
    "--moe-ders-codecs",
    "--moe-ders-drop-rate",
    "--moe-ders-freeze-base",
    "--moe-ders-impl",
    "--moe-ders-quant-group-size",
    "--moe-ders-rank",
    "--moe-ders-seed",
    "--moe-ders-shared-bias",  # issue 14: experts own their biases unless this is given
    "--moe-ders-shared-expert",
    "--moe-ders-upcycle-from",
    "--trust-checkpoint",  # issue 19: the opt-out of the checkpoint allow-lists
)

BASE = (
    "--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 "
    "--seq-length 32 --max-position-embeddings 32 --micro-batch-size 2 --train-iters 2 "
    "--swiglu --disable-bias-linear --tokenizer-type NullTokenizer --vocab-size 257"
).split()
MOE = BASE + "--num-experts 4 --moe-router-topk 2".split()


def parse(extra, base=MOE, cpu=True, cuda_available=False):
    return parse_ders_args(base + (["--cpu"] if cpu else []) + extra.split(), cuda_available)


def test_flag_surface_is_frozen():
    assert ders_flags() == FROZEN_FLAGS


def test_cpu_settings_override_megatron_defaults():
    from megatron.training.arguments import add_megatron_arguments

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    for attr, _, default, _ in CPU_SETTINGS:
        assert parser.get_default(attr) == default, attr
    args = parse("--moe-ders lowrank")
    for attr, value, _, _ in CPU_SETTINGS:
        assert getattr(args, attr) == value, attr


@pytest.mark.parametrize(
    "flags, expected",
    [
        ("--moe-ders lowrank --moe-ders-rank 8 --moe-ders-alpha 16",
         LowRankDeltaConfig(rank=8, alpha=16.0)),
        ("--moe-ders lowrank", LowRankDeltaConfig(rank=4)),
        ("--moe-ders sparse --moe-ders-drop-rate 0.9", SparseDeltaConfig(drop_rate=0.9)),
        ("--moe-ders sparse", SparseDeltaConfig(drop_rate=0.99)),
        ("--moe-ders dense", DenseDeltaConfig()),
    ],
)
def test_flags_map_to_ders_config(flags, expected):
    ders = ders_config_from_args(parse(flags))
    assert ders.delta == expected
    assert ders.seed == 1234  # --seed's default
    assert (ders.impl, ders.freeze_base, ders.extended_shared_expert) == ("dropin", False, False)


def test_every_ders_field_has_a_flag():
    args = parse(
        "--moe-ders dense --moe-ders-seed 7 --moe-ders-impl fused --moe-ders-freeze-base "
        "--moe-ders-shared-expert ders --moe-shared-expert-intermediate-size 128"
    )
    ders = ders_config_from_args(args)
    assert (ders.seed, ders.impl, ders.freeze_base, ders.extended_shared_expert) == (7, "fused", True, True)


def test_no_ders_is_none_and_seed_follows_megatron():
    assert ders_config_from_args(parse("")) is None
    assert ders_config_from_args(parse("--moe-ders vanilla")) is None
    assert ders_config_from_args(argparse.Namespace(moe_ders="none")) is None  # checkpoints before the vocabulary
    assert ders_config_from_args(parse("--moe-ders lowrank --seed 99")).seed == 99


INVALID = [
    # (flags, base, words the message must contain)
    ("--moe-ders lowrank", BASE, ["--moe-ders lowrank", "--num-experts"]),
    ("--moe-ders-rank 4", MOE, ["--moe-ders-rank", "--moe-ders lowrank"]),
    ("--moe-ders sparse --moe-ders-rank 4", MOE, ["--moe-ders-rank", "lowrank only"]),
    ("--moe-ders lowrank --moe-ders-drop-rate 0.5", MOE, ["--moe-ders-drop-rate", "sparse only"]),
    ("--moe-ders-freeze-base", MOE, ["--moe-ders-freeze-base", "needs --moe-ders"]),
    ("--moe-ders-impl fused", MOE, ["--moe-ders-impl", "needs --moe-ders"]),
    ("--moe-ders lowrank --moe-ders-rank 65", MOE, ["--moe-ders-rank 65", "--hidden-size 64"]),
    ("--moe-ders lowrank --moe-ders-rank 0", MOE, ["--moe-ders-rank"]),
    ("--moe-ders lowrank --moe-ders-alpha -1", MOE, ["--moe-ders-alpha"]),
    ("--moe-ders sparse --moe-ders-drop-rate 1.0", MOE, ["--moe-ders-drop-rate", "[0, 1)"]),
    ("--moe-ders sparse --moe-ders-drop-rate -0.1", MOE, ["--moe-ders-drop-rate", "[0, 1)"]),
    ("--moe-ders sparse --moe-ders-drop-rate 0.99999", MOE, ["--moe-ders-drop-rate 0.99999", "keeps no"]),
    ("--moe-ders dense --moe-ffn-hidden-size 130 --tensor-model-parallel-size 4 --sequence-parallel",
     MOE, ["--moe-ffn-hidden-size 130", "--expert-tensor-parallel-size 4"]),
    ("--moe-ders dense --expert-model-parallel-size 3", MOE,
     ["--expert-model-parallel-size 3", "--num-experts 4"]),
    ("--moe-ders dense --moe-ders-shared-expert ders", MOE,
     ["--moe-ders-shared-expert ders", "--moe-shared-expert-intermediate-size"]),
    ("--moe-ders dense --moe-ders-shared-expert full", MOE,
     ["--moe-ders-shared-expert full", "--moe-shared-expert-intermediate-size"]),
    ("--moe-ders dense --moe-ders-shared-expert none --moe-shared-expert-intermediate-size 128", MOE,
     ["--moe-shared-expert-intermediate-size 128", "--moe-ders-shared-expert full"]),
    ("--moe-ders-shared-expert ders --moe-shared-expert-intermediate-size 128", MOE,
     ["--moe-ders-shared-expert ders", "--moe-ders lowrank"]),
    ("--moe-ders dense --moe-ders-shared-expert ders --moe-shared-expert-intermediate-size 64", MOE,
     ["--moe-shared-expert-intermediate-size (64)", "--moe-ffn-hidden-size (128)"]),
    ("--moe-ders dense --tensor-model-parallel-size 4 --sequence-parallel "
     "--expert-tensor-parallel-size 2", MOE, ["--expert-tensor-parallel-size 2", "1 or"]),
    ("--moe-ders dense --tensor-model-parallel-size 2", MOE, ["--sequence-parallel"]),
    ("--moe-ders dense --moe-use-upcycling", MOE, ["--moe-use-upcycling"]),
    ("--moe-ders dense --moe-grouped-gemm", MOE, ["--moe-grouped-gemm"]),
    ("--moe-ders lowrank --delay-wgrad-compute", MOE, ["--delay-wgrad-compute", "backward_dw"]),
    ("--moe-ders lowrank --fp8-format hybrid", MOE, ["--moe-router-padding-for-quantization", "divisible by 16"]),
    ("--moe-ders lowrank --cuda-graph-impl local", MOE, ["--cuda-graph-modules attn"]),
    ("--moe-ders lowrank --cuda-graph-impl local --cuda-graph-modules moe", MOE, ["--cuda-graph-modules attn"]),
    ("--moe-ders lowrank --moe-ders-upcycle-from /nonexistent", BASE, ["--moe-ders-upcycle-from", "--num-experts"]),
    ("--moe-ders codec --moe-ders-codecs quant:4 --moe-ders-upcycle-from /x", MOE,
     ["--moe-ders-upcycle-from", "tools/compress.py"]),
    ("--moe-ders lowrank --use-distributed-optimizer --overlap-param-gather --overlap-grad-reduce", MOE,
     ["--overlap-param-gather is not supported with --moe-ders"]),
    ("--moe-ders lowrank --moe-ders-impl fused --expert-model-parallel-size 2", MOE,
     ["--moe-ders-impl fused", "--expert-model-parallel-size 1"]),
    ("--moe-ders lowrank --moe-layer-freq [1,0,1]", MOE, ["--moe-layer-freq", "--num-layers"]),
    ("--moe-ders lowrank --spec local", MOE, ["--spec"]),
    ("--ders-qk-layernorm-width full", MOE, ["--ders-qk-layernorm-width full", "--qk-layernorm"]),
    ("--qk-layernorm --ders-qk-layernorm-width full --group-query-attention --num-query-groups 1 "
     "--tensor-model-parallel-size 2 --sequence-parallel", MOE,
     ["--ders-qk-layernorm-width full", "--num-query-groups (1)", "--tensor-model-parallel-size (2)"]),
    ("--sft", MOE, ["--sft", "dataset provider"]),
    ("--fim-data", MOE, ["--fim-data", "dataset provider"]),
    ("--moe-ders lowrank --save /tmp/x", MOE, ["--save needs --save-interval"]),
    ("--moe-ders lowrank --lr-warmup-iters 2", MOE, ["--lr-warmup-iters 2", "--train-iters"]),
    ("--moe-ders lowrank --transformer-impl inference_optimized", MOE,
     ["--cpu", "--transformer-impl local"]),
    ("--moe-ders lowrank --num-workers 4", MOE, ["--cpu", "--num-workers 0"]),
    ("--moe-ders lowrank --moe-token-dispatcher-type flex", MOE, ["flex", "--cpu"]),
]


@pytest.mark.parametrize("flags, base, words", INVALID, ids=[f for f, _, _ in INVALID])
def test_invalid_combination_is_rejected_at_parse_time(flags, base, words):
    with pytest.raises(DeRSArgumentError) as err:
        parse(flags, base=base)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_cpu_flag_needs_a_machine_without_cuda():
    with pytest.raises(DeRSArgumentError, match="--cpu .* CUDA is available"):
        parse("--moe-ders lowrank", cuda_available=True)


def test_no_cuda_and_no_cpu_flag_names_the_fix():
    with pytest.raises(DeRSArgumentError, match="pass --cpu"):
        parse("--moe-ders lowrank", cpu=False, cuda_available=False)
    parse("--moe-ders lowrank", cpu=False, cuda_available=True)  # a GPU machine: fine


# --------------------------------------------------------------------------- #
# --load: the checkpoint's DeRS settings against the run's flags
# --------------------------------------------------------------------------- #
LOWRANK_CKPT_FLAGS = "--moe-ders lowrank --moe-ders-rank 2 --moe-ders-alpha 4.0"  # tests/golden.py "lowrank"


def test_load_with_the_checkpoints_flags_is_accepted():
    check_load_matches_flags(parse(f"{LOWRANK_CKPT_FLAGS} --load {GOLDEN / 'lowrank'}"))
    check_load_matches_flags(parse(f"--load {GOLDEN / 'vanilla'}"))
    check_load_matches_flags(parse(f"--moe-ders lowrank --load {GOLDEN / 'dense'}"))  # dense: upcycling starts
    check_load_matches_flags(parse(f"--moe-ders lowrank --load {GOLDEN / 'missing'}"))  # a fresh run's --load


@pytest.mark.parametrize("flags, named", [
    ("--moe-ders lowrank --moe-ders-rank 4 --moe-ders-alpha 4.0", ["--moe-ders-rank: run 4, checkpoint 2"]),
    # alpha differing is no shape error: without this check training would go on at another scale
    ("--moe-ders lowrank --moe-ders-rank 2 --moe-ders-alpha 8.0", ["--moe-ders-alpha: run 8.0, checkpoint 4.0"]),
    ("--moe-ders lowrank --moe-ders-rank 2", ["--moe-ders-alpha: run (not set), checkpoint 4.0"]),
    ("", ["--moe-ders: run vanilla, checkpoint lowrank"]),
    ("--moe-ders sparse", ["--moe-ders: run sparse, checkpoint lowrank"]),
    (f"{LOWRANK_CKPT_FLAGS} --moe-ders-shared-expert full --moe-shared-expert-intermediate-size 128",
     ["--moe-ders-shared-expert: run full, checkpoint none"]),
])
def test_load_with_other_ders_flags_names_each_flag(flags, named):
    with pytest.raises(DeRSArgumentError) as err:
        check_load_matches_flags(parse(f"{flags} --load {GOLDEN / 'lowrank'}"))
    assert "--use-checkpoint-args" in str(err.value)
    for words in named:
        assert words in str(err.value), str(err.value)


def test_mismatch_reads_the_stored_spellings():
    stored = argparse.Namespace(moe_ders="sparse", moe_ders_drop_rate=None, moe_ders_shared_expert=True,
                                moe_shared_expert_intermediate_size=64)
    run = argparse.Namespace(moe_ders="sparse", moe_ders_drop_rate=0.99, moe_ders_shared_expert="ders",
                             moe_shared_expert_intermediate_size=64)
    assert mismatched_ders_flags(run, stored) == []  # defaults filled in, the old bool read as "ders"
    run.moe_ders_drop_rate = 0.9
    assert mismatched_ders_flags(run, stored) == ["--moe-ders-drop-rate: run 0.9, checkpoint 0.99"]
    # The QK norm's width shapes its weight (OLMoE's full width): compared too, absent = head.
    full = argparse.Namespace(**vars(stored), ders_qk_layernorm_width="full")
    run.moe_ders_drop_rate = 0.99
    assert mismatched_ders_flags(run, full) == ["--ders-qk-layernorm-width: run head, checkpoint full"]


@pytest.mark.parametrize("flags", ["--moe-ders lowrank --fp8-format hybrid --moe-router-padding-for-quantization",
                                   "--moe-ders lowrank --cuda-graph-impl local --cuda-graph-modules attn"])
def test_gpu_features_that_ders_supports_pass(flags):
    assert ders_config_from_args(parse(flags)).kind == "lowrank"



def test_experts_own_biases_unless_old_checkpoint_or_shared_bias_flag():
    """Issue 14: with --add-bias-linear a run builds per-expert biases; a checkpoint written
    before (no moe_ders_expert_bias in its args) keeps the shared base bias, and --load of it
    names the flag that builds its layout."""
    import argparse

    from ders_megatron.core.config import ders_config_from_args, mismatched_ders_flags

    biased = [a for a in MOE if a != "--disable-bias-linear"]
    run = parse("--moe-ders lowrank", base=biased)
    assert run.add_bias_linear and ders_config_from_args(run).expert_bias
    shared = parse("--moe-ders lowrank --moe-ders-shared-bias", base=biased)
    assert not ders_config_from_args(shared).expert_bias
    old = argparse.Namespace(**{k: v for k, v in vars(run).items() if k != "moe_ders_expert_bias"})
    assert not ders_config_from_args(old).expert_bias
    assert mismatched_ders_flags(run, old) == ["--moe-ders-shared-bias: run False, checkpoint True"]
    assert mismatched_ders_flags(shared, old) == []
    no_bias = parse("--moe-ders lowrank")  # without biases the flag changes nothing
    assert not ders_config_from_args(no_bias).expert_bias
