"""The sparse-delta SwiGLU kernel (DeRS-SM, ``dare``, ``magnitude``): the low-rank
kernel's structure with sparse products in place of the rank-R terms.

Base fc1 and fc2 run once per token through megatron's linears (outside the kernel,
as in :mod:`ders_megatron.layers.expert_compute`); the (token, slot) pairs, grouped
by expert (a ``PairOrder``: ``token_P``, ``order_P``, ``segments``), go through in
tiles of ``tile`` rows. Per tile of expert e (Δ as CSR, :mod:`ders_megatron.core.sparse_product`)::

    g = base_g[tok] + (Δg_e @ xᵀ)ᵀ ;  u = base_u[tok] + (Δu_e @ xᵀ)ᵀ ;  h = silu(g)·u
    hbar[tok] += p·h                       (fc2's base input, Σ_s p_s h_s)
    dout[tok] += p·(Δ2_e @ hᵀ)ᵀ            (fc2's delta term, Σ_s p_s Δ2_e h_s)

The backward recomputes g, u, h tile by tile (no ``[T·k, F]`` tensor is kept, the
layer saves what a dense SwiGLU MLP saves plus x) and uses, with
``G = dhbar[tok] + (Δ2_eᵀ @ ddoutᵀ)ᵀ``: ``dp = h·G``, ``dh = p·G``, then dg/du by the
SwiGLU derivative, ``dx[tok] += (Δg_eᵀ dgᵀ + Δu_eᵀ duᵀ)ᵀ`` and the values' gradients
as sampled products at the kept positions only.

It imports nothing of the low-rank kernel's module (which calls into this one).
Shapes: ``T`` tokens, ``H`` hidden, ``F`` this rank's FFN columns, ``P`` pairs, ``n`` a tile's pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ders_megatron.core.deltas import PositionDeltas
from ders_megatron.core.sparse_product import product_into, sampled_grad_into, sparse_dtype
from ders_megatron.layers.prob_grads import exact_products, prob_grad_dtype, product_scratch

MATRICES = ("fc1_gate", "fc1_up", "fc2")


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
        cd = sparse_dtype(base_T2F.dtype)
        mats = _expert_matrices(indexes, (vg_EK, vu_EK, v2_EK), cd, transposed=False)
        p_P1 = p_P.detach().unsqueeze(1)  # its own dtype: h·p rounds once, as megatron's MLP
        hbar_TF = base_T2F.new_empty(T, F_)
        dout_TH = base_T2F.new_empty(T, x_TH.shape[1])
        plan = _plan(segments, token_P, tile)
        gu_ = base_T2F.new_empty(tile, 2 * F_)
        products = _product_buffer(base_T2F, x_TH, tile, cd)
        for e, c, tok, first in plan:
            n = c.stop - c.start
            gu = _gate_up(base_T2F, tok, mats[e][0], _gather_t(x_TH, tok, cd), gu_[:n], products)
            h = torch._C._nn.silu(gu[:, :F_]).mul_(gu[:, F_:])  # [n, F]
            d2 = _rows(product_into(products, mats[e][1], h.t().to(cd).contiguous()))  # [n, H]
            _write_rows(dout_TH, tok, d2.mul_(p_P1[c]), first)
            _write_rows(hbar_TF, tok, h.mul_(p_P1[c]), first)
        ctx.save_for_backward(base_T2F, x_TH, vg_EK, vu_EK, v2_EK, p_P1)
        ctx.plan, ctx.tile, ctx.indexes, ctx.p_dtype = plan, tile, indexes, p_P.dtype
        return hbar_TF, dout_TH

    @staticmethod
    def backward(ctx, dhbar_TF, ddout_TH):
        base_T2F, x_TH, vg_EK, vu_EK, v2_EK, p_P1 = ctx.saved_tensors
        indexes, cd = ctx.indexes, sparse_dtype(base_T2F.dtype)
        values = (vg_EK, vu_EK, v2_EK)
        mats = _expert_matrices(indexes, values, cd, transposed=False)
        mats_t = _expert_matrices(indexes, values, cd, transposed=True)
        F_ = base_T2F.shape[1] // 2
        dhbar_TF = dhbar_TF.contiguous()
        grads = _Grads(base_T2F, x_TH, values, indexes, p_P1.shape[0], cd, ctx.p_dtype)
        gu_ = base_T2F.new_empty(ctx.tile, 2 * F_)
        s_ = base_T2F.new_empty(ctx.tile, F_)
        products = _product_buffer(base_T2F, x_TH, ctx.tile, cd)
        hG_ = product_scratch(base_T2F, ctx.tile, F_, grads.p_P.dtype)  # h·G, exact products
        dgu = base_T2F.new_empty(ctx.tile, 2 * F_)  # [dg | du]: one contiguous row per pair
        for e, c, tok, first in ctx.plan:
            n = c.stop - c.start
            s, dgu_ = s_[:n], dgu[:n]
            xT = _gather_t(x_TH, tok, cd)
            gu = _gate_up(base_T2F, tok, mats[e][0], xT, gu_[:n], products)
            g, u = gu[:, :F_], gu[:, F_:]
            torch._C._nn.silu(g, out=s)
            h = s * u
            ddoutT = _gather_t(ddout_TH, tok, cd)  # [H, n]
            G = torch.index_select(dhbar_TF, 0, tok)
            G.add_(_rows(product_into(products, mats_t[e][1], ddoutT)))  # dL/d(p h)
            grads.add_values(e, 1, ddoutT.mul_(p_P1[c].t().to(cd)), h.to(cd))
            torch.sum(exact_products(h, G, hG_), 1, out=grads.p_P[c])  # dL/dp = h·G
            G.mul_(p_P1[c])  # dL/dh
            torch.mul(G, s, out=dgu_[:, F_:])  # du = dL/dh · silu(g)
            torch.ops.aten.silu_backward.grad_input(G.mul_(u), g, grad_input=dgu_[:, :F_])  # dg
            _write_rows(grads.base_T2F, tok, dgu_, first)
            dguT = dgu_.t().to(cd).contiguous()  # [2F, n]
            dx = _rows(product_into(products, mats_t[e][0], dguT))  # [n, H]: Δgᵀ dg + Δuᵀ du, one product
            grads.x_TH.index_add_(0, tok, dx.to(grads.x_TH.dtype))
            grads.add_values(e, 0, dguT, xT.t())
        dvg, dvu, dv2 = grads.values_grads()
        return (grads.base_T2F, grads.x_TH, dvg, dvu, dv2, grads.p_P.to(ctx.p_dtype),
                None, None, None, None)


class _Grads:
    """Gradient buffers of :class:`_SparseSwiGLU`; the values' gradients accumulate per
    (expert, product) in CSR order, in place across the tiles (a sampled product into one
    CSR accumulator each: the stacked gate/up delta, fc2's), and land on the stored values
    at the end (kept positions only)."""

    def __init__(self, base_T2F, x_TH, values, indexes, pairs: int, dtype, p_dtype):
        self.base_T2F = torch.empty_like(base_T2F)  # every row written by its token's slot-0 pair
        self.x_TH = torch.zeros_like(x_TH)
        self.p_P = base_T2F.new_empty(pairs, dtype=prob_grad_dtype(p_dtype))
        self.values, self.indexes, self.dtype = values, indexes, dtype
        self.dvals = {}  # (expert, product) -> CSR accumulator, values [K'] in CSR order

    def add_values(self, e, product: int, dyT_On, x_nI) -> None:
        """dv += (dyᵀ x) at the kept positions of expert e's product (0: gate/up stacked, 1: fc2)."""
        key = (e, product)
        if key not in self.dvals:
            self.dvals[key] = _product_indexes(self.indexes[e])[product].pattern(self.dtype)
        sampled_grad_into(self.dvals[key], dyT_On, x_nI)

    def values_grads(self):
        out = [torch.zeros_like(v) for v in self.values]  # [E, K] each
        for (e, product), acc in self.dvals.items():
            gate, up, fc2 = self.indexes[e]
            dv = acc.values()
            parts = ((0, gate, dv[: gate.nnz]), (1, up, dv[gate.nnz:])) if product == 0 else ((2, fc2, dv),)
            for m, index, dv_m in parts:
                if index.value_index_K is None:
                    out[m][e] += dv_m.to(out[m].dtype)
                else:
                    out[m][e].index_add_(0, index.value_index_K, dv_m.to(out[m].dtype))
        return out


def _product_indexes(index3):
    """(gate; up stacked [2F, H], fc2 [H, F]): the two sparse products of one expert."""
    gate, up, fc2 = index3
    return gate.stacked_over(up), fc2


def _expert_matrices(indexes, values, dtype, transposed: bool):
    """Per expert, the stacked gate/up delta [2F, H] and fc2's [H, F] as CSR tensors in
    ``dtype`` (their transposes when ``transposed``), built once per call and shared by its
    tiles (no autograd: the kernel's own backward)."""
    with torch.no_grad():
        out = []
        for e, index3 in enumerate(indexes):
            gate, up, fc2 = index3
            vals_gu = torch.cat([gate.values(values[0][e]), up.values(values[1][e])]).to(dtype)
            vals_2 = fc2.values(values[2][e]).to(dtype)
            out.append(tuple(index.matrix_t(vals) if transposed else index.matrix(vals)
                             for index, vals in zip(_product_indexes(index3), (vals_gu, vals_2))))
        return out


def _product_buffer(base_T2F, x_TH, tile: int, dtype) -> torch.Tensor:
    """Room for any product's [O, n] result of a tile (O = 2F or H), reused by every product."""
    return base_T2F.new_empty(tile * max(base_T2F.shape[1], x_TH.shape[1]), dtype=dtype)


def _rows(yT_On: torch.Tensor) -> torch.Tensor:
    """A product's [O, n] result as contiguous rows [n, O]: one blocked transpose copy,
    cheaper than element-wise work on the strided view (measured, docs/benchmarks.md)."""
    return yT_On.t().contiguous()


def _gather_t(x_TH, tok_n, dtype) -> torch.Tensor:
    """x[tok]ᵀ as a contiguous [H, n] in the sparse kernels' dtype."""
    return x_TH.index_select(0, tok_n).t().to(dtype).contiguous()


def _gate_up(base_T2F, tok_n, mat_gu, xT_Hn, gu_n2F, products) -> torch.Tensor:
    """[g | u] <- base[tok] + ([Δg; Δu] xᵀ)ᵀ: one gather, one stacked product, one add."""
    torch.index_select(base_T2F, 0, tok_n, out=gu_n2F)
    return gu_n2F.add_(_rows(product_into(products, mat_gu, xT_Hn)))


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
