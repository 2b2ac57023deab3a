"""Products with sparse deltas (values at fixed positions) that never build a dense [O, I] Δ.

The kept positions of one expert's Δ (or of the slice a tensor-parallel rank
applies) become a :class:`SparseIndex` once: CSR row pointers and columns of Δ,
and of Δᵀ (with the permutation from Δ's order to Δᵀ's) where a product needs it, on
the values' device; every index array is int32 where the counts fit
(:func:`csr_index_dtype`): 4 bytes of index per kept value for Δ, 8 more for Δᵀ. With it every product of the delta is a sparse × dense kernel:

* forward       ``y = x Δᵀ``            as ``Δ @ xᵀ``   (CSR [O, I] × dense [I, n]);
* input grad    ``dx = dy Δ``           as ``Δᵀ @ dyᵀ`` (CSR [I, O] × dense [O, n]);
* values grad   ``dv_k = Σ_t dy[t, row_k] x[t, col_k]`` only at the kept positions,
  a sampled dense × dense product (``torch.sparse.sampled_addmm``, SDDMM).

Why CSR through torch.sparse and not gather/``index_add``: measured on this
2-core Xeon (hidden 1024, FFN 4096, 256-512 rows, fp32; ``python tools/bench_moe_layer.py
--kernel-only`` reproduces it, docs/benchmarks.md): at p = 0.99 the CSR product
takes 0.6-2.8 ms against 28-61 ms for the gather/``index_add`` form and 7-14 ms
for the dense GEMM it replaces; ``sampled_addmm`` 0.8-1.9 ms against 43-90 ms for
gathering both operands. The gather forms move a [K, n] temporary through memory;
MKL's CSR kernel streams each kept value against a contiguous row of n tokens.
Only for tiny deltas (K of a few hundred to a few thousand, p = 0.9999 at these
sizes) does the gather form win, by skipping the transposes CSR needs; the SwiGLU
kernel (:mod:`ders_megatron.layers.sparse_compute`) switches there.
On CUDA the same calls run cuSPARSE.

MKL's CSR kernels have no bfloat16/float16 path ("addmm_out_sparse_csr_impl_mkl"
not implemented for 'BFloat16'; ``sampled_addmm`` refuses it), so reduced-precision
operands are multiplied in float32 (:func:`sparse_dtype`) and the results cast back:
the accumulation a bf16 GEMM does in fp32 anyway.

Shapes: ``O`` rows / ``I`` columns of the (sliced) Δ, ``K`` kept values, ``n``/``T`` rows of x.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def sparse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the sparse kernels multiply in: float32 for 16-bit floats (no MKL kernel)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


@dataclass(frozen=True)
class TransposedIndex:
    """Δᵀ's side of a :class:`SparseIndex`: what the input-gradient product needs."""

    crow_t_I: torch.Tensor  # [I + 1] row pointers of Δᵀ
    row_t_K: torch.Tensor  # [K] columns of Δᵀ (rows of Δ), in Δᵀ's order
    order_t_K: torch.Tensor  # [K] entry of Δ's order at each place of Δᵀ's order


