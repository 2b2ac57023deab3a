"""Delta kinds as plain modules: init, slices, merge, positions, validation errors."""

import pytest
import torch

from ders_megatron.core.config import DenseDeltaConfig, LowRankDeltaConfig, SparseDeltaConfig, delta_config
from ders_megatron.core.deltas import build_deltas, sample_unique

CONFIGS = [LowRankDeltaConfig(rank=3, alpha=6.0), SparseDeltaConfig(drop_rate=0.7), DenseDeltaConfig()]


def build(config, experts=(0, 1, 2), out=12, inp=10, seed=5, matrix="fc1"):
    return build_deltas(config, list(experts), out, inp, seed=seed, matrix=matrix)


def randomized(deltas, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in deltas.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return deltas


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.kind)
def test_zero_at_init(config):
    deltas = build(config)
    for e in range(3):
        assert torch.count_nonzero(deltas.delta_weight(e)) == 0


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.kind)
@pytest.mark.parametrize("rows,cols", [(None, None), (slice(4, 10), None), (None, slice(2, 7)), (slice(0, 6), slice(5, 10))])
def test_apply_equals_product_with_delta_weight_slice(config, rows, cols):
    deltas = randomized(build(config))
    full = deltas.delta_weight(1)
    x = torch.randn(7, full[:, cols or slice(None)].shape[1], dtype=torch.float64).float()
    expected = x @ full[rows or slice(None), cols or slice(None)].t()
    # float32 sums of at most 10 products of O(1) terms: a few ulps.
    torch.testing.assert_close(deltas.apply_delta(x, 1, rows, cols), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(deltas.delta_weight(1, rows, cols), full[rows or slice(None), cols or slice(None)])


def test_lowrank_delta_is_scaled_product():
    deltas = randomized(build(LowRankDeltaConfig(rank=2, alpha=8.0)))
    expected = 4.0 * deltas.lora_B[0] @ deltas.lora_A[0]
    torch.testing.assert_close(deltas.delta_weight(0), expected)
    assert deltas.num_values() == 3 * 2 * (12 + 10)


def test_sparse_positions_unique_seeded_and_distinct_per_expert_layer_matrix():
    config = SparseDeltaConfig(drop_rate=0.5)
    a, b = build(config), build(config)
    assert a.kept == 60
    for e in range(3):
        row, col, _ = a.positions(e)
        flat = row * 10 + col
        assert flat.unique().numel() == 60  # unique positions
        assert torch.equal(flat, (b.positions(e)[0] * 10 + b.positions(e)[1]))  # deterministic
    assert not torch.equal(a.positions(0)[0], a.positions(1)[0])  # experts differ
    other_matrix = build(config, matrix="fc2")
    assert not torch.equal(a.positions(0)[1], other_matrix.positions(0)[1])
    a.set_layer_number(3)
    assert not torch.equal(a.positions(0)[1], b.positions(0)[1])  # layers differ
    assert a.index_bytes() == 8  # a seed, not an index vector


def test_sparse_positions_follow_loaded_seed():
    a = build(SparseDeltaConfig(drop_rate=0.5), seed=1)
    b = build(SparseDeltaConfig(drop_rate=0.5), seed=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.positions(2)[1], b.positions(2)[1])


def test_sparse_gather_path_equals_dense_path():
    deltas = randomized(build(SparseDeltaConfig(drop_rate=0.95), out=40, inp=30))
    x = torch.randn(3, 30)  # 3 tokens x 60 kept < 40 x 30: the gather path
    dense = x @ deltas.delta_weight(0).t()
    torch.testing.assert_close(deltas.apply_delta(x, 0), dense, atol=1e-5, rtol=1e-5)


def test_sample_unique_is_uniform_enough_and_exact():
    picked = sample_unique(1000, 300, seed=3)
    assert picked.numel() == 300 and picked.unique().numel() == 300
    assert picked.min() >= 0 and picked.max() < 1000
    # Mean of a uniform sample of 300 from [0, 1000): 499.5 with std ~ 16.7.
    assert abs(picked.float().mean().item() - 499.5) < 5 * 16.7
    assert torch.equal(sample_unique(1000, 300, seed=3), picked)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.kind)
