"""DeRS compression end to end: a tiny dense GPT trained on real text (KJV Genesis),
vanilla-upcycled to 4 experts and trained further, then compressed.

Measured on this model (printed by the tests, ``-s`` shows them): held-out loss
changes by well under 1% for dare:0.9 and quant:4 against the dense base and for
svd:8 against the mean (see ``LOSS_TOLERANCE``), while the MoE layers' stored size
shrinks by exactly the ratio the codec's storage implies.
"""

import json
import math

import numpy as np
import pytest
import torch

from compress_helpers import build, text_tokens, tiny_args, train

SEQ = 64
# Relative held-out loss change allowed: "within a few percent". The deltas of a
# briefly trained upcycled MoE are small next to the base, so codecs that keep them
# roughly (90% dropped and rescaled, 4 bits, rank 8 of 64) move the loss by ~0.1-1%.
LOSS_TOLERANCE = 0.03
MODEL_FLAGS = ["--hidden-size", "64", "--ffn-hidden-size", "128", "--seq-length", str(SEQ),
               "--max-position-embeddings", str(SEQ)]


def make_trained_moe(workdir):
    """dense (trained) -> vanilla upcycle -> MoE (trained); token files beside them."""
    from ders_megatron.io.checkpoint import load_common, load_model, save_model
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.convert.upcycle import UpcycleConfig, upcycle_checkpoint

    torch.manual_seed(0)
    train_tokens, heldout = text_tokens()
    np.save(f"{workdir}/heldout.npy", heldout.numpy())
    np.save(f"{workdir}/calib.npy", train_tokens[:4096].numpy())
    args = tiny_args(MODEL_FLAGS)
    with model_parallel(seed=1):
        dense = build(args, ders=None)
        dense_losses = train(dense, train_tokens, steps=120, lr=3e-3, seq=SEQ)
        save_model(dense, f"{workdir}/dense", args=args)
    upcycle_checkpoint(f"{workdir}/dense", f"{workdir}/moe0", UpcycleConfig(kind="vanilla", num_experts=4))
    moe_args = load_common(f"{workdir}/moe0")["args"]
    with model_parallel(seed=2):
        moe = build(moe_args)
        load_model(moe, f"{workdir}/moe0")
        moe_losses = train(moe, train_tokens, steps=60, lr=3e-4, seq=SEQ, seed=1)
        save_model(moe, f"{workdir}/moe", args=moe_args)
    return dense_losses, moe_losses


@pytest.fixture(scope="module")
def trained(dist1, tmp_path_factory):
    """The trained tiny MoE, built once per session (test_analyze.py reuses it)."""
    workdir = tmp_path_factory.getbasetemp() / "trained_moe"
    if not (workdir / "done").exists():
        workdir.mkdir(exist_ok=True)
        dense_losses, moe_losses = dist1.run(make_trained_moe, str(workdir))[0]
        print(f"\ndense training loss {dense_losses[0]:.3f} -> {dense_losses[-1]:.3f}; "
              f"MoE {moe_losses[0]:.3f} -> {moe_losses[-1]:.3f}")
        assert dense_losses[-1] < 0.7 * dense_losses[0]  # it learned the text
        (workdir / "done").write_text("ok")
    return workdir


def run_compress(moe_root, out_root, **config):
    from ders_megatron.convert.compress.pipeline import CompressConfig, compress_checkpoint

    return compress_checkpoint(moe_root, out_root, CompressConfig(**config))


def expected_moe_bytes(codec_spec, layers=2, experts=4, hidden=64, ffn=128, group=128):
    """MoE-layer bytes the codec implies: fp32 base, stored deltas, router, seeds."""
    from ders_megatron.core.config import parse_codec
    from ders_megatron.core.codecs import storage_bits

    codec = parse_codec(codec_spec, group)
    matrices = [(ffn, hidden), (ffn, hidden), (hidden, ffn)]  # gate, up, down
    per_layer = sum(4 * o * i + experts * storage_bits(codec, o, i) / 8 for o, i in matrices)
    per_layer += 4 * experts * hidden  # router
    if codec_spec.startswith("dare"):
        per_layer += 3 * 8  # one int64 position seed per matrix
    return layers * per_layer


