"""Delta codecs and the compressed delta modules: bounds, unbiasedness, exactness,
determinism, storage sizes, and DeRS layers running them at every layout."""

import math

import pytest
import torch

from ders_megatron.core.config import SVD, CodecError, Dare, Magnitude, Quant, check_codec, parse_codec, parse_codecs
from ders_megatron.core.codecs import encode, low_rank, quantize, storage_bits
from ders_megatron.core.config import IndexedSparseDeltaConfig, QuantDeltaConfig, SparseDeltaConfig
from ders_megatron.core.deltas import build_deltas, pack_bits, unpack_bits

E, O, I = 3, 24, 32


def random_deltas(seed=0, shape=(E, O, I)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32) * 0.02


def encoded(codec, delta_EOI, layer=1, seed=7, calib=None):
    module = build_deltas(codec.delta_config(), list(range(delta_EOI.shape[0])), delta_EOI.shape[1], delta_EOI.shape[2],
                                        seed=seed, matrix="fc2")
    module.set_layer_number(layer)
    encode(codec, delta_EOI, module, calib)
    return module


def synthesized(module):
    return torch.stack([module.delta_weight(e) for e in range(module.num_experts)])


# --------------------------------------------------------------------------- #
# Bit packing and quantization
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_bits_round_trips_and_takes_ceil_bits_over_8_bytes(bits):
    codes = torch.randint(0, 2**bits, (4, 5, 37))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == math.ceil(37 * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, 37), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantization_error_is_within_half_a_step(bits):
    delta = random_deltas()
    module = encoded(Quant(bits, group_size=8), delta)
    approx = synthesized(module)
    groups = delta.unflatten(-1, (-1, 8))
    step = (groups.amax(-1) - groups.amin(-1)) / (2**bits - 1)  # the bound the bit width implies
    error = (approx - delta).abs().unflatten(-1, (-1, 8)).amax(-1)
    # float32 rounding of lo + q·step adds ~1e-9 on values ~1e-2.
    assert (error <= step / 2 + 1e-7).all()
    assert torch.allclose(module.scales, step)


def test_one_bit_is_sign_times_the_l2_optimal_group_scale():
    delta = random_deltas(1)
    module = encoded(Quant(1, group_size=16), delta)
    approx = synthesized(module)
    groups = delta.unflatten(-1, (-1, 16))
    scale = groups.abs().mean(-1, keepdim=True)
    expected = (torch.where(groups >= 0, 1.0, -1.0) * scale).flatten(-2)
    torch.testing.assert_close(approx, expected, atol=0, rtol=1e-6)
    error = (approx - delta).square().sum()
    for factor in (0.9, 1.1):  # mean |Δ| minimizes ||Δ - s·sign(Δ)||² over s
        assert error < (expected * factor - delta).square().sum()


def test_constant_group_is_exact():
    codes, step, lo = quantize(torch.full((2, 8), 0.5), 4, 8)
    assert torch.equal(codes, torch.zeros_like(codes)) and torch.equal(lo, torch.full((2, 1), 0.5))


# --------------------------------------------------------------------------- #
# DARE and magnitude
# --------------------------------------------------------------------------- #
def test_dare_keeps_seed_derived_positions_scaled_by_one_over_keep():
    delta = random_deltas(2)
    module = encoded(Dare(0.75), delta)
    kept = SparseDeltaConfig(drop_rate=0.75).kept(O, I)
    approx = synthesized(module)
    for e in range(E):
        row, col, _ = module.positions(e)
        mask = torch.zeros(O, I, dtype=torch.bool)
        mask[row, col] = True
        assert mask.sum() == kept
        torch.testing.assert_close(approx[e][mask], delta[e][mask] * (O * I / kept))
        assert (approx[e][~mask] == 0).all()


def test_dare_is_unbiased_in_expectation():
    delta = random_deltas(3, (1, 8, 16))
    draws = torch.stack([synthesized(encoded(Dare(0.5), delta, seed=s))[0] for s in range(600)])
    mean = draws.mean(0)
    # Each element is Δ·2 with probability 1/2, else 0: std |Δ| per draw, |Δ|/sqrt(600) for
    # the mean. 5 standard errors per element bounds the max over 128 elements (p < 1e-4).
    assert ((mean - delta[0]).abs() <= 5 * delta[0].abs() / math.sqrt(600) + 1e-9).all()