@dataclass(frozen=True)
class SparseIndex:
    """The K kept positions of one [O, I] (slice of a) delta, in CSR form for Δ (and for Δᵀ
    once :meth:`transposed` is asked for).

    Entries are in Δ's row-major order ("CSR order"). ``value_index`` says which of the
    expert's stored values each entry holds (None: all of them, in stored order).
    Every index array has one dtype, :func:`csr_index_dtype` (int32 below 2³¹ entries):
    the CSR kernels take 32-bit indices as they are, and ``index_select``/``index_add_``/
    advanced indexing accept them too. Memory per kept value: 4 bytes for Δ's columns,
    8 more once Δᵀ is built, 4 more where a slice picks values; each entry's row is derived
    from the row pointers when asked (:meth:`rows`), not kept. (Int64 rows, columns and
    order, kept whether used or not, cost 32 bytes per value against a 4-byte fp32 value.)
    """

    shape: tuple[int, int]  # (O, I) of the slice
    crow_O: torch.Tensor  # [O + 1] row pointers of Δ
    col_K: torch.Tensor  # [K] column of each entry (the CSR tensors' column indices)
    value_index_K: torch.Tensor | None  # [K] into the expert's values, or None (identity)
    nnz: int
    device: torch.device
    # built on first use and kept: "transposed" -> TransposedIndex; other's id -> (other, stacked index)
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    def rows(self) -> torch.Tensor:
        """[K] row of each entry, from the row pointers (no device sync: the count is known)."""
        counts_O = self.crow_O.diff()
        rows_O = torch.arange(self.shape[0], dtype=self.crow_O.dtype, device=self.device)
        return torch.repeat_interleave(rows_O, counts_O, output_size=self.nnz)

    def transposed(self) -> TransposedIndex:
        """Δᵀ's row pointers, columns and order, built once (one device sync, on first use).

        Only the products with Δᵀ need it (the input gradient of the CSR form), so an index
        whose transposed products run elsewhere (the SwiGLU kernel's stacked gate/up index
        stands in for the gate's and the up's) never holds it."""
        built = self.derived.get("transposed")
        if built is None:
            (O, I), row_K, col_K = self.shape, self.rows().long(), self.col_K.long()
            order_t = (col_K * O + row_K).argsort()
            built = TransposedIndex(crow_t_I=_row_pointers(col_K, I).to(self.col_K.dtype),
                                    row_t_K=row_K[order_t].to(self.col_K.dtype),
                                    order_t_K=order_t.to(self.col_K.dtype))
            self.derived["transposed"] = built
        return built

    def values(self, values_K: torch.Tensor) -> torch.Tensor:
        """The entries' values in CSR order from one expert's stored values [K_stored]."""
        return values_K if self.value_index_K is None else values_K[self.value_index_K]

    def matrix(self, vals_K: torch.Tensor) -> torch.Tensor:
        """Δ as a CSR tensor [O, I] over ``vals_K`` (CSR order)."""
        return torch.sparse_csr_tensor(self.crow_O, self.col_K, vals_K, self.shape, check_invariants=False)

    def matrix_t(self, vals_K: torch.Tensor) -> torch.Tensor:
        """Δᵀ as a CSR tensor [I, O] over ``vals_K`` (Δ's CSR order)."""
        t = self.transposed()
        return torch.sparse_csr_tensor(t.crow_t_I, t.row_t_K, vals_K[t.order_t_K], self.shape[::-1],
                                       check_invariants=False)

    def dense(self, vals_K: torch.Tensor) -> torch.Tensor:
        """Δ as a dense [O, I] float32 tensor: for merging and references only, never in a product."""
        out = torch.zeros(self.shape, dtype=torch.float32, device=vals_K.device)
        return out.index_put((self.rows(), self.col_K), vals_K.float())

    def stacked_over(self, bottom: "SparseIndex") -> "SparseIndex":
        """The index of ``[self; bottom]`` ([O + O_bottom, I]: ``bottom``'s rows below this one's),
        entries in this index's CSR order then ``bottom``'s; built once per pair and kept.

        One product of the stacked matrix replaces two (the SwiGLU kernel's gate and up
        deltas against the same x): half the sparse calls and their fixed cost per tile."""
        cached = self.derived.get(id(bottom))
        if cached is not None and cached[0] is bottom:
            return cached[1]
        (O, I), O_bottom = self.shape, bottom.shape[0]
        if bottom.shape[1] != I or bottom.device != self.device:
            raise ValueError(f"cannot stack a {bottom.shape} index under a {self.shape} one")
        flat = torch.cat([self.rows().long() * I + self.col_K,
                          (bottom.rows().long() + O) * I + bottom.col_K])  # sorted
        stacked = build_sparse_index(flat, O + O_bottom, I, (0, O + O_bottom), (0, I))
        self.derived[id(bottom)] = (bottom, stacked)
        return stacked

    def nbytes(self) -> int:
        """Bytes this index holds on its device, Δᵀ's side included once built (stacked
        indexes derived from it not counted)."""
        t = self.derived.get("transposed")
        arrays = (self.crow_O, self.col_K, self.value_index_K,
                  *((t.crow_t_I, t.row_t_K, t.order_t_K) if t is not None else ()))
        return sum(a.numel() * a.element_size() for a in arrays if a is not None)

    def pattern(self, dtype: torch.dtype) -> torch.Tensor:
        """Δ's positions as a CSR tensor of zeros: the accumulator of :func:`sampled_grad_into`."""
        vals_K = torch.zeros(self.nnz, dtype=dtype, device=self.device)
        return torch.sparse_csr_tensor(self.crow_O, self.col_K, vals_K, self.shape, check_invariants=False)


def csr_index_dtype(nnz: int, shape: tuple[int, int]) -> torch.dtype:
    """int32 where the counts fit: MKL (LP64) and cuSPARSE take 32-bit CSR indices as they are,
    and convert int64 ones on every call (``aten::copy_`` of each index array, per product)."""
    return torch.int32 if max(nnz, *shape) < 2**31 - 1 else torch.int64


def build_sparse_index(flat_K: torch.Tensor, out_features: int, in_features: int,
                       rows: tuple[int, int], cols: tuple[int, int]) -> SparseIndex:
    """The index of the positions ``flat_K`` (flat in [0, O·I), distinct) inside Δ[r0:r1, c0:c1].

    Built once per (expert, slice, device); syncs with the device once (the slice's K).
    """
    (r0, r1), (c0, c1) = rows, cols
    flat = flat_K.long()
    row, col = flat // in_features, flat % in_features
    value_index = None
    if (r0, r1, c0, c1) != (0, out_features, 0, in_features):
        value_index = ((row >= r0) & (row < r1) & (col >= c0) & (col < c1)).nonzero().squeeze(1)
        row, col = row[value_index] - r0, col[value_index] - c0
    O, I = r1 - r0, c1 - c0
    order = (row * I + col).argsort()
    if not bool((order == torch.arange(order.numel(), device=order.device)).all()):  # unsorted input
        value_index = order if value_index is None else value_index[order]
        row, col = row[order], col[order]
    index_dtype = csr_index_dtype(flat.numel(), (O, I))  # value_index points into all K_stored values
    return SparseIndex(
        shape=(O, I),
        crow_O=_row_pointers(row, O).to(index_dtype),
        col_K=col.to(index_dtype),
        value_index_K=None if value_index is None else value_index.to(index_dtype),
        nnz=row.numel(),
        device=flat.device,
    )