# --------------------------------------------------------------------------- #
# End to end
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "codec,base",
    [("dare:0.9", "dense"), ("quant:4", "dense"), ("svd:8", "mean")],
    ids=["dare-dense-base", "quant4-dense-base", "svd8-mean-base-no-dense"],
)
def test_compressed_model_keeps_heldout_loss_and_shrinks(dist1, trained, tmp_path, codec, base):
    out = tmp_path / "ders"
    dense = str(trained / "dense") if base == "dense" else None
    report = dist1.run(run_compress, str(trained / "moe"), str(out), codecs=codec, base=base, dense_root=dense,
                       eval_data=str(trained / "heldout.npy"), eval_batches=16)[0]
    change = report["eval"]["relative_loss_change"]
    before, after = report["eval"]["before"]["loss"], report["eval"]["after"]["loss"]
    ratio = report["compression"]["moe_layers"]
    print(f"\n{codec} / {base}: held-out loss {before:.4f} -> {after:.4f} ({100 * change:+.2f}%), "
          f"MoE layers x{ratio:.2f}, model x{report['compression']['model']:.2f}")
    assert abs(change) < LOSS_TOLERANCE
    assert report["after"]["moe_bytes"] == expected_moe_bytes(codec)
    vanilla_moe = 2 * (4 * 3 * 4 * 64 * 128 + 4 * 4 * 64)  # 4 fp32 experts x 3 matrices + router
    assert report["before"]["moe_bytes"] == vanilla_moe
    # cos(W_base + Δ̂_e, W_e): quant/svd reconstruct each expert closely; DARE is unbiased
    # but noisy element-wise (90% of the delta dropped, the rest x10): ~0.96-0.99 here.
    floor = 0.9 if codec.startswith("dare") else 0.999
    assert all(floor < row["cosine_min"] <= 1.0 + 1e-6 for row in report["layers"])


def test_calibrated_fisher_base_and_whitened_svd(dist1, trained, tmp_path):
    report = dist1.run(run_compress, str(trained / "moe"), str(tmp_path / "ders"), codecs="wsvd:8",
                       base="fisher", calib_data=str(trained / "calib.npy"), calib_batches=4,
                       eval_data=str(trained / "heldout.npy"), eval_batches=16)[0]
    print(f"\nwsvd:8 / fisher: {100 * report['eval']['relative_loss_change']:+.2f}%")
    assert abs(report["eval"]["relative_loss_change"]) < LOSS_TOLERANCE


def resharded_logits(root):
    """The compressed checkpoint at TP=2+EP=2 gives the world-size-1 logits."""
    from compress_helpers import batch, full_logits

    from ders_megatron.io.checkpoint import load_common, load_model
    from ders_megatron.testing.distributed import model_parallel

    args = load_common(root)["args"]
    logits = []
    for layout in (dict(), dict(tp=2, ep=2, etp=1)):
        with model_parallel(**layout, seed=4):
            model = build(args, layout)
            load_model(model, root)
            logits.append(full_logits(model, batch(seq=SEQ)))
    # Same weights, TP/EP partial sums in another order: a few ulps of O(1) logits.
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)


def keeps_training(root):
    """A compressed checkpoint trains on: floats move, packed codes stay."""
    from ders_megatron.io.checkpoint import load_common, load_model
    from ders_megatron.testing.distributed import model_parallel

    train_tokens, _ = text_tokens()
    with model_parallel():
        model = build(load_common(root)["args"])
        load_model(model, root)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        losses = train(model, train_tokens, steps=3, lr=1e-3, seq=SEQ)
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        assert moved == param.requires_grad, name
    return losses


