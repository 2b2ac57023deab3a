"""Fused DeRS MoE layer: equals the drop-in experts and the synthesized-weight reference.

Three implementations of the same weights are compared:

* reference: megatron-core's own ``MoELayer`` + ``SequentialMLP`` with W_e = W_base + Δ_e;
* drop-in: ``MoELayer`` with ``DeRSExperts`` (tests/test_ders_experts.py ties it to the reference);
* fused: ``FusedDeRSMoELayer`` (no dispatch; linearity; the low-rank SwiGLU kernel).
"""

import contextlib
import dataclasses
import pytest
import torch

from ders_megatron.core.config import DenseDeltaConfig, IndexedSparseDeltaConfig, LowRankDeltaConfig, SparseDeltaConfig
from ders_megatron.core.config import DeRSConfig

KINDS = {
    "lowrank": LowRankDeltaConfig(rank=3, alpha=6.0),
    "sparse": SparseDeltaConfig(drop_rate=0.9),
    "dense": DenseDeltaConfig(),
}
# The magnitude codec's module (values at stored indices) runs the sparse kernel too.
CODEC_KINDS = {"magnitude": IndexedSparseDeltaConfig(drop_rate=0.9)}


@torch.no_grad()
def random_unique_indices(layer, seed=0):
    """randomize_deltas fills integer index parameters with noise: give each expert distinct,
    sorted random positions instead (what the magnitude codec stores)."""
    from ders_megatron.core.deltas import sample_unique

    for deltas in layer.experts.deltas.values():
        if hasattr(deltas, "indices"):
            for e in range(deltas.num_experts):
                flat = sample_unique(deltas.out_features * deltas.in_features, deltas.kept, seed + e)
                deltas.indices[e].copy_(flat.to(deltas.indices.dtype))

# float32. The fused layer computes W2_base(Σ_s p_s h_s) + Σ_s p_s Δ2 h_s where the
# reference computes Σ_s p_s (W_base + Δ)_e h_s: the same O(1) terms summed in another
# order (and x·W_base + x·Δ vs x·(W_base + Δ)), a few ulps; gradients sum up to 4·k such
# terms per expert. 1e-5 absolute / 1e-4 relative is far above that and far below any
# real error (a wrong slice, slot or scale gives O(1e-2) and up).
ATOL, RTOL = 1e-5, 1e-4

# Layer-level cases: (kind, top-k, config overrides). Lowrank + SwiGLU runs the fused kernel,
# everything else the generic path; both see top-1/2/4.
SWIGLU = {}
# megatron needs pre-softmax routing for top-1 (transformer_config.py:2336); top-4 gets 8 experts.
TOPK = {1: dict(moe_router_pre_softmax=True), 2: {}, 4: dict(num_moe_experts=8)}
GELU_BIAS = dict(gated_linear_unit=False, activation_func=torch.nn.functional.gelu, add_bias_linear=True)
LAYER_CASES = [
    (kind, topk, dict(SWIGLU, **TOPK[topk])) for kind in KINDS for topk in (1, 2, 4)
] + [
    ("lowrank", 2, dict(add_bias_linear=True)),  # fused kernel with base biases
    ("lowrank", 2, GELU_BIAS),  # generic path for low-rank
    ("sparse", 2, GELU_BIAS),
    ("lowrank", 2, dict(moe_ffn_hidden_size=48)),
    # megatron router features: they live in the shared TopKRouter, the fused layer must keep them.
    ("lowrank", 2, dict(moe_router_pre_softmax=True, moe_z_loss_coeff=1e-3)),
    ("lowrank", 2, dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                        moe_router_topk_scaling_factor=2.0, moe_router_load_balancing_type="seq_aux_loss")),
    # token dropping: capacity 1.0 drops pairs at these sizes; padding adds zero-probability pairs.
    ("lowrank", 2, dict(moe_expert_capacity_factor=1.0)),
    ("sparse", 2, dict(moe_expert_capacity_factor=1.0)),
    ("lowrank", 2, dict(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True)),
    ("lowrank", 2, dict(moe_shared_expert_intermediate_size=64, moe_shared_expert_gate=True)),
]


def _run_layer(layer, x, upstream):
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    tracker.clear()
    x = x.clone().requires_grad_(True)
    out, bias = layer(x)
    assert bias is None
    (out * upstream).sum().backward()
    aux = {name: entry.values.clone() for name, entry in tracker.metrics.items()}
    return out.detach(), x.grad, aux