def test_dare_is_deterministic_in_its_seed_and_matches_the_ders_layer():
    delta = random_deltas(4)
    a, b = encoded(Dare(0.9), delta, seed=11), encoded(Dare(0.9), delta, seed=11)
    c = encoded(Dare(0.9), delta, seed=12)
    assert torch.equal(a.values, b.values) and not torch.equal(synthesized(a), synthesized(c))
    # The positions a DeRS layer re-derives from (seed, layer, expert, matrix) alone:
    layer = build_deltas(SparseDeltaConfig(drop_rate=0.9), list(range(E)), O, I, seed=11, matrix="fc2")
    layer.set_layer_number(1)
    layer.load_state_dict(a.state_dict())
    assert torch.equal(synthesized(layer), synthesized(a))


def test_magnitude_keeps_the_largest_entries_with_int32_indices():
    delta = random_deltas(5)
    module = encoded(Magnitude(0.8), delta)
    kept = IndexedSparseDeltaConfig(drop_rate=0.8).kept(O, I)
    approx = synthesized(module)
    assert module.indices.dtype == torch.int32 and module.index_bytes() == E * kept * 4
    for e in range(E):
        threshold = delta[e].abs().flatten().topk(kept).values.min()
        assert torch.equal(approx[e] != 0, delta[e].abs() >= threshold)
        torch.testing.assert_close(approx[e][approx[e] != 0], delta[e][approx[e] != 0])