def test_quantized_checkpoint_reshards_and_keeps_training(dist1, dist2, trained, tmp_path):
    out = tmp_path / "ders"
    dist1.run(run_compress, str(trained / "moe"), str(out), codecs="fc1:quant:2,fc2:magnitude:0.9", base="mean")
    dist2.run(resharded_logits, str(out))
    losses = dist1.run(keeps_training, str(out))[0]
    assert all(math.isfinite(x) for x in losses)


def test_dare_and_svd_outputs_load_with_the_training_flags(dist1, trained, tmp_path):
    """dare:P and svd:R write --moe-ders sparse/lowrank args the training script rebuilds."""
    from ders_megatron.core.config import ders_config_from_args
    from ders_megatron.io.checkpoint import load_common

    for codec, kind in (("dare:0.9", "sparse"), ("svd:4", "lowrank")):
        out = tmp_path / kind
        dist1.run(run_compress, str(trained / "moe"), str(out), codecs=codec, base="mean")
        args = load_common(out)["args"]
        ders = ders_config_from_args(args)
        assert args.moe_ders == kind and ders.kind == kind
        assert (ders.delta.drop_rate if kind == "sparse" else ders.delta.rank) == (0.9 if kind == "sparse" else 4)


# --------------------------------------------------------------------------- #
# In-memory interface (what the Hugging Face import calls)
# --------------------------------------------------------------------------- #
def test_compress_experts_takes_plain_expert_tensors():
    from ders_megatron.core.config import parse_codecs
    from ders_megatron.core.decomposition import compress_experts

    gen = torch.Generator().manual_seed(0)
    base = {"fc1_gate": torch.randn(16, 8, generator=gen), "fc1_up": torch.randn(16, 8, generator=gen),
            "fc2": torch.randn(8, 16, generator=gen)}
    experts = {m: w + 0.01 * torch.randn(3, *w.shape, generator=gen) for m, w in base.items()}  # [E, O, I]
    result = compress_experts(experts, parse_codecs("svd:8"), base=base, layer_number=2)
    for matrix, module in result.deltas.items():
        assert torch.equal(result.base[matrix], base[matrix])
        for e in range(3):  # full rank of an 8-wide matrix: exact up to float32
            torch.testing.assert_close(result.base[matrix] + module.delta_weight(e), experts[matrix][e],
                                       atol=1e-5, rtol=1e-5)
    mean = compress_experts(experts, parse_codecs("quant:8"), base="mean")
    assert mean.stats["fc2"]["cosine_min"] > 0.999


# --------------------------------------------------------------------------- #
# Command line and bad input
# --------------------------------------------------------------------------- #
def cli(argv):
    import contextlib
    import io

    from ders_megatron.cli.compress import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def test_cli_prints_table_and_writes_json(dist1, trained, tmp_path):
    """--dense given and no --base: the base is the dense FFN (the paper's), named in the
    printed report, the JSON and the output checkpoint's args."""
    from ders_megatron.io.checkpoint import load_common

    report = tmp_path / "report.json"
    code, stdout, stderr = dist1.run(cli, ["--load", str(trained / "moe"), "--save", str(tmp_path / "o"),
                                           "--moe-ders-codecs", "quant:1", "--dense", str(trained / "dense"),
                                           "--eval-data", str(trained / "heldout.npy"), "--json", str(report)])[0]
    assert code == 0, stderr
    assert "MoE layers:" in stdout and "cos min" in stdout
    assert f"base dense (the FFN of {trained / 'dense'})" in stdout
    data = json.loads(report.read_text())
    assert data["codecs"] == "quant:1" and len(data["layers"]) == 2 * 3
    assert data["base"] == "dense" and data["dense"] == str(trained / "dense")
    record = load_common(tmp_path / "o")["args"].ders_compression
    assert record["base"] == "dense" and record["dense"] == str(trained / "dense")


