"""Upcycling: dense checkpoint -> (DeRS | vanilla) MoE checkpoint -> same logits at step 0.

The dense checkpoint is saved at TP=2 and the MoE checkpoint loaded at other
layouts, so every test also checks that the offline tool is layout-free.
"""

import json
import os

import pytest

from compress_helpers import batch, build, full_logits, save_dense, save_dense_with_biases, tiny_args

# float32 logits O(1). With renormalised top-k, Σ_k p_k = 1 up to one rounding, so the
# MoE output is the dense FFN output to a few ulps; TP/EP layouts add partial sums in
# another order (a few more ulps through 2 layers). 1e-5 covers that; a wrong copy,
# router or delta gives O(1e-2).
ATOL, RTOL = 1e-5, 1e-5
LOAD_LAYOUTS = [dict(), dict(tp=2), dict(ep=2), dict(tp=2, ep=2, etp=1)]


@pytest.fixture(scope="module")
def dense_args():
    return tiny_args()


@pytest.fixture(scope="module")
def dense_tp2(dist2, tmp_path_factory, dense_args):
    """A dense checkpoint saved at TP=2 and its logits."""
    root = tmp_path_factory.mktemp("dense") / "ckpt"
    logits = dist2.run(save_dense, str(root), dense_args, dict(tp=2))[0]
    return root, logits


# --------------------------------------------------------------------------- #
# Test bodies (run on the rank pools)
# --------------------------------------------------------------------------- #
def run_upcycle(dense_root, out_root, **config):
    from ders_megatron.convert.upcycle import UpcycleConfig, upcycle_checkpoint

    return upcycle_checkpoint(dense_root, out_root, UpcycleConfig(**config))


def load_logits(root, layouts):
    """Logits of the checkpoint loaded at each layout (the model built from its args)."""
    from ders_megatron.io.checkpoint import load_common, load_model
    from ders_megatron.testing.distributed import model_parallel

    args = load_common(root)["args"]
    results = []
    for layout in layouts:
        with model_parallel(**layout, seed=11):  # another seed: everything must come from the file
            model = build(args, layout)
            load_model(model, root)
            results.append(full_logits(model, batch()))
    return results


