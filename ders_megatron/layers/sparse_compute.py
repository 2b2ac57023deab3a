"""The sparse-delta SwiGLU kernel (DeRS-SM, ``dare``, ``magnitude``): the low-rank
kernel's structure with sparse products in place of the rank-R terms.

Base fc1 and fc2 run once per token through megatron's linears (outside the kernel,
as in :mod:`ders_megatron.layers.expert_compute`); the (token, slot) pairs, grouped
by expert (a ``PairOrder``: ``token_P``, ``order_P``, ``segments``), go through in
tiles of ``tile`` rows. Per tile of expert e::

    [g | u] = base[tok] + x [Δg_e; Δu_e]ᵀ  (gate and up deltas stacked: one product) ;  h = silu(g)·u
    hbar[tok] += p·h                       (fc2's base input, Σ_s p_s h_s)
    dout[tok] += p·(h Δ2_eᵀ)               (fc2's delta term, Σ_s p_s Δ2_e h_s)

Each product runs in one of two forms, chosen per expert and matrix by its size
(:func:`gather_form_applies`): CSR × dense (:mod:`ders_megatron.core.sparse_product`,
tokens as columns, so a transpose in and one out), or for tiny deltas (p = 0.9999) a
gather of the kept columns added at their rows, with no transpose and no CSR call.

The backward recomputes g, u, h tile by tile (no ``[T·k, F]`` tensor is kept, the
layer saves what a dense SwiGLU MLP saves plus x) and uses, with
``G = dhbar[tok] + ddout Δ2_e``: ``dp = h·G``, ``dh = p·G``, then dg/du by the
SwiGLU derivative, ``dx[tok] += [dg | du] [Δg_e; Δu_e]`` and the values' gradients
at the kept positions only (sampled products, or gathered sums).

It imports nothing of the low-rank kernel's module (which calls into this one).
Shapes: ``T`` tokens, ``H`` hidden, ``F`` this rank's FFN columns, ``P`` pairs, ``n`` a tile's pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ders_megatron.core.deltas import PositionDeltas
from ders_megatron.core.sparse_product import product, sampled_grad_into, sparse_dtype
from ders_megatron.layers.prob_grads import exact_products, prob_grad_dtype, product_scratch

MATRICES = ("fc1_gate", "fc1_up", "fc2")
STACKED = MATRICES[:2]  # gate and up: one stacked [2F, H] index runs their products


def sparse_swiglu_applies(experts) -> bool:
    """Every delta a values-at-positions kind, SwiGLU without clamp/offset."""
    config = experts.config
    return (
        all(isinstance(experts.deltas[m], PositionDeltas) for m in MATRICES if m in experts.deltas)
        and config.gated_linear_unit
        and config.activation_func is F.silu
        and config.activation_func_clamp_value is None
        and not config.glu_linear_offset
    )


def sparse_swiglu_compute(experts, x_TH, pairs, p_Tk, tile: int) -> torch.Tensor:
    """Σ_s p_s · expert_{e_s}(x) for every token: [T, H] (a partial sum over TP when sharded)."""
    pairs.require_every_row(x_TH.shape[0])  # every row of hbar / dout / d(base) is written
    deltas = experts.deltas
    indexes = [
        tuple(deltas[m].sparse_index(e, *experts.base_slices[m]) for m in MATRICES)
        for e in range(experts.num_local_experts)
    ]
    longest = max((stop - start for _, start, stop, _ in pairs.segments), default=1)
    tile = max(1, min(tile, longest))
    base_T2F, fc1_bias = experts.linear_fc1(x_TH)  # base fc1 once per token
    if fc1_bias is not None:
        base_T2F = base_T2F + fc1_bias
    p_P = p_Tk.flatten()[pairs.order_P]
    hbar_TF, dout_TH = _SparseSwiGLU.apply(
        base_T2F, x_TH, *(deltas[m].values for m in MATRICES), p_P, pairs.token_P, pairs.segments, indexes, tile
    )
    out_TH, fc2_bias = experts.linear_fc2(hbar_TF)  # base fc2 once per token, on Σ_s p_s h_s
    out_TH = out_TH + dout_TH
    if fc2_bias is not None:
        out_TH = out_TH + fc2_bias * p_Tk.sum(1, keepdim=True).to(out_TH.dtype)
    return out_TH


class _SparseSwiGLU(torch.autograd.Function):
    """forward(base [T, 2F], x [T, H], values of gate/up/fc2 [E, K*], p [P], token [P],
    segments, indexes [E] of (gate, up, fc2) SparseIndex, tile) -> (hbar [T, F], dout [T, H])."""

    @staticmethod
    def forward(ctx, base_T2F, x_TH, vg_EK, vu_EK, v2_EK, p_P, token_P, segments, indexes, tile):
        base_T2F = base_T2F.contiguous()
        T, F_ = base_T2F.shape[0], base_T2F.shape[1] // 2
        products = _expert_products(indexes, (vg_EK, vu_EK, v2_EK), base_T2F)
        p_P1 = p_P.detach().unsqueeze(1)  # its own dtype: h·p rounds once, as megatron's MLP
        hbar_TF = base_T2F.new_empty(T, F_)
        dout_TH = base_T2F.new_empty(T, x_TH.shape[1])
        plan = _plan(segments, token_P, tile)
        gu_ = base_T2F.new_empty(tile, 2 * F_)
        for e, c, tok, first in plan:
            n = c.stop - c.start
            gu = torch.index_select(base_T2F, 0, tok, out=gu_[:n])  # [n, 2F]
            products[e][0].add_forward(gu, torch.index_select(x_TH, 0, tok))  # += x [Δg; Δu]ᵀ
            h = torch._C._nn.silu(gu[:, :F_]).mul_(gu[:, F_:])  # [n, F]
            d2 = products[e][1].add_forward(None, h)  # [n, H]: h Δ2ᵀ
            _write_rows(dout_TH, tok, d2.mul_(p_P1[c]), first)
            _write_rows(hbar_TF, tok, h.mul_(p_P1[c]), first)
        ctx.save_for_backward(base_T2F, x_TH, vg_EK, vu_EK, v2_EK, p_P1)
        ctx.plan, ctx.tile, ctx.indexes, ctx.p_dtype = plan, tile, indexes, p_P.dtype
        return hbar_TF, dout_TH

    @staticmethod
    def backward(ctx, dhbar_TF, ddout_TH):
        base_T2F, x_TH, vg_EK, vu_EK, v2_EK, p_P1 = ctx.saved_tensors
        values = (vg_EK, vu_EK, v2_EK)
        products = _expert_products(ctx.indexes, values, base_T2F)
        F_ = base_T2F.shape[1] // 2
        dhbar_TF = dhbar_TF.contiguous()
        grads = _Grads(base_T2F, x_TH, values, ctx.indexes, products, p_P1.shape[0], ctx.p_dtype)
        gu_ = base_T2F.new_empty(ctx.tile, 2 * F_)
        s_ = base_T2F.new_empty(ctx.tile, F_)
        hG_ = product_scratch(base_T2F, ctx.tile, F_, grads.p_P.dtype)  # h·G, exact products
        dgu = base_T2F.new_empty(ctx.tile, 2 * F_)  # [dg | du]: one contiguous row per pair
        for e, c, tok, first in ctx.plan:
            n = c.stop - c.start
            s, dgu_ = s_[:n], dgu[:n]
            x_n = torch.index_select(x_TH, 0, tok)
            gu = torch.index_select(base_T2F, 0, tok, out=gu_[:n])
            products[e][0].add_forward(gu, x_n)
            g, u = gu[:, :F_], gu[:, F_:]
            torch._C._nn.silu(g, out=s)
            h = s * u
            G = torch.index_select(dhbar_TF, 0, tok)  # becomes dL/d(p h) = dhbar + ddout Δ2
            products[e][1].add_backward(G, torch.index_select(ddout_TH, 0, tok), h, grads.acc(e, 1), p_P1[c])
            torch.sum(exact_products(h, G, hG_), 1, out=grads.p_P[c])  # dL/dp = h·G
            G.mul_(p_P1[c])  # dL/dh
            torch.mul(G, s, out=dgu_[:, F_:])  # du = dL/dh · silu(g)
            torch.ops.aten.silu_backward.grad_input(G.mul_(u), g, grad_input=dgu_[:, :F_])  # dg
            _write_rows(grads.base_T2F, tok, dgu_, first)
            G = h = None  # dead: not live beside the last product's operands (the layer's peak)
            # [n, H]: dg Δg + du Δu; g and u are dead, so their buffer takes [dg | du]ᵀ
            dx = products[e][0].add_backward(None, dgu_, x_n, grads.acc(e, 0), scratch=gu_)
            grads.x_TH.index_add_(0, tok, dx.to(grads.x_TH.dtype))
        dvg, dvu, dv2 = grads.values_grads()
        return (grads.base_T2F, grads.x_TH, dvg, dvu, dv2, grads.p_P.to(ctx.p_dtype),
                None, None, None, None)


class CSRProduct:
    """One expert's delta ``Δ`` [O, I] (values in CSR order) as CSR products: y += x Δᵀ runs
    as ``Δ @ xᵀ`` and comes back as rows (one transpose each way:
    MKL's CSR kernels are fast only with row-major [·, n] operands, measured)."""

    def __init__(self, index, vals_K, dtype):
        self.index, self.dtype = index, dtype
        self.vals_K = vals_K.to(dtype)
        self.mat = index.matrix(self.vals_K)
        self._mat_t = None  # Δᵀ, built on the backward's first use (the forward needs none)

    @property
    def mat_t(self):
        if self._mat_t is None:
            self._mat_t = self.index.matrix_t(self.vals_K)
        return self._mat_t

    def add_forward(self, out_nO, in_nI):
        """out += in Δᵀ and returns out (``out`` None: returns in Δᵀ, in the products' dtype)."""
        inT_In = in_nI.t().to(self.dtype).contiguous()
        return _add_to(out_nO, _rows(product(self.mat, inT_In)))

    def add_backward(self, out_nI, dy_nO, in_nI, acc, scale_n1=None, scratch=None):
        """out += dy Δ (None: a new one) and acc += ((scale·dy)ᵀ in) at the kept positions;
        returns out. ``scratch``: a buffer of at least dy's size whose contents are dead, to
        hold dyᵀ (used when its dtype is the products')."""
        if scratch is not None and scratch.dtype == self.dtype:
            dyT_On = scratch.view(-1)[: dy_nO.numel()].view(dy_nO.shape[1], dy_nO.shape[0]).copy_(dy_nO.t())
        else:
            dyT_On = dy_nO.t().to(self.dtype).contiguous()
        out_nI = _add_to(out_nI, _rows(product(self.mat_t, dyT_On)))
        if scale_n1 is not None:
            dyT_On.mul_(scale_n1.t().to(self.dtype))
        sampled_grad_into(acc, dyT_On, in_nI.to(self.dtype))
        return out_nI

    def new_grad(self):
        return self.index.pattern(self.dtype)

    @staticmethod
    def grad_values(acc):
        return acc.values()


class GatherProduct:
    """The same products by gathering the K kept columns and adding them at their rows
    (``index_select`` / ``index_add_`` on the tile's rows: no transpose, no CSR call):
    cheaper than :class:`CSRProduct` while 3·K < O + I (measured on [8192, 1024] and
    [1024, 4096] deltas, 256 rows, one thread: 0.66 vs 4.5 ms at K = 838, even near
    K = 4,000). Only where the model's dtype is the products' dtype: a bf16 tile would
    round every term before the sum."""

    def __init__(self, index, vals_K):
        self.index, self.vals_K = index, vals_K
        self.row_K, self.col_K = index.rows(), index.col_K  # K is tiny here: rows derived per call

    def add_forward(self, out_nO, in_nI):
        if out_nO is None:
            out_nO = in_nI.new_zeros(in_nI.shape[0], self.index.shape[0])
        return out_nO.index_add_(1, self.row_K, torch.index_select(in_nI, 1, self.col_K).mul_(self.vals_K))

    def add_backward(self, out_nI, dy_nO, in_nI, acc, scale_n1=None, scratch=None):
        if out_nI is None:
            out_nI = dy_nO.new_zeros(dy_nO.shape[0], self.index.shape[1])
        dy_nK = torch.index_select(dy_nO, 1, self.row_K)
        out_nI.index_add_(1, self.col_K, dy_nK * self.vals_K)
        if scale_n1 is not None:
            dy_nK.mul_(scale_n1)
        acc += dy_nK.mul_(torch.index_select(in_nI, 1, self.col_K)).sum(0)
        return out_nI

    def new_grad(self):
        return self.vals_K.new_zeros(self.index.nnz)

    @staticmethod
    def grad_values(acc):
        return acc


def prepare_stacked_indexes(experts) -> None:
    """Build each local expert's stacked gate/up index now (set-up), so no step builds one;
    after a load the rebuilt per-matrix indexes get theirs on the first call (Δᵀ on the first backward)."""
    deltas = experts.deltas
    if not all(m in deltas and isinstance(deltas[m], PositionDeltas) for m in STACKED) or deltas["fc1_up"].values.is_meta:
        return  # no gate/up pair of sparse deltas, or a shape-only model: nothing to index
    for e in range(experts.num_local_experts):
        gate, up = (deltas[m].sparse_index(e, *experts.base_slices[m]) for m in STACKED)
        gate.stacked_over(up).transposed()  # the CSR form's input gradient (tiny where gather runs)


def _expert_products(indexes, values, base_T2F):
    """Per expert (stacked gate/up [2F, H], fc2 [H, F]) as :class:`CSRProduct` or
    :class:`GatherProduct`, built once per call and shared by its tiles (no autograd:
    the kernel's own backward)."""
    model_dtype, dtype = base_T2F.dtype, sparse_dtype(base_T2F.dtype)
    with torch.no_grad():
        out = []
        for e, (gate, up, fc2) in enumerate(indexes):
            vals_gu = torch.cat([gate.values(values[0][e]), up.values(values[1][e])])
            out.append(tuple(
                GatherProduct(index, vals.to(dtype)) if model_dtype == dtype and gather_form_applies(index)
                else CSRProduct(index, vals, dtype)
                for index, vals in ((gate.stacked_over(up), vals_gu), (fc2, fc2.values(values[2][e])))
            ))
        return out


def gather_form_applies(index) -> bool:
    """Gathering K columns of n rows against transposing an [O, n] result and an [I, n] input
    (the CSR path's fixed cost per product): the switch-over measured at 3·K ≈ O + I."""
    rows, cols = index.shape
    return 3 * index.nnz < rows + cols


class _Grads:
    """Gradient buffers of :class:`_SparseSwiGLU`; the values' gradients accumulate per
    (expert, product) in CSR order, in place across the tiles (a sampled product into one
    CSR accumulator, or a [K] sum, each: the stacked gate/up delta, fc2's), and land on the
    stored values at the end (kept positions only)."""

    def __init__(self, base_T2F, x_TH, values, indexes, products, pairs: int, p_dtype):
        self.base_T2F = torch.empty_like(base_T2F)  # every row written by its token's slot-0 pair
        self.x_TH = torch.zeros_like(x_TH)
        self.p_P = base_T2F.new_empty(pairs, dtype=prob_grad_dtype(p_dtype))
        self.values, self.indexes, self.products = values, indexes, products
        self.dvals = {}  # (expert, product) -> accumulator of the values in CSR order

    def acc(self, e, which: int):
        """The accumulator of expert e's product ``which`` (0: gate/up stacked, 1: fc2)."""
        key = (e, which)
        if key not in self.dvals:
            self.dvals[key] = self.products[e][which].new_grad()
        return self.dvals[key]

    def values_grads(self):
        out = [torch.zeros_like(v) for v in self.values]  # [E, K] each
        for (e, which), acc in self.dvals.items():
            gate, up, fc2 = self.indexes[e]
            dv = self.products[e][which].grad_values(acc)
            parts = ((0, gate, dv[: gate.nnz]), (1, up, dv[gate.nnz:])) if which == 0 else ((2, fc2, dv),)
            for m, index, dv_m in parts:
                if index.value_index_K is None:
                    out[m][e] += dv_m.to(out[m].dtype)
                else:
                    out[m][e].index_add_(0, index.value_index_K, dv_m.to(out[m].dtype))
        return out


def _add_to(out, rows):
    return rows if out is None else out.add_(rows)


def _rows(yT_On: torch.Tensor) -> torch.Tensor:
    """A product's [O, n] result as contiguous rows [n, O]: one blocked transpose copy,
    cheaper than element-wise work on the strided view (measured, docs/benchmarks.md)."""
    return yT_On.t().contiguous()


def _plan(segments, token_P, tile: int):
    """The tiles (expert, slice of pairs, their tokens, first) of every segment, in order."""
    plan = []
    for expert, start, stop, first in segments:
        for lo in range(start, stop, tile):
            c = slice(lo, min(lo + tile, stop))
            plan.append((expert, c, token_P[c], first))
    return plan


def _write_rows(out_TF, tok_n, rows_nF, first: bool) -> None:
    """out[tok] = rows (a token's first pair) or out[tok] += rows."""
    if first:
        out_TF.index_put_((tok_n,), rows_nF.to(out_TF.dtype))
    else:
        out_TF.index_add_(0, tok_n, rows_nF.to(out_TF.dtype))