def save_other_dense(root):
    from compress_helpers import save_dense

    save_dense(root, tiny_args(MODEL_FLAGS + ["--ffn-hidden-size", "96"]))


@pytest.mark.parametrize(
    "case,message",
    [
        ("dense-input", "not a MoE checkpoint"),
        ("ders-input", "a DeRS checkpoint"),
        ("base-wrong-shape", "not the dense model this MoE was upcycled from"),
        ("rank-too-large", "rank 100 exceeds min"),
        ("bits", "bit width must be one of"),
        ("fisher-no-calib", "need --calib-data"),
        ("dense-base-no-dense", "--base dense needs --dense"),
        ("no-base", "no base: pass --dense DIR"),  # mean/fisher only when asked for
        ("mean-base-with-dense", "--dense is read only with --base dense"),
    ],
)
def test_bad_input_fails_clearly_without_output(dist1, trained, tmp_path, case, message):
    load, extra = trained / "moe", []
    if case == "dense-input":
        load = trained / "dense"
        extra = ["--moe-ders-codecs", "dare:0.9", "--base", "mean"]
    elif case == "ders-input":
        load = tmp_path / "ders"
        dist1.run(run_compress, str(trained / "moe"), str(load), codecs="svd:2", base="mean")
        extra = ["--moe-ders-codecs", "dare:0.9", "--base", "mean"]
    elif case == "base-wrong-shape":
        other = tmp_path / "other_dense"
        dist1.run(save_other_dense, str(other))
        extra = ["--moe-ders-codecs", "dare:0.9", "--base", "dense", "--dense", str(other)]
    elif case == "rank-too-large":
        extra = ["--moe-ders-codecs", "svd:100", "--base", "mean"]
    elif case == "bits":
        extra = ["--moe-ders-codecs", "quant:5", "--base", "mean"]
    elif case == "fisher-no-calib":
        extra = ["--moe-ders-codecs", "dare:0.9", "--base", "fisher"]
    elif case == "dense-base-no-dense":
        extra = ["--moe-ders-codecs", "dare:0.9", "--base", "dense"]
    elif case == "no-base":
        extra = ["--moe-ders-codecs", "dare:0.9"]
    elif case == "mean-base-with-dense":
        extra = ["--moe-ders-codecs", "dare:0.9", "--base", "mean", "--dense", str(trained / "dense")]
    out = tmp_path / "out"
    code, _, stderr = dist1.run(cli, ["--load", str(load), "--save", str(out), *extra])[0]
    assert code == 2 and message in stderr, stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_cli_flags_are_frozen():
    from ders_megatron.cli.compress import build_parser

    flags = sorted(o for a in build_parser()._actions for o in a.option_strings)
    assert flags == sorted([
        "-h", "--help", "--load", "--save", "--hf-output", "--force", "--moe-ders-codecs", "--base", "--dense", "--moe-ders-seed",
        "--moe-ders-quant-group-size", "--moe-ders-shared-expert", "--calib-data", "--eval-data", "--seq-length",
        "--batch-size", "--calib-batches", "--eval-batches", "--file-bytes", "--json", "--trust-checkpoint",
        "--debug",  # issue 19: the traceback of a failure (one line otherwise)
        "--shared-expert-init", "--max-delta-norm",
    ])