def test_merge_is_fp32_sum_and_rejects_non_finite(config):
    deltas = randomized(build(config))
    base = torch.randn(12, 10)
    torch.testing.assert_close(deltas.merge(base, 2), base + deltas.delta_weight(2))
    with pytest.raises(ValueError, match="non-finite"):
        deltas.merge(torch.full((12, 10), float("inf")), 0)


@pytest.mark.parametrize(
    "make,flag",
    [
        (lambda: LowRankDeltaConfig(rank=0), "--moe-ders-rank"),
        (lambda: LowRankDeltaConfig(rank=2, alpha=-1.0), "--moe-ders-alpha"),
        (lambda: build(LowRankDeltaConfig(rank=11)), "--moe-ders-rank 11 exceeds"),
        (lambda: SparseDeltaConfig(drop_rate=1.0), "--moe-ders-drop-rate"),
        (lambda: SparseDeltaConfig(drop_rate=-0.1), "--moe-ders-drop-rate"),
        (lambda: build(SparseDeltaConfig(drop_rate=0.999)), "keeps no element"),
        (lambda: delta_config("quantum"), "--moe-ders must be one of"),
    ],
)
def test_invalid_settings_name_the_flag(make, flag):
    with pytest.raises(ValueError, match=flag):
        make()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.kind)
def test_module_apply_still_works(config):
    # megatron DDP (distributed optimizer) and deepspeed.initialize call nn.Module.apply(fn):
    # the delta API must not shadow it.
    seen = []
    build(config).apply(lambda module: seen.append(type(module).__name__))
    assert seen and seen[-1].endswith("Deltas")


def _position_kinds():
    from ders_megatron.core.config import IndexedSparseDeltaConfig

    return {"sparse": SparseDeltaConfig(drop_rate=0.7), "magnitude": IndexedSparseDeltaConfig(drop_rate=0.7)}


def _with_positions(kind, seed=0):
    """A randomized values-at-positions module; magnitude gets distinct, UNSORTED indices."""
    deltas = randomized(build(_position_kinds()[kind]), seed)
    if kind == "magnitude":
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for e in range(deltas.num_experts):
                deltas.indices[e].copy_(torch.randperm(12 * 10, generator=gen)[: deltas.kept].to(deltas.indices.dtype))
    return deltas


@pytest.mark.parametrize("kind", ["sparse", "magnitude"])
@pytest.mark.parametrize("rows,cols", [(None, None), (slice(4, 10), None), (None, slice(2, 7))])
def test_sparse_product_gradients_equal_dense_reference(kind, rows, cols):
    """Output, input grad and values grad of the CSR kernels ≡ x @ Δᵀ with Δ scattered densely
    from the flat positions (independent of the CSR index); values outside the slice get 0."""
    deltas = _with_positions(kind)
    rows_, cols_ = rows or slice(None), cols or slice(None)
    values = deltas.values.detach().clone().requires_grad_(True)
    flat = deltas.flat_positions(1).long()
    dense = torch.zeros(12 * 10).index_put((flat,), values[1]).view(12, 10)[rows_, cols_]
    x = torch.randn(7, dense.shape[1], requires_grad=True)
    upstream = torch.randn(7, dense.shape[0])
    (x @ dense.t() * upstream).sum().backward()
    x_got = x.detach().clone().requires_grad_(True)
    out = deltas.apply_delta(x_got, 1, rows, cols)
    (out * upstream).sum().backward()
    # float32 sums of at most 10 products of O(1) terms: a few ulps.
    torch.testing.assert_close(out, (x @ dense.t()).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_got.grad, x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(deltas.values.grad, values.grad, atol=1e-5, rtol=1e-5)
    assert not deltas.values.grad[[0, 2]].any()  # other experts untouched
    if rows or cols:  # values of expert 1 outside the slice: exactly zero
        assert (values.grad[1] == 0).sum() > 0 and torch.equal(deltas.values.grad[1] == 0, values.grad[1] == 0)


def test_sparse_product_in_bfloat16_matches_float32():
    """bf16 operands are multiplied in fp32 (no MKL bf16 CSR kernel): the result is the fp32
    product of the bf16-rounded operands, rounded once to bf16 (<= 1 bf16 ulp, 2**-8 relative)."""
    deltas = _with_positions("sparse")
    x = torch.randn(5, 10).bfloat16()
    got = deltas.to(torch.bfloat16).apply_delta(x, 0)
    want = deltas.float().apply_delta(x.float(), 0)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=2**-8)