def _row_pointers(row_K: torch.Tensor, rows: int) -> torch.Tensor:
    crow = torch.zeros(rows + 1, dtype=torch.int64, device=row_K.device)
    crow[1:] = torch.bincount(row_K, minlength=rows).cumsum(0)
    return crow


# --------------------------------------------------------------------------- #
# The three kernels, on tokens laid out as columns ([features, n], contiguous).
# --------------------------------------------------------------------------- #
def product(mat_OI: torch.Tensor, bT_In: torch.Tensor) -> torch.Tensor:
    """``mat @ bᵀ`` as a contiguous [O, n], written by MKL (cuSPARSE) straight into it.

    ``addmm(out, mat, b, beta=0, out=out)`` on an uninitialised ``out``: ``mat @ b`` zero-fills
    a result, computes into a temporary and copies it over (measured on [4096, 1024] deltas and
    256 columns, one thread: 0.25 vs 0.83 ms at p = 0.9999, 0.82 vs 1.53 ms at p = 0.99)."""
    out_On = bT_In.new_empty(mat_OI.shape[0], bT_In.shape[1])
    return torch.addmm(out_On, mat_OI, bT_In, beta=0, out=out_On)


def delta_times(index: SparseIndex, vals_K: torch.Tensor, xT_In: torch.Tensor) -> torch.Tensor:
    """Δ @ xᵀ: [O, n] (x given transposed, [I, n], in :func:`sparse_dtype`)."""
    return product(index.matrix(vals_K.to(xT_In.dtype)), xT_In)


def delta_t_times(index: SparseIndex, vals_K: torch.Tensor, dyT_On: torch.Tensor) -> torch.Tensor:
    """Δᵀ @ dyᵀ: [I, n]."""
    return product(index.matrix_t(vals_K.to(dyT_On.dtype)), dyT_On)


def sampled_grad(index: SparseIndex, dyT_On: torch.Tensor, x_nI: torch.Tensor) -> torch.Tensor:
    """dv [K] (CSR order): (dyᵀ @ x) at the kept positions only."""
    return sampled_grad_into(index.pattern(dyT_On.dtype), dyT_On, x_nI).values()


def sampled_grad_into(acc: torch.Tensor, dyT_On: torch.Tensor, x_nI: torch.Tensor) -> torch.Tensor:
    """acc += (dyᵀ @ x) at acc's positions, in place (``acc`` from :meth:`SparseIndex.pattern`):
    one accumulator per delta across a call's tiles, no zero fill and no add per tile."""
    return torch.sparse.sampled_addmm(acc, dyT_On, x_nI, out=acc)


class _SparseProduct(torch.autograd.Function):
    """y = x Δᵀ with Δ given by (index, vals); gradients for x and vals, none materialised."""

    @staticmethod
    def forward(ctx, x_TI, vals_K, index):
        dtype = sparse_dtype(x_TI.dtype)
        ctx.save_for_backward(x_TI, vals_K)  # x itself (callers keep it anyway), not a transposed copy
        ctx.index = index
        return delta_times(index, vals_K, x_TI.t().to(dtype).contiguous()).t().to(x_TI.dtype)  # [T, O]

    @staticmethod
    def backward(ctx, dy_TO):
        x_TI, vals_K = ctx.saved_tensors
        dtype = sparse_dtype(x_TI.dtype)
        dyT_OT = dy_TO.t().to(dtype).contiguous()
        dx = dvals = None
        if ctx.needs_input_grad[0]:
            dx = delta_t_times(ctx.index, vals_K, dyT_OT).t().to(dy_TO.dtype)
        if ctx.needs_input_grad[1]:
            dvals = sampled_grad(ctx.index, dyT_OT, x_TI.to(dtype)).to(vals_K.dtype)
        return dx, dvals, None


def sparse_apply(x_TI: torch.Tensor, vals_K: torch.Tensor, index: SparseIndex) -> torch.Tensor:
    """x @ Δᵀ for x [T, I] and Δ = (index, vals_K in CSR order): [T, O], differentiable in both."""
    if x_TI.shape[0] == 0 or index.nnz == 0:
        return x_TI.new_zeros(x_TI.shape[0], index.shape[0]) + 0 * vals_K.sum().to(x_TI.dtype) + 0 * x_TI.sum()
    return _SparseProduct.apply(x_TI, vals_K, index)