# --------------------------------------------------------------------------- #
# Shared experts and --moe-layer-freq inputs
# --------------------------------------------------------------------------- #
def perturbed_moe(dense_root, moe_root, out_root, gate=False):
    """Vanilla MoE with a megatron shared expert on every other layer (upcycled with the
    default split init: fc2 scaled by 1/(1+g)), experts perturbed as training would;
    returns its logits."""
    from compress_helpers import batch, full_logits

    from ders_megatron.io.checkpoint import load_common, load_model, save_model
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.convert.upcycle import UpcycleConfig, upcycle_checkpoint

    upcycle_checkpoint(dense_root, moe_root, UpcycleConfig(kind="vanilla", num_experts=4, shared_expert="full",
                                                           shared_expert_gate=gate, moe_layer_freq=2))
    args = load_common(moe_root)["args"]
    with model_parallel(seed=3):
        model = build(args)
        load_model(model, moe_root)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".local_experts." in name or ".shared_experts." in name:
                    param.add_(torch.randn(param.shape, generator=gen) * 1e-3)
        save_model(model, out_root, args=args)
        return full_logits(model, batch())


def logits_of(root):
    from compress_helpers import batch, full_logits

    from ders_megatron.io.checkpoint import load_common, load_model
    from ders_megatron.testing.distributed import model_parallel

    with model_parallel(seed=9):
        model = build(load_common(root)["args"])
        load_model(model, root)
        return full_logits(model, batch())


@pytest.mark.parametrize("shared", ["full", "ders"])
def test_shared_expert_and_every_other_layer_moe(dist1, tmp_path, shared):
    from compress_helpers import save_dense

    dist1.run(save_dense, str(tmp_path / "dense"), tiny_args())
    reference = dist1.run(perturbed_moe, str(tmp_path / "dense"), str(tmp_path / "moe0"), str(tmp_path / "moe"))[0]
    report = dist1.run(run_compress, str(tmp_path / "moe"), str(tmp_path / "ders"), codecs="quant:8", base="mean",
                       shared_expert=shared)[0]
    assert [row["layer"] for row in report["layers"]] == [0] * (6 if shared == "ders" else 3)  # layer 1 is dense
    logits = dist1.run(logits_of, str(tmp_path / "ders"))[0]
    # 8-bit deltas of 1e-3 perturbations: errors ~1e-5 of the weights, ~1e-4 on logits O(1).
    torch.testing.assert_close(logits, reference, atol=2e-3, rtol=0)
    if shared == "ders":  # extended DeRS: the shared expert is base + its own delta, no full FFN
        # 5 fp32 FFNs -> 1 fp32 base + 5 x (8-bit codes + fp32 scale/offset per 32-64 elements): x1.98
        assert report["after"]["moe_bytes"] < report["before"]["moe_bytes"] / 1.9


@pytest.mark.parametrize("shared,gate", [("ders", False), ("full", True)], ids=["ders-shared", "full-shared-gate"])
def test_dense_base_is_what_the_upcycler_started_from(dist1, tmp_path, shared, gate):
    """Issue 14: the split shared-expert init scales routed and shared fc2 by 1/(1+g); the
    dense base must carry that scale. Read as the dense FFN, every fc2 came out with relative
    error ~3 and cosine ~0.31 to the original (dare:0.9), and the tool wrote it."""
    from compress_helpers import save_dense

    dist1.run(save_dense, str(tmp_path / "dense"), tiny_args())
    dist1.run(perturbed_moe, str(tmp_path / "dense"), str(tmp_path / "moe0"), str(tmp_path / "moe"), gate)
    report = dist1.run(run_compress, str(tmp_path / "moe"), str(tmp_path / "ders"), codecs="dare:0.9",
                       dense_root=str(tmp_path / "dense"), shared_expert=shared)[0]
    assert report["base"] == "dense" and report["shared_expert_init"] == "split" and report["shared_expert_init_inferred"]
    assert report["fc2_scale"] == pytest.approx(2 / 3 if gate else 1 / 2)
    assert len(report["layers"]) == (6 if shared == "ders" else 3)
    for row in report["layers"]:
        # The 1e-3 perturbations are ~2-8% of these weights (init std 0.05; fc2 0.025 x scale);
        # DARE 0.9 keeps 10% of Δ times 10, an error of 3·||Δ|| (sqrt(p/(1-p))): cosine > 0.95.
        assert row["delta_norm"] < 0.1, row
        assert row["cosine_min"] > 0.95, row
        assert row["rel_error"] < 0.3, row