def in_memory_matches_offline(dense_root, moe_root, layout):
    """upcycle_state_into_model at ``layout`` == the offline checkpoint loaded there."""
    import torch

    from ders_megatron.io.checkpoint import load_common, load_model
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.io.upcycle_state import upcycle_state_into_model

    args = load_common(moe_root)["args"]
    with model_parallel(**layout, seed=5):
        loaded = build(args, layout)
        load_model(loaded, moe_root)
    with model_parallel(**layout, seed=6):
        fresh = build(args, layout)
        counts = upcycle_state_into_model(dense_root, fresh)
        logits = full_logits(fresh, batch())
    for (name, a), b in zip(loaded.state_dict().items(), fresh.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    return logits, counts


# --------------------------------------------------------------------------- #
# Equivalence
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", ["vanilla", "lowrank", "sparse", "dense"])
def test_upcycled_equals_dense_at_every_layout(dist1, dist2, dense_tp2, tmp_path, kind):
    dense_root, dense_logits = dense_tp2
    out = tmp_path / "moe"
    dist1.run(run_upcycle, str(dense_root), str(out), kind=kind, num_experts=4, topk=2, rank=2, drop_rate=0.9)
    for logits in dist2.run(load_logits, str(out), LOAD_LAYOUTS)[0]:
        torch_assert_close(logits, dense_logits)


@pytest.mark.parametrize(
    "config",
    [
        dict(kind="lowrank", shared_expert="ders", shared_expert_gate=True, moe_layer_freq=2),
        dict(kind="vanilla", shared_expert="full", topk=3),
        dict(kind="sparse", shared_expert="full", shared_expert_gate=True, drop_rate=0.9),
    ],
    ids=["ders-shared-gate-freq2", "vanilla-shared-top3", "sparse-full-shared-gate"],
)
def test_shared_expert_split_and_layer_freq_equal_dense(dist1, dist2, dense_tp2, tmp_path, config):
    dense_root, dense_logits = dense_tp2
    out = tmp_path / "moe"
    dist1.run(run_upcycle, str(dense_root), str(out), num_experts=4, rank=2, **config)
    for logits in dist2.run(load_logits, str(out), [dict(), dict(tp=2, ep=2, etp=1)])[0]:
        torch_assert_close(logits, dense_logits)


def test_in_memory_upcycle_equals_offline_checkpoint(dist1, dist2, dense_tp2, tmp_path):
    """Same router/delta init and copies whether upcycled in the training process or offline."""
    dense_root, dense_logits = dense_tp2
    for i, config in enumerate([
        dict(kind="lowrank", shared_expert="ders", shared_expert_gate=True, rank=2),
        dict(kind="vanilla", shared_expert="full"),
    ]):
        out = tmp_path / f"moe{i}"
        dist1.run(run_upcycle, str(dense_root), str(out), num_experts=4, **config)
        for layout in (dict(tp=2, ep=2, etp=1), dict(tp=2)):
            logits, counts = dist2.run(in_memory_matches_offline, str(dense_root), str(out), layout)[0]
            torch_assert_close(logits, dense_logits)
            assert counts["router"] == 2 and counts["copy"] > 0


def test_pre_softmax_topk_is_not_equivalent(dist1, dense_tp2, tmp_path):
    """Softmax before top-k: the k probabilities sum to < 1, so the MoE output shrinks."""
    import torch

    dense_root, dense_logits = dense_tp2
    out = tmp_path / "moe"
    dist1.run(run_upcycle, str(dense_root), str(out), kind="lowrank", num_experts=4, topk=2,
              rank=2, renormalize_topk=False)
    (logits,) = dist1.run(load_logits, str(out), [dict()])[0]
    assert (logits - dense_logits).abs().max() > 1e-2
    assert not torch.allclose(logits, dense_logits, atol=ATOL, rtol=RTOL)


def torch_assert_close(actual, expected):
    import torch

    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------- #
# Streaming
# --------------------------------------------------------------------------- #
def streamed_upcycle(dense_root, out_root):
    """Count how the writer computes values: once per parameter, in plan order."""
    from ders_megatron.io import streaming
    from ders_megatron.convert.upcycle import UpcycleConfig, upcycle_checkpoint

    calls = []
    original = streaming.LazyCheckpointWriter._chunk_data

    def spy(self, chunk):
        if self._current is None or self._current[0] != chunk.entry:
            calls.append(chunk.entry)
        return original(self, chunk)

    streaming.LazyCheckpointWriter._chunk_data = spy
    try:
        summary = upcycle_checkpoint(dense_root, out_root, UpcycleConfig(kind="vanilla", num_experts=4),
                                     file_bytes=32 * 1024)
    finally:
        streaming.LazyCheckpointWriter._chunk_data = original
    return calls, summary


def test_writer_streams_one_parameter_at_a_time(dist1, dist2, dense_tp2, tmp_path):
    dense_root, dense_logits = dense_tp2
    out = tmp_path / "moe"
    calls, summary = dist1.run(streamed_upcycle, str(dense_root), str(out))[0]
    assert len(calls) == len(set(calls)), "a parameter was computed twice: chunks not consecutive"
    files = [f for f in os.listdir(out / "release") if f.endswith(".distcp")]
    assert len(files) > 3  # 32 KiB buckets: several files, each written and released in turn
    assert summary["moe_bytes"] > 2 * summary["dense_bytes"]  # 4 copies of the FFNs
    torch_assert_close(dist2.run(load_logits, str(out), [dict(ep=2)])[0][0], dense_logits)


# --------------------------------------------------------------------------- #
# Command line and bad input: clear errors, no output
# --------------------------------------------------------------------------- #
def cli(argv):
    import contextlib
    import io

    from ders_megatron.cli.upcycle import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse errors
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def test_cli_writes_summary_and_refuses_to_overwrite(dist1, dense_tp2, tmp_path):
    dense_root, _ = dense_tp2
    out, summary = tmp_path / "moe", tmp_path / "summary.json"
    argv = ["--load", str(dense_root), "--save", str(out), "--num-experts", "4", "--moe-ders", "sparse",
            "--moe-ders-drop-rate", "0.9", "--json", str(summary)]
    code, stdout, stderr = dist1.run(cli, argv)[0]
    assert code == 0, stderr
    assert "peak RSS" in stdout and json.loads(summary.read_text())["moe_bytes"] > 0
    code, _, stderr = dist1.run(cli, argv)[0]
    assert code == 2 and "--force" in stderr
    code, _, stderr = dist1.run(cli, argv + ["--force"])[0]
    assert code == 0, stderr


def _truncate_tensors(root):
    release = root / "release"
    for name in os.listdir(release):
        if name.endswith(".distcp"):
            path = release / name
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "does not exist"),
        ("no-tracker", "latest_checkpointed_iteration.txt"),
        ("truncated", "is truncated"),  # issue 19: names the .distcp and its length
        ("already-moe", "already a MoE checkpoint"),
        ("ep-not-divisible", "not divisible by --target-ep 3"),
        ("rank-too-large", "--moe-ders-rank 40 exceeds"),
        ("top1-renormalized", "--moe-router-topk 1 needs softmax before top-k"),
        ("drop-keeps-nothing", "keeps no element"),
        ("rank-with-vanilla", "--moe-ders-rank applies to --moe-ders lowrank only, not vanilla"),
    ],
)
def test_bad_input_fails_clearly_without_output(dist1, dense_tp2, tmp_path, case, message):
    import shutil

    dense_root, _ = dense_tp2
    source = tmp_path / "in"
    extra = []
    if case == "missing":
        source = tmp_path / "nope"
    elif case == "no-tracker":
        source.mkdir()
    elif case == "truncated":
        shutil.copytree(dense_root, source)
        _truncate_tensors(source)
    elif case == "already-moe":
        dist1.run(run_upcycle, str(dense_root), str(source), kind="vanilla", num_experts=4)
    elif case == "ep-not-divisible":
        source, extra = dense_root, ["--target-ep", "3"]
    elif case == "rank-too-large":
        source, extra = dense_root, ["--moe-ders", "lowrank", "--moe-ders-rank", "40"]
    elif case == "rank-with-vanilla":  # the default kind: the rank would be silently ignored
        source, extra = dense_root, ["--moe-ders-rank", "8"]
    elif case == "top1-renormalized":
        source, extra = dense_root, ["--moe-router-topk", "1"]
    elif case == "drop-keeps-nothing":
        source, extra = dense_root, ["--moe-ders", "sparse", "--moe-ders-drop-rate", "0.99999"]
    out = tmp_path / "out"
    argv = ["--load", str(source), "--save", str(out), "--num-experts", "4", *extra]
    code, _, stderr = dist1.run(cli, argv)[0]
    assert code == 2 and message in stderr, stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no temp dir left