def _assert_close(got, want, what):
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def fused_equals_dropin_and_reference(cases, extended_shared=False):
    """Every case: fused ≡ drop-in ≡ SequentialMLP reference (outputs, aux losses, grads)."""
    from ders_megatron.layers.specs import ders_moe_spec
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import tiny_config
    from ders_megatron.testing.reference import (
        build_moe_layers, expected_grads, load_synthesized, randomize_deltas,
    )

    for kind, topk, overrides in cases:
        case = f"{kind} top-{topk} {overrides}"
        with model_parallel():
            config = tiny_config(moe_router_topk=topk, **overrides)
            ders = DeRSConfig(delta={**KINDS, **CODEC_KINDS}[kind], extended_shared_expert=extended_shared)
            dropin, vanilla = build_moe_layers(config, ders)
            randomize_deltas(dropin)
            random_unique_indices(dropin)
            load_synthesized(dropin, vanilla)
            # kernel_tile 3: several tiles per expert, and ragged last tiles
            fused = ders_moe_spec(dataclasses.replace(ders, impl="fused", kernel_tile=3))(config=config)
            fused.set_layer_number(1)
            fused.load_state_dict(dropin.state_dict())
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(12, 2, config.hidden_size, generator=gen)
            upstream = torch.randn(x.shape, generator=gen)
            runs = {name: _run_layer(layer, x, upstream) for name, layer in
                    (("fused", fused), ("dropin", dropin), ("reference", vanilla))}
            for other in ("dropin", "reference"):
                for i, what in enumerate(("output", "input grad")):
                    _assert_close(runs["fused"][i], runs[other][i], f"{case} {what} vs {other}")
                assert runs["fused"][2].keys() == runs[other][2].keys(), case
                for name, value in runs[other][2].items():
                    _assert_close(runs["fused"][2][name], value, f"{case} {name} vs {other}")
            assert runs["fused"][2], f"{case}: no router aux loss was recorded"
            for name, param in vanilla.router.named_parameters():
                _assert_close(fused.router.get_parameter(name).grad, param.grad, f"{case} router.{name}")
            if fused.router.expert_bias is not None:  # updated from the same routing map
                _assert_close(fused.router.local_tokens_per_expert, vanilla.router.local_tokens_per_expert, case)
            expected = expected_grads(dropin, vanilla)
            got = {n: p.grad for n, p in fused.named_parameters() if not n.startswith("router.") and p.requires_grad}
            dropin_grads = {n: p.grad for n, p in dropin.named_parameters()
                            if not n.startswith("router.") and p.requires_grad}
            assert got.keys() == expected.keys() == dropin_grads.keys(), case
            for name, grad in expected.items():
                assert grad.abs().sum() > 0, f"vacuous: zero reference gradient for {name} ({case})"
                _assert_close(got[name], grad, f"{case} {name} vs reference")
                _assert_close(got[name], dropin_grads[name], f"{case} {name} vs dropin")
    return len(cases)


def test_fused_equals_dropin_and_reference_ws1(dist1):
    assert dist1.run(fused_equals_dropin_and_reference, LAYER_CASES) == [len(LAYER_CASES)]


# The sparse kernel takes, per expert product, the CSR form or the gather form (tiny deltas,
# layers/sparse_compute.py:gather_form_applies); at these sizes the rule picks CSR, so the
# gather form (everywhere, or for one of the two products) is forced here.
GATHER_FORMS = {
    "gather": lambda index: True,
    "gather gate/up, CSR fc2": lambda index: index.shape[0] > index.shape[1],  # [2F, H] vs [H, F]
    "CSR gate/up, gather fc2": lambda index: index.shape[0] < index.shape[1],
}


@contextlib.contextmanager
def sparse_form(name):
    from ders_megatron.layers import sparse_compute

    rule = sparse_compute.gather_form_applies
    sparse_compute.gather_form_applies = GATHER_FORMS[name]
    try:
        yield
    finally:
        sparse_compute.gather_form_applies = rule


def sparse_gather_form_equals_dropin_and_reference(form):
    cases = [("sparse", topk, dict(TOPK[topk])) for topk in (1, 2, 4)]
    cases += [("sparse", 2, dict(moe_expert_capacity_factor=1.0)), ("magnitude", 2, {})]
    with sparse_form(form):
        return fused_equals_dropin_and_reference(cases)


@pytest.mark.parametrize("form", list(GATHER_FORMS))
def test_sparse_gather_form_equals_dropin_and_reference_ws1(dist1, form):
    assert dist1.run(sparse_gather_form_equals_dropin_and_reference, form) == [5]


MAGNITUDE_CASES = [("magnitude", topk, dict(TOPK[topk])) for topk in (1, 2, 4)] + [
    ("magnitude", 2, GELU_BIAS),  # generic path: the sparse product without the tiled kernel
]