def test_refuses_deltas_too_large_for_fine_tuning(dist1, tmp_path):
    """Against a wrong base (here: fc2 unscaled, --shared-expert-init copy, on a split MoE)
    the deltas are ~100% of the weights: exit 2 naming the likely cause, nothing written;
    --max-delta-norm lifts the guard."""
    from compress_helpers import save_dense

    dist1.run(save_dense, str(tmp_path / "dense"), tiny_args())
    dist1.run(perturbed_moe, str(tmp_path / "dense"), str(tmp_path / "moe0"), str(tmp_path / "moe"))
    argv = ["--load", str(tmp_path / "moe"), "--save", str(tmp_path / "out"), "--moe-ders-codecs", "dare:0.9",
            "--dense", str(tmp_path / "dense"), "--shared-expert-init", "copy"]
    code, _, stderr = dist1.run(cli, argv)[0]
    assert code == 2, stderr
    line = stderr.strip().splitlines()[-1]
    assert "layer 0 routed fc2" in line and "wrong base" in line and "--shared-expert-init copy" in line, line
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    code, _, stderr = dist1.run(cli, argv + ["--max-delta-norm", "2"])[0]
    assert code == 0, stderr


def perturbed_biased_moe(dense_root, moe_root, out_root):
    """Vanilla MoE (every layer) of a dense model with biases, each expert's weights and
    biases perturbed apart as training would; returns its logits."""
    from compress_helpers import batch, full_logits

    from ders_megatron.convert.upcycle import UpcycleConfig, upcycle_checkpoint
    from ders_megatron.io.checkpoint import load_common, save_model
    from ders_megatron.io.checkpoint import load_model
    from ders_megatron.testing.distributed import model_parallel

    upcycle_checkpoint(dense_root, moe_root, UpcycleConfig(kind="vanilla", num_experts=4))
    args = load_common(moe_root)["args"]
    with model_parallel(seed=3):
        model = build(args)
        load_model(model, moe_root)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".local_experts." in name:
                    param.add_(torch.randn(param.shape, generator=gen) * (1e-2 if name.endswith("bias") else 1e-3))
        save_model(model, out_root, args=args)
        return full_logits(model, batch())


def test_expert_biases_are_kept_per_expert(dist1, tmp_path):
    """Issue 14: a vanilla MoE with biases (--add-bias-linear) compresses (it was refused):
    each expert keeps its own trained bias (experts.biases.*), so the compressed model
    computes the vanilla one's logits up to the 8-bit deltas."""
    from compress_helpers import save_dense_with_biases

    from ders_megatron.io.checkpoint import tensor_shapes

    dist1.run(save_dense_with_biases, str(tmp_path / "dense"), tiny_args(add_bias_linear=True))
    reference = dist1.run(perturbed_biased_moe, str(tmp_path / "dense"), str(tmp_path / "moe0"),
                          str(tmp_path / "moe"))[0]
    dist1.run(run_compress, str(tmp_path / "moe"), str(tmp_path / "ders"), codecs="quant:8",
              dense_root=str(tmp_path / "dense"))
    shapes = tensor_shapes(tmp_path / "ders")
    assert shapes["decoder.layers.mlp.experts.biases.fc1"][0] == (2, 4, 2 * 64)  # [layers, experts, 2F]
    assert shapes["decoder.layers.mlp.experts.biases.fc2"][0] == (2, 4, 32)
    logits = dist1.run(logits_of, str(tmp_path / "ders"))[0]
    # 8-bit deltas of 1e-3 perturbations (~1e-5 of the weights); the biases exact. Logits O(1)
    # move by ~1e-4; a shared or missing expert bias (perturbed by 1e-2) moves them by ~1e-2.
    torch.testing.assert_close(logits, reference, atol=2e-3, rtol=0)