def test_cli_flags_are_frozen():
    from ders_megatron.cli.upcycle import build_parser

    flags = sorted(o for a in build_parser()._actions for o in a.option_strings)
    assert flags == sorted([
        "-h", "--help", "--load", "--save", "--force", "--moe-ders", "--num-experts", "--moe-router-topk",
        "--moe-layer-freq", "--moe-ders-rank", "--moe-ders-alpha", "--moe-ders-drop-rate", "--moe-ders-seed",
        "--moe-ders-impl", "--moe-ders-freeze-base", "--moe-ders-shared-expert", "--moe-shared-expert-gate",
        "--shared-expert-init", "--router-init-std", "--no-renormalize-topk", "--moe-token-dispatcher-type",
        "--transformer-impl", "--target-tp", "--target-ep", "--target-etp", "--file-bytes", "--json",
        "--trust-checkpoint", "--debug",
    ])


def test_moe_args_carry_the_training_flag_names(dense_args):
    from ders_megatron.convert.upcycle import UpcycleConfig, moe_args
    from ders_megatron.core.config import ders_config_from_args

    args = moe_args(dense_args, UpcycleConfig(kind="sparse", num_experts=4, drop_rate=0.9, seed=7,
                                              shared_expert="ders"))
    assert (args.num_experts, args.moe_ffn_hidden_size, args.moe_router_pre_softmax) == (4, 64, False)
    assert args.moe_shared_expert_intermediate_size == 64 and args.moe_ders_shared_expert == "ders"
    ders = ders_config_from_args(args)  # what the training script will build
    assert ders.delta.drop_rate == 0.9 and ders.seed == 7 and ders.extended_shared_expert


# --------------------------------------------------------------------------- #
# Per-expert biases (issue 14)
# --------------------------------------------------------------------------- #
def checkpoint_keys(root):
    from ders_megatron.io.checkpoint import tensor_shapes

    return set(tensor_shapes(root))


def test_dense_biases_become_each_experts_own(dist1, dist2, tmp_path):
    """A dense model with biases upcycles to DeRS experts that each own a copy of the dense
    fc1/fc2 bias (experts.biases.*, no shared base bias), as the paper counts them: the MoE
    still equals the dense model at every layout with expert-TP 1, and the in-memory
    upcycle fills the same values."""
    args = tiny_args(add_bias_linear=True)
    dense_root = tmp_path / "dense"
    dense_logits = dist2.run(save_dense_with_biases, str(dense_root), args, dict(tp=2))[0]
    out = tmp_path / "moe"
    dist1.run(run_upcycle, str(dense_root), str(out), kind="lowrank", num_experts=4, rank=2)
    keys = checkpoint_keys(out)
    assert {k for k in keys if ".experts.biases." in k} == {f"decoder.layers.mlp.experts.biases.{m}" for m in ("fc1", "fc2")}
    assert not {k for k in keys if ".experts.linear_fc" in k and k.endswith(".bias")}
    for logits in dist2.run(load_logits, str(out), [dict(), dict(ep=2), dict(tp=2, ep=2, etp=1)])[0]:
        torch_assert_close(logits, dense_logits)
    logits, counts = dist2.run(in_memory_matches_offline, str(dense_root), str(out), dict(tp=2, ep=2, etp=1))[0]
    torch_assert_close(logits, dense_logits)
    assert counts["per_expert"] == 2 * 2  # fc1 and fc2 of 2 MoE layers