def test_sparse_index_is_built_once_and_moves_with_the_values():
    deltas = _with_positions("sparse")
    deltas.prepare_index(slice(0, 6), None)
    first = deltas.sparse_index(0, slice(0, 6), None)
    deltas.apply_delta(torch.randn(3, 10), 0, slice(0, 6), None)
    assert deltas.sparse_index(0, slice(0, 6), None) is first  # cached, not rebuilt per call
    deltas.load_state_dict(deltas.state_dict())
    assert deltas.sparse_index(0, slice(0, 6), None) is not first  # a load rebuilds (same positions)
    assert torch.equal(deltas.sparse_index(0, slice(0, 6), None).col_K, first.col_K)


def test_sparse_index_keeps_int32_indexes_and_builds_the_transpose_only_when_asked():
    """4 bytes of index per kept value for Δ (its columns; rows come from the row pointers),
    8 more once Δᵀ is asked for, 4 more for a slice's value index -- all int32 (the int64
    row/column/order kept before cost 32 per value). The products over it equal the dense Δ's,
    sliced and whole, stacked too."""
    from ders_megatron.core.sparse_product import delta_t_times, delta_times, sampled_grad

    deltas = _with_positions("sparse").requires_grad_(False)
    x = torch.randn(7, 10, dtype=torch.float64)
    dy = torch.randn(7, 12, dtype=torch.float64)
    for rows in (None, slice(0, 6)):
        index = deltas.sparse_index(1, rows, None)
        O, I = index.shape
        picked = 4 * index.nnz if index.value_index_K is not None else 0
        assert (index.value_index_K is None) == (rows is None)
        assert index.nbytes() == 4 * index.nnz + 4 * (O + 1) + picked  # Δᵀ not built by a lazy lookup
        vals = index.values(deltas.values[1].double())
        dense = index.dense(vals).double()  # [O, I]
        torch.testing.assert_close(delta_times(index, vals, x.t().contiguous()), dense @ x.t())
        assert "transposed" not in index.derived  # the forward needs no Δᵀ
        torch.testing.assert_close(delta_t_times(index, vals, dy[:, :O].t().contiguous()), dense.t() @ dy[:, :O].t())
        t = index.transposed()
        assert index.transposed() is t  # built once
        assert index.nbytes() == 12 * index.nnz + 4 * (O + 1 + I + 1) + picked
        arrays = (index.crow_O, index.col_K, index.rows(), t.crow_t_I, t.row_t_K, t.order_t_K)
        assert {a.dtype for a in arrays} == {torch.int32}
        want_dv = (dy[:, :O].t() @ x)[index.rows().long(), index.col_K.long()]
        torch.testing.assert_close(sampled_grad(index, dy[:, :O].t().contiguous(), x), want_dv)
    whole, other = deltas.sparse_index(1), deltas.sparse_index(2)
    stacked = whole.stacked_over(other)
    assert stacked.col_K.dtype == torch.int32 and stacked.shape == (2 * whole.shape[0], whole.shape[1])
    both = torch.cat([whole.dense(whole.values(deltas.values[1])), other.dense(other.values(deltas.values[2]))])
    vals = torch.cat([whole.values(deltas.values[1]), other.values(deltas.values[2])])
    torch.testing.assert_close(stacked.dense(vals), both, rtol=0, atol=0)
    row, col, value_index = deltas.positions(1, slice(0, 6), None)
    assert row.dtype == col.dtype == value_index.dtype == torch.int64  # callers' arithmetic stays safe


def test_prepared_indexes_hold_the_transpose_only_where_asked_also_after_a_load():
    deltas = _with_positions("sparse")
    deltas.prepare_index(None, slice(0, 5), transposed=False)
    deltas.prepare_index(slice(0, 6), None)
    for _ in range(2):  # as prepared, then as rebuilt by a load
        for e in range(deltas.num_experts):
            assert "transposed" not in deltas.sparse_index(e, None, slice(0, 5)).derived
            assert "transposed" in deltas.sparse_index(e, slice(0, 6), None).derived
        deltas.load_state_dict(deltas.state_dict())