def test_magnitude_codec_equals_dropin_and_reference_ws1(dist1):
    assert dist1.run(fused_equals_dropin_and_reference, MAGNITUDE_CASES) == [len(MAGNITUDE_CASES)]


def dispatched_rows(hidden: int, upstream_rows: int):
    """What a dispatcher hands 4 local experts: 15 rows (5, 0, 7, 3 per expert), their
    router probabilities, and an upstream gradient of ``upstream_rows`` rows (padding
    rows beyond 15), drawn from a seed-0 generator in that order."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(15, hidden, generator=gen)  # [rows, hidden]
    probs = torch.rand(15, generator=gen)  # [rows]
    upstream = torch.randn(upstream_rows, hidden, generator=gen)  # [upstream_rows, hidden]
    return torch.tensor([5, 0, 7, 3]), x, probs, upstream


def test_fused_with_extended_ders_shared_expert(dist1):
    shared = dict(moe_shared_expert_intermediate_size=64, moe_shared_expert_gate=True)
    cases = [("lowrank", 2, shared), ("sparse", 1, dict(shared, **TOPK[1]))]
    dist1.run(fused_equals_dropin_and_reference, cases, extended_shared=True)


def kernel_on_dispatched_rows_equals_dropin(kind):
    """The drop-in experts' kernel path ≡ their unfused path (every delta kind's reference)."""
    from ders_megatron.layers.expert_compute import dropin_lowrank_swiglu, dropin_sparse_swiglu
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import tiny_config
    from ders_megatron.testing.reference import build_moe_layers, randomize_deltas

    kernel = dropin_lowrank_swiglu if kind == "lowrank" else dropin_sparse_swiglu
    with model_parallel():
        config = tiny_config(add_bias_linear=True)
        layer = build_moe_layers(config, DeRSConfig(delta={**KINDS, **CODEC_KINDS}[kind]))[0]
        experts = layer.experts
        randomize_deltas(experts)
        random_unique_indices(layer)
        tokens_per_expert, x, probs, upstream = dispatched_rows(config.hidden_size, upstream_rows=15)
        grads = []
        assert experts.uses_lowrank_kernel() if kind == "lowrank" else experts.uses_sparse_kernel()
        for fn in (experts.forward_unfused, lambda *a: (kernel(experts, *a, tile=2), None), experts.forward):
            experts.zero_grad()
            inputs = [x.clone().requires_grad_(True), tokens_per_expert, probs.clone().requires_grad_(True)]
            out, _ = fn(*inputs)
            (out * upstream).sum().backward()
            grads.append([out, inputs[0].grad, inputs[2].grad]
                         + [p.grad.clone() for p in experts.parameters() if p.requires_grad])
        for path, result in zip(("kernel, tile 2", "forward"), grads[1:]):
            for got, want in zip(result, grads[0]):
                _assert_close(got, want, f"{kind} {path} vs DeRSExperts.forward_unfused")


@pytest.mark.parametrize("kind", ["lowrank", "sparse", "magnitude"])
def test_kernel_on_dispatched_rows_equals_dropin(dist1, kind):
    dist1.run(kernel_on_dispatched_rows_equals_dropin, kind)


class NanAllocations:
    """``new_empty`` / ``empty_like`` return NaN-filled floats inside the block: memory a
    kernel leaves unwritten then shows as NaN instead of whatever the allocator held."""

    def __enter__(self):
        self.new_empty, self.empty_like = torch.Tensor.new_empty, torch.empty_like
        new_empty, empty_like = self.new_empty, self.empty_like
        torch.Tensor.new_empty = lambda t, *a, **k: _nan_fill(new_empty(t, *a, **k))
        torch.empty_like = lambda *a, **k: _nan_fill(empty_like(*a, **k))
        return self

    def __exit__(self, *exc):
        torch.Tensor.new_empty, torch.empty_like = self.new_empty, self.empty_like


def _nan_fill(t):
    return t.fill_(float("nan")) if t.is_floating_point() else t


def padding_rows_reach_no_gradient(kind, padding):
    """A dispatcher's padding rows past sum(tokens_per_expert) (HybridEP's static budget)
    change no gradient: the experts on 15 counted rows + 5 padding rows equal the experts on
    the 15 rows alone (outputs, input/prob grads, every base and delta weight grad), the
    padding rows' outputs and input grads are zeros. ``padding``: "nan-rows" fills the
    padding rows (input and probs) with NaN; "nan-buffers" leaves them zero but makes every
    uninitialised kernel buffer NaN."""
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import tiny_config
    from ders_megatron.testing.reference import build_moe_layers, randomize_deltas

    with model_parallel():
        config = tiny_config()
        experts = build_moe_layers(config, DeRSConfig(delta={**KINDS, **CODEC_KINDS}[kind]))[0].experts
        randomize_deltas(experts)
        tokens_per_expert, x, probs, upstream = dispatched_rows(config.hidden_size, upstream_rows=20)
        fill = float("nan") if padding == "nan-rows" else 0.0
        runs = []
        for rows in (15, 20):
            experts.zero_grad()
            x_in = torch.cat([x, torch.full((rows - 15, x.shape[1]), fill)]).requires_grad_(True)
            p_in = torch.cat([probs, torch.full((rows - 15,), fill)]).requires_grad_(True)
            with NanAllocations() if padding == "nan-buffers" else contextlib.nullcontext():
                out, _ = experts(x_in, tokens_per_expert, p_in)
                (out * upstream[:rows]).sum().backward()
            runs.append([out, x_in.grad, p_in.grad] + [p.grad.clone() for p in experts.parameters() if p.requires_grad])
        (out, dx, dp, *grads), padded = runs
        names = [n for n, p in experts.named_parameters() if p.requires_grad]
        assert len(grads) == len(names) >= 4  # base fc1/fc2 and the deltas
        for what, got, want in zip(["output", "input grad", "probs grad"] + names,
                                   padded, [out, dx, dp, *grads]):
            got = got[:15] if what in ("output", "input grad", "probs grad") else got
            assert torch.isfinite(got).all(), f"{kind} {padding}: {what} not finite"
            _assert_close(got, want, f"{kind} {padding}: {what} with padding rows vs without")
        assert torch.equal(padded[0][15:], torch.zeros(5, config.hidden_size)), "padding rows' output"
        assert torch.equal(padded[1][15:], torch.zeros(5, config.hidden_size)), "padding rows' input grad"


@pytest.mark.parametrize("padding", ["nan-rows", "nan-buffers"])
@pytest.mark.parametrize("kind", ["lowrank", "sparse", "dense"])
def test_padding_rows_reach_no_gradient(dist1, kind, padding):
    """Issue 16 defect 8: the kernels' new_empty rows past the counted ones reached the
    base weight gradients; the unfused path split the rows by the counts and failed."""
    dist1.run(padding_rows_reach_no_gradient, kind, padding)


def fused_kernels_write_every_row(kind):
    """The fused layer's kernels allocate hbar / d(base) with new_empty and write every row
    (each token's slot-0 pair): with NaN-filled allocations the outputs and grads are the same."""
    from ders_megatron.layers.specs import ders_moe_spec
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import tiny_config
    from ders_megatron.testing.reference import randomize_deltas

    with model_parallel():
        config = tiny_config()
        fused = ders_moe_spec(DeRSConfig(delta=KINDS[kind], impl="fused", kernel_tile=3))(config=config)
        fused.set_layer_number(1)
        randomize_deltas(fused)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(6, 2, config.hidden_size, generator=gen)
        upstream = torch.randn(x.shape, generator=gen)
        runs = []
        for allocations in (contextlib.nullcontext(), NanAllocations()):
            fused.zero_grad()
            with allocations:
                out, x_grad, _ = _run_layer(fused, x, upstream)
            runs.append([out, x_grad] + [p.grad.clone() for p in fused.parameters() if p.requires_grad])
        for i, (got, want) in enumerate(zip(runs[1], runs[0])):
            assert torch.equal(got, want), f"{kind}: tensor {i} differs with NaN-filled allocations"


@pytest.mark.parametrize("kind", ["lowrank", "sparse"])
def test_fused_kernels_write_every_row(dist1, kind):
    dist1.run(fused_kernels_write_every_row, kind)


def test_kernel_refuses_rows_no_pair_covers():
    from ders_megatron.layers.expert_compute import PairOrder

    pairs = PairOrder.rows(torch.tensor([2, 1]), "cpu")
    pairs.require_every_row(3)
    with pytest.raises(ValueError, match="4 rows but 3"):
        pairs.require_every_row(4)


def kernel_on_no_rows(kind):
    """An EP rank may receive no tokens at all: the kernel path returns [0, H] and zero grads."""
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import tiny_config
    from ders_megatron.testing.reference import build_moe_layers, randomize_deltas

    with model_parallel():
        config = tiny_config()
        experts = build_moe_layers(config, DeRSConfig(delta=KINDS[kind]))[0].experts
        randomize_deltas(experts)
        assert experts.uses_lowrank_kernel() if kind == "lowrank" else experts.uses_sparse_kernel()
        x = torch.randn(0, config.hidden_size, requires_grad=True)
        out, _ = experts(x, torch.zeros(experts.num_local_experts, dtype=torch.long), torch.rand(0))
        out.sum().backward()
        assert out.shape == (0, config.hidden_size)
        assert all(p.grad is None or not p.grad.any() for p in experts.parameters())


@pytest.mark.parametrize("kind", ["lowrank", "sparse"])
def test_kernel_on_no_rows(dist1, kind):
    dist1.run(kernel_on_no_rows, kind)


def sparse_kernel_keeps_dropped_positions_and_builds_no_dense_delta(form=None):
    """DeRS-SM: one training step of the fused kernel (frozen base) creates no tensor shaped like
    any expert matrix [O, I] (forward or backward), and the step leaves every dropped position of
    every Δ_e at exactly zero while the kept ones move."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from ders_megatron.layers.specs import ders_moe_spec
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import tiny_config
    from ders_megatron.testing.reference import randomize_deltas

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:  # new dense storage only: views and sparse (CSR) tensors are no Δ
                self.seen.update((tuple(t.shape), str(func)) for t in tree_flatten(out)[0]
                                 if isinstance(t, torch.Tensor) and t.layout == torch.strided)
            return out

    for impl in ("fused", "dropin"):
        with model_parallel():
            config = tiny_config(moe_router_topk=2)
            ders = DeRSConfig(delta=SparseDeltaConfig(drop_rate=0.7), impl=impl, freeze_base=True)
            layer = ders_moe_spec(ders)(config=config)
            layer.set_layer_number(1)
            randomize_deltas(layer)
            deltas = layer.experts.deltas
            before = {m: [d.delta_weight(e) for e in range(d.num_experts)] for m, d in deltas.items()}
            # 20 tokens: > 1/density pairs per expert (the old generic path built a dense Δ there),
            # and no tile or activation shaped like a delta matrix ([64, 32], [32, 64]).
            x = torch.randn(20, 1, config.hidden_size, requires_grad=True)
            shapes = Shapes()
            with shapes, (sparse_form(form) if form else contextlib.nullcontext()):
                out, _ = layer(x)
                out.square().sum().backward()
            matrices = {(d.out_features, d.in_features) for d in deltas.values()}
            built = {s for s in shapes.seen if s[0] in matrices}
            assert not built, f"{impl}: a dense [O, I] tensor was built: {built}"
            with torch.no_grad():
                for d in deltas.values():
                    d.values -= 0.1 * d.values.grad
            for m, d in deltas.items():
                moved = 0
                for e in range(d.num_experts):
                    after = d.delta_weight(e)
                    row, col, _ = d.positions(e)
                    kept = torch.zeros_like(after, dtype=torch.bool).index_put((row, col), torch.tensor(True))
                    assert not after[~kept].any(), f"{impl} {m} expert {e}: a dropped position moved"
                    moved += not torch.equal(after[kept], before[m][e][kept])
                assert moved, f"{impl} {m}: no kept value moved (vacuous)"


@pytest.mark.parametrize("form", [None, "gather"])
def test_sparse_kernel_keeps_dropped_positions_and_builds_no_dense_delta(dist1, form):
    dist1.run(sparse_kernel_keeps_dropped_positions_and_builds_no_dense_delta, form)


# --------------------------------------------------------------------------- #
# World size 2: fused at TP=2 + SP (and TP=2, expert-TP 1) against drop-in at world size 1.
# --------------------------------------------------------------------------- #
FUSED_LAYOUTS = [dict(), dict(tp=2), dict(tp=2, etp=1)]

# Same float32 comparison as testing/parity.py (whole 2-layer GPT, DDP, finalize_model_grads):
# sharded runs add TP partial sums in another order, a few ulps amplified through 2 layers
# and the softmax; 1e-5 / 1e-4 covers it, real bugs give 1e-2 and up.
GPT_ATOL, GPT_RTOL = 1e-5, 1e-4


def fused_gpt_matches_dropin(kind, topk, overrides=None, against_ws1=True):
    """Drop-in at world size 1 holds the weights; at each layout the fused model loads them
    and must match the drop-in model at that layout and (``against_ws1``) at world size 1.

    ``against_ws1=False`` for token dropping: the router drops per sequence-parallel chunk,
    so a TP layout drops other pairs than world size 1, in megatron and in both DeRS paths.
    """
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.parity import assert_grads_close, loss_and_grads

    overrides = dict(moe_router_topk=topk, **(overrides or {}))
    dropin = DeRSConfig(delta={**KINDS, **CODEC_KINDS}[kind])
    fused = DeRSConfig(delta={**KINDS, **CODEC_KINDS}[kind], impl="fused")
    with model_parallel():
        ref_loss, ref_params, ref_grads = loss_and_grads(overrides, dropin, perturb=0.05)
    dead = [name for name, grad in ref_grads.items() if not grad.abs().sum() > 0]
    assert not dead, f"vacuous comparison: zero reference gradients for {dead}"
    for layout in FUSED_LAYOUTS:
        with model_parallel(**layout):
            loss, _, grads = loss_and_grads(overrides, fused, reference=ref_params)
            wants = [loss_and_grads(overrides, dropin, reference=ref_params)]
        if against_ws1:
            wants.append((ref_loss, None, ref_grads))
        for want_loss, _, want_grads in wants:
            torch.testing.assert_close(loss, want_loss, atol=GPT_ATOL, rtol=GPT_RTOL, msg=lambda m: f"{layout}: {m}")
            assert_grads_close(grads, want_grads, atol=GPT_ATOL, rtol=GPT_RTOL)
    return ref_loss.item()


@pytest.mark.parametrize("kind", sorted({**KINDS, **CODEC_KINDS}))
def test_fused_tp2_sp_equals_dropin_ws1(dist2, kind):
    for topk in (1, 2, 4):
        dist2.run(fused_gpt_matches_dropin, kind, topk, TOPK[topk])


def test_fused_tp2_with_shared_expert_and_capacity(dist2):
    # Padding to capacity: megatron's alltoall dispatcher under TP=2 fails on uneven
    # per-rank token counts when pairs are dropped without it (gloo all_gather sizes).
    shared = dict(moe_shared_expert_intermediate_size=64, moe_expert_capacity_factor=1.0,
                  moe_pad_expert_input_to_capacity=True)
    dist2.run(fused_gpt_matches_dropin, "lowrank", 2, shared, against_ws1=False)


# --------------------------------------------------------------------------- #
# Checkpoints: written by one implementation, read by the other.
# --------------------------------------------------------------------------- #
def _full_logits(model, batch):
    from megatron.core import parallel_state
    from torch import distributed as dist

    model.eval()
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], None)
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(group.size())]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def checkpoint_across_impls(ckpt_dir, kind, save_impl, save_layout, load_impl, load_layout):
    import os

    from megatron.core import dist_checkpointing

    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import build_gpt, tiny_batch, tiny_config
    from ders_megatron.testing.parity import perturb_deltas

    os.makedirs(ckpt_dir, exist_ok=True)
    batch = tiny_batch()
    with model_parallel(**save_layout, seed=7):
        saved = build_gpt(tiny_config(), ders=DeRSConfig(delta=KINDS[kind], impl=save_impl))
        perturb_deltas(saved, 0.05)
        dist_checkpointing.save(saved.sharded_state_dict(), ckpt_dir)
        saved_logits = _full_logits(saved, batch)
    with model_parallel(**load_layout, seed=99):  # another seed: a different fresh init
        loaded = build_gpt(tiny_config(), ders=DeRSConfig(delta=KINDS[kind], impl=load_impl))
        before = _full_logits(loaded, batch)
        loaded.load_state_dict(dist_checkpointing.load(loaded.sharded_state_dict(), ckpt_dir))
        loaded_logits = _full_logits(loaded, batch)
    assert not torch.allclose(before, saved_logits), "the fresh model already matched: vacuous"
    # Same weights, the other implementation (and maybe layout): partial sums in another
    # order, a few ulps of O(1) logits through 2 layers.
    torch.testing.assert_close(loaded_logits, saved_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_checkpoint_dropin_and_fused_load_each_other(dist2, tmp_path, kind):
    runs = [
        ("dropin", dict(), "fused", dict()),
        ("fused", dict(), "dropin", dict()),
        ("dropin", dict(tp=2), "fused", dict(tp=2)),
        ("fused", dict(tp=2), "dropin", dict(tp=2)),
        ("dropin", dict(ep=2), "fused", dict(tp=2)),  # drop-in trained with EP, served fused
    ]
    for i, (save_impl, save_layout, load_impl, load_layout) in enumerate(runs):
        dist2.run(checkpoint_across_impls, str(tmp_path / str(i)), kind, save_impl, save_layout, load_impl, load_layout)


def same_state_dict_keys():
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import build_gpt, tiny_config

    with model_parallel(tp=2):
        models = {impl: build_gpt(tiny_config(), ders=DeRSConfig(impl=impl)) for impl in ("dropin", "fused")}
        params = {impl: {n: tuple(p.shape) for n, p in m.named_parameters()} for impl, m in models.items()}
        sharded = {
            impl: {k: (v.global_shape, v.global_offset, v.replica_id) for k, v in m.sharded_state_dict().items()
                   if hasattr(v, "global_shape")}
            for impl, m in models.items()
        }
    assert params["dropin"] == params["fused"]
    assert sharded["dropin"] == sharded["fused"]
    return sorted(params["fused"])


def test_parameter_names_and_sharded_layout_equal_dropin(dist2):
    names = dist2.run(same_state_dict_keys)[0]
    assert "decoder.layers.0.mlp.experts.deltas.fc1_gate.lora_A" in names
    assert "decoder.layers.0.mlp.router.weight" in names


# --------------------------------------------------------------------------- #
# Routing slots, clear errors, benchmark smoke test.
# --------------------------------------------------------------------------- #
def test_routed_slots_keep_every_nonzero_pair():
    from ders_megatron.layers.fused import routed_slots

    probs = torch.tensor([[0.6, 0.0, 0.4, 0.0], [0.0, 0.0, 0.7, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # token 1 lost a pair to capacity (its map entry is False); token 2 lost both but
    # carries a padded, zero-probability pair (pad_to_capacity).
    routing_map = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
    idx, p = routed_slots(probs, routing_map, topk=2)
    assert set(idx[0].tolist()) == {0, 2} and sorted(p[0].tolist()) == pytest.approx([0.4, 0.6])
    assert 2 in idx[1].tolist() and sorted(p[1].tolist()) == pytest.approx([0.0, 0.7])
    assert p[2].tolist() == [0.0, 0.0]


def test_cpu_tile_rows_follow_ffn_width():
    from ders_megatron.layers.expert_compute import cpu_token_tile

    assert [cpu_token_tile(f) for f in (1024, 1536, 2048, 4096, 8192, 10**6)] == [1024, 512, 512, 256, 128, 16]


def build_expecting_error(layout, overrides, impl="fused"):
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import build_gpt, tiny_config

    with model_parallel(**layout):
        try:
            build_gpt(tiny_config(**overrides), ders=DeRSConfig(impl=impl))
        except ValueError as err:
            return str(err)
    return "no error"


@pytest.mark.parametrize(
    "layout,overrides,message",
    [
        (dict(ep=2), {}, "--expert-model-parallel-size 1"),
        (dict(), dict(moe_router_topk=1, moe_router_pre_softmax=True, moe_apply_probs_on_input=True),
         "--moe-apply-probs-on-input"),
        (dict(), dict(moe_shared_expert_intermediate_size=64, moe_shared_expert_overlap=True),
         "--moe-shared-expert-overlap"),
    ],
    ids=["expert-parallel", "probs-on-input", "shared-expert-overlap"],
)
def test_unsupported_settings_fail_clearly(dist2, layout, overrides, message):
    for text in dist2.run(build_expecting_error, layout, overrides):
        assert message in text


def bench_smoke(json_path):
    from ders_megatron.cli.bench_moe_layer import bench_moe_layer_main

    argv = ["--hidden-size", "32", "--ffn-hidden-size", "64", "--tokens", "16", "--topk", "1", "2",
            "--ranks", "2", "--drop-rates", "0.5", "--warmup", "1", "--repeats", "2", "--json", json_path]
    return bench_moe_layer_main(argv)


def test_benchmark_runs_and_writes_json(dist1, tmp_path):
    import json

    path = tmp_path / "bench.json"
    assert dist1.run(bench_smoke, str(path)) == [0]
    payload = json.loads(path.read_text())
    rows = payload["results"]
    labels = {r["label"] for r in rows}
    assert {"dense MLP", "MoE SequentialMLP", "DeRS fused lowrank r=2", "DeRS dropin sparse p=0.5"} <= labels
    dense = next(r for r in rows if r["label"] == "dense MLP")
    assert dense["ratios"]["ms"] == 1.0 and dense["peak_mib"] > 0 and dense["dtype"] == "float32"
    grouped = next(r for r in rows if r["label"].startswith("MoE GroupedMLP"))
    assert grouped["ms"] is None and "not run" in grouped["note"]


def test_kernel_only_benchmark_writes_every_product(tmp_path, capsys):
    import json

    from ders_megatron.cli.bench_moe_layer import bench_moe_layer_main

    path = tmp_path / "kernel.json"
    argv = ["--kernel-only", "--hidden-size", "16", "--ffn-hidden-size", "32", "--tokens", "16",
            "--topk", "2", "--drop-rates", "0.9", "0.5", "--repeats", "1", "--dtype", "float32", "bfloat16",
            "--json", str(path)]
    assert bench_moe_layer_main(argv) == 0
    rows = json.loads(path.read_text())["kernel"]
    # 2 dtypes x 2 matrices x 2 drop rates x 2 products, each against the dense products it replaces.
    assert len(rows) == 16 and {r["product"] for r in rows} == {"forward", "backward"}
    assert [sum(r["dtype"] == d for r in rows) for d in ("float32", "bfloat16")] == [8, 8]
    # the gather form is timed where the kernel can take it (the model's own dtype), named where taken
    assert all((r["gather_ms"] is None) == (r["dtype"] == "bfloat16") for r in rows)
    assert {r["picked"] for r in rows if r["dtype"] == "bfloat16"} == {"CSR"}
    assert all(r["sparse_ms"] > 0 and r["dense_ms"] > 0 for r in rows)
    assert "| fc2 [16, 32] | 0.5 |" in capsys.readouterr().out


@pytest.mark.gpu
def test_fused_with_transformer_engine_base_linears():
    """On a GPU with TE: the TE-backed fused layer equals the local-backend one."""
    pytest.importorskip("transformer_engine")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from ders_megatron.testing.distributed import run_distributed

    run_distributed(te_equals_local, 1)


def te_equals_local():
    from ders_megatron.layers.specs import ders_moe_spec
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import tiny_config

    with model_parallel():
        config = tiny_config(use_cpu_initialization=False)
        ders = DeRSConfig(impl="fused")
        layers = [ders_moe_spec(ders, use_te=te)(config=config).cuda() for te in (False, True)]
        for layer in layers:
            layer.set_layer_number(1)
        layers[1].load_state_dict(layers[0].state_dict(), strict=False)
        x = torch.randn(8, 2, config.hidden_size, device="cuda")
        outs = [layer(x)[0] for layer in layers]
    # TF32/cuBLAS vs TE GEMMs on the same fp32 weights: 1e-3 relative.
    torch.testing.assert_close(outs[1], outs[0], atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------- #
# Launch count: the low-rank kernel's ops do not grow with the number of experts.
# --------------------------------------------------------------------------- #
def count_layer_ops(impl, num_experts, tokens=64, topk=2, tile=16):
    """aten ops (each one kernel launch on GPU) of one forward + backward, by op: the fused
    layer whole (router included), or the drop-in experts on dispatched rows (megatron's
    token dispatcher, which is not ours, left out).

    Counted with a ``TorchDispatchMode`` around the second step (the first builds
    lazily cached state). Tokens, top-k and tile are fixed, so the kernel's tiles are
    too; only the experts (and so the ways the pairs spread over them) change.
    """
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    from ders_megatron.layers.specs import ders_moe_spec
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import tiny_config
    from ders_megatron.testing.reference import randomize_deltas

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    with model_parallel():
        config = tiny_config(num_moe_experts=num_experts, moe_router_topk=topk)
        ders = DeRSConfig(delta=LowRankDeltaConfig(rank=4, alpha=8.0), impl=impl, kernel_tile=tile)
        layer = ders_moe_spec(ders)(config=config)
        layer.set_layer_number(1)
        randomize_deltas(layer)
        assert layer.experts.uses_lowrank_kernel()
        gen = torch.Generator().manual_seed(0)
        if impl == "fused":
            x = torch.randn(tokens // 2, 2, config.hidden_size, generator=gen).requires_grad_(True)
            inputs = (x,)
        else:  # the rows megatron's dispatcher hands the experts: grouped by expert, one probability each
            experts_of_pairs = torch.randint(num_experts, (tokens * topk,), generator=gen)
            rows = torch.randn(tokens * topk, config.hidden_size, generator=gen).requires_grad_(True)
            inputs = (rows, torch.bincount(experts_of_pairs, minlength=num_experts), torch.rand(tokens * topk))
            layer = layer.experts
        for _ in range(2):
            counter = CountOps()
            with counter:
                layer(*inputs)[0].sum().backward()
    return dict(counter.ops)


@pytest.mark.parametrize("impl", ["fused", "dropin"])
def test_kernel_ops_do_not_grow_with_experts(dist1, impl):
    """Defect 6 of issue 16: a Python loop over (slot, expert) segments made ~30 kernels per
    expert per layer (16k at 64 experts top-8 on GPU). With grouped GEMMs over fixed tiles
    the count at 64 experts equals the count at 8 (64 tokens top-2, so every expert of
    the 8 and most of the 64 receive pairs)."""
    ops8, ops64 = (dist1.run(count_layer_ops, impl, e)[0] for e in (8, 64))
    total8, total64 = sum(ops8.values()), sum(ops64.values())
    assert total64 <= total8, f"{impl}: {total8} ops at 8 experts, {total64} at 64: " + str(
        {op: (ops8.get(op, 0), n) for op, n in ops64.items() if n > ops8.get(op, 0)})
    assert ops64.get("aten._grouped_mm", 0) > 0, f"the kernel ran no grouped GEMM: {ops64}"