# --------------------------------------------------------------------------- #
# SVD
# --------------------------------------------------------------------------- #
def test_svd_and_whitened_svd_are_exact_at_full_rank():
    delta = random_deltas(6)
    x = torch.randn(3, 200, I, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gram = x.transpose(1, 2) @ x
    for codec, calib in ((SVD(min(O, I)), None), (SVD(min(O, I), whiten=True), gram)):
        approx = synthesized(encoded(codec, delta, calib=calib))
        # Factors stored in float32: relative error ~1e-6 of |Δ| ~ 1e-2.
        torch.testing.assert_close(approx, delta, atol=1e-7, rtol=1e-4)


def test_whitened_svd_minimizes_the_output_error():
    delta = random_deltas(7, (1, O, I)).double()
    scales = torch.logspace(-2, 1, I, dtype=torch.float64)  # anisotropic inputs
    x = torch.randn(500, I, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * scales
    gram = x.t() @ x
    errors = {}
    for name, g in (("svd", None), ("wsvd", gram)):
        b, a = low_rank(delta[0], 4, g, damping=0.0)
        errors[name] = ((delta[0] - b @ a) @ x.t()).norm()
    assert errors["wsvd"] < 0.9 * errors["svd"]


# --------------------------------------------------------------------------- #
# Storage
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("spec", ["quant:1", "quant:2", "quant:3", "quant:4", "quant:8", "dare:0.9",
                                  "magnitude:0.9", "svd:4"])
def test_stored_bytes_are_as_computed(spec):
    codec = parse_codec(spec, group_size=16)
    module = encoded(codec, random_deltas(8))
    stored = sum(t.numel() * t.element_size() for n, t in module.state_dict().items() if n != "position_seed")
    assert stored * 8 == E * storage_bits(codec, O, I)
    if isinstance(codec, Quant):
        assert module.codes.dtype == torch.uint8
        assert module.codes.numel() == E * O * math.ceil(I * codec.bits / 8)
    if isinstance(codec, Dare):
        assert module.index_bytes() == 8  # one seed, no index vector


# --------------------------------------------------------------------------- #
# Module API: slices, gradients, parsing errors
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("config", [QuantDeltaConfig(bits=3, group_size=8), IndexedSparseDeltaConfig(drop_rate=0.5)],
                         ids=["quant", "indexed"])
def test_apply_matches_the_materialized_slice_and_trains(config):
    codec = Quant(3, 8) if isinstance(config, QuantDeltaConfig) else Magnitude(0.5)
    module = encoded(codec, random_deltas(9))
    x = torch.randn(5, 16)
    rows, cols = slice(4, 12), slice(16, 32)
    out = module.apply_delta(x, 1, rows, cols)
    torch.testing.assert_close(out, x @ module.delta_weight(1)[rows, cols].t())
    out.sum().backward()
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert all(not p.requires_grad for p in module.parameters() if not p.dtype.is_floating_point)


@pytest.mark.parametrize(
    "spec,message",
    [("quant:5", "bit width"), ("svd:0", "rank must be >= 1"), ("dare:1.0", "drop rate"),
     ("zip:3", "unknown codec"), ("quant:x", "cannot read")],
)
def test_impossible_codecs_are_rejected(spec, message):
    with pytest.raises(CodecError, match=message):
        parse_codec(spec)


def test_matrix_dependent_checks_name_the_matrix():
    with pytest.raises(CodecError, match="rank 40 exceeds min"):
        check_codec(SVD(40), "fc2", 32, 64)
    with pytest.raises(CodecError, match="must divide the fc2"):
        check_codec(Quant(4, 24), "fc2", 32, 64)
    with pytest.raises(CodecError, match="keeps no element"):
        check_codec(Dare(0.99999), "fc2", 32, 64)
    table = parse_codecs("fc1:quant:4,fc2:svd:8")
    assert set(table) == {"fc1", "fc2"} and isinstance(table["fc2"], SVD)


# --------------------------------------------------------------------------- #
# DeRS layers run compressed deltas: reference equivalence and layout parity
# --------------------------------------------------------------------------- #
SPECS = ["quant:3", "magnitude:0.8", "fc1:quant:1,fc2:svd:4"]


def _fill_compressed(model_or_layer, spec, seed=0):
    """Encode random deltas into every compressed delta module (deterministic)."""
    table = parse_codecs(spec, group_size=16)
    from ders_megatron.core.config import codec_for

    gen = torch.Generator().manual_seed(seed)
    for name, module in sorted(model_or_layer.named_modules(), key=lambda item: item[0]):
        if name.endswith(".deltas") or name == "deltas":
            for matrix, deltas in module.items():
                shape = (deltas.num_experts, deltas.out_features, deltas.in_features)
                encode(codec_for(table, matrix), torch.randn(shape, generator=gen) * 0.05, deltas)


def _ders(spec):
    from ders_megatron.core.config import codecs_delta_config as delta_config
    from ders_megatron.core.config import DeRSConfig

    return DeRSConfig(delta=delta_config(parse_codecs(spec, group_size=16), ["fc1_gate", "fc1_up", "fc2"]))


def compressed_layer_equals_reference(spec):
    """One MoE layer: DeRS experts with compressed deltas == SequentialMLP with W_base + Δ̂_e."""
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import tiny_config
    from ders_megatron.testing.reference import build_moe_layers, load_synthesized

    with model_parallel():
        config = tiny_config()
        ders_layer, vanilla = build_moe_layers(config, _ders(spec))
        _fill_compressed(ders_layer, spec)
        load_synthesized(ders_layer, vanilla)
        x = torch.randn(8, 2, config.hidden_size, generator=torch.Generator().manual_seed(0))
        outputs = [layer(x)[0] for layer in (ders_layer, vanilla)]
    # Same float32 products re-associated (x·W_base + x·Δ̂ vs x·(W_base + Δ̂)): a few ulps.
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("spec", SPECS)
def test_ders_layer_runs_compressed_deltas_like_the_reference(dist1, spec):
    dist1.run(compressed_layer_equals_reference, spec)


def compressed_gpt_layouts(spec):
    """Loss and every gradient at TP=2 / EP=2 / both equal world size 1 (compressed deltas
    sliced by TP like the base, uint8/int32 parts sharded over EP)."""
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import build_gpt, tiny_config
    from ders_megatron.testing.parity import ATOL, RTOL, assert_grads_close, loss_and_grads
    from ders_megatron.testing.sharding import full_tensors

    ders = _ders(spec)
    with model_parallel():
        model = build_gpt(tiny_config(), ders=ders)
        _fill_compressed(model, spec)
        reference = full_tensors(model)
        ref_loss, _, ref_grads = loss_and_grads({}, ders, reference=reference)
    for layout in (dict(tp=2), dict(ep=2), dict(tp=2, ep=2, etp=1)):
        with model_parallel(**layout):
            loss, _, grads = loss_and_grads({}, ders, reference=reference)
        torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=RTOL)
        assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("spec", SPECS)
def test_compressed_deltas_match_single_rank_at_every_layout(dist2, spec):
    dist2.run(compressed_gpt_layouts, spec)


def test_bit_packing_stays_on_the_codes_device():
    """pack/unpack build their bit masks on the codes' device: with CPU masks the first
    CUDA forward of a quant:K model crashed (issue 16). The meta device stands in for CUDA
    (same device check, no GPU needed); the export's remote-code copy is checked too."""
    from ders_megatron.convert.hf import modeling_ders_moe as remote

    codes = torch.zeros(3, 16, dtype=torch.int32, device="meta")
    for bits in (1, 3, 4, 8):
        packed = pack_bits(codes, bits)
        assert packed.device.type == "meta" and packed.shape == (3, math.ceil(16 * bits / 8))
        assert unpack_bits(packed, bits, 16).device.type == "meta"
        assert remote.unpack_bits(packed, bits, 16).device.type == "meta"


def _scale_parts(deltas):
    """A quant module's fp32 group scales and (k >= 2) offsets."""
    return [getattr(deltas, name) for name in ("scales", "offsets") if hasattr(deltas, name)]


def quant_scales_under_float16_module(spec):
    """A quant-codec DeRS layer wrapped in megatron's Float16Module (bf16): (scale/offset
    dtypes, whether each kept its fp32 value, max |Δ̂| difference to fp32, max |output
    difference| to the unwrapped layer run with bf16 base weights and fp32 scales)."""
    from megatron.core.transformer.module import Float16Module

    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import tiny_config
    from ders_megatron.testing.reference import build_moe_layers

    with model_parallel():
        config = tiny_config(bf16=True, moe_router_dtype="fp32")
        layer = build_moe_layers(config, _ders(spec))[0]
        _fill_compressed(layer, spec)
        quant = {m: d for m, d in layer.experts.deltas.items() if hasattr(d, "scales")}
        before = {m: [p.detach().clone() for p in _scale_parts(d)] for m, d in quant.items()}
        delta_before = {m: synthesized(d) for m, d in quant.items()}
        reference = build_moe_layers(config, _ders(spec))[0]  # the intended numerics: every float bf16 but the fp32 scales
        reference.load_state_dict(layer.state_dict())
        for module in reference.modules():
            for name, param in module.named_parameters(recurse=False):
                if param.is_floating_point() and name not in ("scales", "offsets"):
                    param.data = param.data.bfloat16()
        wrapped = Float16Module(config, layer)
        dtypes = sorted({str(p.dtype) for d in quant.values() for p in _scale_parts(d)})
        kept = all(torch.equal(p, q) for m, d in quant.items() for p, q in zip(_scale_parts(d), before[m]))
        delta_diff = max(float((synthesized(d) - delta_before[m]).abs().max()) for m, d in quant.items())
        x = torch.randn(8, 2, config.hidden_size, generator=torch.Generator().manual_seed(0)).bfloat16()
        with torch.no_grad():
            out = wrapped(x, fp32_output=False)[0]
            ref = reference(x)[0]
        return dtypes, kept, delta_diff, float((out.float() - ref.float()).abs().max())


@pytest.mark.parametrize("spec", ["quant:1", "quant:3"])
def test_quant_scales_stay_fp32_under_float16_module(dist1, spec):
    """Issue 16 defect 8: Float16Module's module.bfloat16() rounded the fp32 group scales
    and offsets to bf16 (a different Δ̂ than the one compressed). They stay fp32 now: Δ̂ is
    bit for bit the fp32 one, and the wrapped layer computes what a bf16 layer with fp32
    scales computes (same ops on the same values: equal)."""
    dtypes, kept, delta_diff, out_diff = dist1.run(quant_scales_under_float16_module, spec)[0]
    assert dtypes == ["torch.float32"]
    assert kept and delta_diff == 0.0
    assert out_diff == 0.0
