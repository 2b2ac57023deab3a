"""The experts' math on routed (token, slot) pairs: the generic delta path and the
low-rank SwiGLU kernel, shared by the fused layer and the drop-in experts.

Both take a :class:`~ders_megatron.layers.experts.DeRSExperts` (its public API:
``linear_fc1/2``, ``deltas``, ``base_slices``, ``delta_terms``, ``activation``,
``ders``) and import nothing of it, so the experts module can run the kernel on
its dispatched rows without an import cycle. Shapes: ``T`` tokens, ``H`` hidden,
``F`` this rank's FFN columns, ``k`` top-k slots, ``E`` experts, ``R`` rank,
``ER = E·R``, ``P`` (token, slot) pairs.

Two forms of the delta terms:

* low-rank + SwiGLU (the DeRS-LM case), :class:`_LowRankSwiGLU`: the (token,
  slot) pairs are grouped by expert once (one stable sort), and each expert's
  pairs go through in tiles of ``token_tile`` rows: gather the shared fc1
  output rows, add the rank-R term (one GEMM with K = 2R for gate and up), the
  activation, and scatter-add ``p·h`` into ``hbar = Σ_s p_s h_s``. A tile's
  scratch stays in cache and no ``[T·k, F]`` tensor exists; the backward
  recomputes the activations tile by tile instead of saving them, so the layer
  saves what a dense SwiGLU MLP saves (fc1 output, fc2 input) plus
  ``O(T·k·R)``. The A factors of every expert are one GEMM (``[T, 2·E·R]``);
  the fc2 B side is one GEMM against the concatenated factors with the routing
  one-hot on the R-sized side (``[T, E·R] @ [E·R, H]``).
* values-at-positions kinds (``sparse``, ``magnitude``) + SwiGLU: the same tiled
  structure with sparse products, :mod:`ders_megatron.layers.sparse_compute`.
* every other kind/activation, :func:`generic_expert_compute`: base once per
  token, deltas per expert on the pairs routed to it (``DeRSExperts``' own
  delta application over one sorted gather/scatter), autograd for the rest
  (``[T, k, F]`` activations).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from ders_megatron.layers.prob_grads import exact_products, prob_grad_dtype, product_scratch
from ders_megatron.layers.sparse_compute import sparse_swiglu_applies, sparse_swiglu_compute

# Elements per [rows, F] scratch buffer of the low-rank kernel on CPU. Measured on
# the whole layer (docs/benchmarks.md, 2-core Xeon, F = 4096, top-2): 256 rows beat
# 64, 128 and 512 (fused 516 vs 525 ms, drop-in 947 vs 994 ms at 64): past L2, but
# each tile costs ~25 op dispatches (~125 us of Python), which small tiles multiply.
# On CUDA one tile holds a whole expert's pairs.
CPU_TILE_ELEMENTS = 256 * 4096


def cpu_token_tile(ffn_columns: int) -> int:
    """Rows per tile on CPU for this rank's FFN width: a power of two in [16, 1024]."""
    rows = max(16, min(1024, CPU_TILE_ELEMENTS // max(ffn_columns, 1)))
    return 1 << (rows.bit_length() - 1)


def kernel_tile(experts, x_TH: torch.Tensor, tile: int | None) -> int:
    """Rows per tile of the low-rank kernel: all of them on CUDA, else ``tile`` (a test's or
    benchmark's choice) or :func:`cpu_token_tile` of this rank's FFN shard."""
    if x_TH.is_cuda:
        return x_TH.shape[0]
    return tile or cpu_token_tile(experts.linear_fc2.weight.shape[1])


# --------------------------------------------------------------------------- #
# Routing: [T, E] probabilities + map -> k slots per token.
# --------------------------------------------------------------------------- #
def routed_slots(probs_TE: torch.Tensor, routing_map_TE: torch.Tensor, topk: int):
    """(expert index [T, k], probability [T, k]) of each token's k slots.

    The router's [T, E] outputs already carry megatron's semantics
    (``moe_utils.py:710`` top-k, ``moe_utils.py:958`` capacity dropping, which
    zeroes dropped probabilities; with ``pad_to_capacity`` the map may hold more
    than k zero-probability pairs). Slots take the pairs with a non-zero
    probability first, then mapped pairs, then any: an extra pair has p = 0, so
    it adds nothing, and the gradient it sends to ``probs_TE`` lands on an
    entry megatron built as ``scores * mask`` or by scatter, which is zero
    upstream (``moe_utils.py:1020``).
    """
    key_TE = routing_map_TE.to(probs_TE.dtype) + 2 * (probs_TE.detach() != 0).to(probs_TE.dtype)
    idx_Tk = key_TE.topk(topk, dim=1).indices
    return idx_Tk, probs_TE.gather(1, idx_Tk)


# --------------------------------------------------------------------------- #
# Expert compute on [T, H] tokens that every rank holds.
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class PairOrder:
    """The (token, slot) pairs in an order that groups them by expert.

    Sort key (slot, expert): each slot's pairs form one block of ``P / slots``
    rows (the slot-0 block holds every token exactly once, so the kernel writes a
    token's row there and adds to it in later blocks), sorted by expert inside.
    ``counts_SE`` stays on the pairs' device: the low-rank kernel turns it into
    grouped-GEMM offsets without a host sync. ``segments``, the non-empty runs
    (expert, start, stop, first) as Python ints, is built on first use (one
    device-to-host copy) for the paths that loop over experts.
    """

    order_P: torch.Tensor  # pair id (t·k + s) of each sorted pair
    token_P: torch.Tensor  # its token
    expert_P: torch.Tensor  # its expert
    counts_SE: torch.Tensor  # [slots, E] pairs per (slot, expert)

    @classmethod
    def grouped(cls, expert_Q, slot_Q, token_Q, num_experts: int, slots: int = 1) -> "PairOrder":
        """From pairs in their natural order (pair id q): expert, slot and token of each."""
        key = slot_Q * num_experts + expert_Q
        order = key.argsort(stable=True)
        counts = torch.bincount(key, minlength=slots * num_experts).view(slots, num_experts)
        return cls(order, token_Q[order], expert_Q[order], counts)

    @classmethod
    def by_expert(cls, idx_Tk: torch.Tensor, num_experts: int) -> "PairOrder":
        """Grouped by expert alone, experts in order (what ``DeRSExperts.delta_terms`` takes)."""
        q = torch.arange(idx_Tk.numel(), device=idx_Tk.device)
        return cls.grouped(idx_Tk.flatten(), torch.zeros_like(q), q // idx_Tk.shape[1], num_experts)

    @classmethod
    def by_slot_and_expert(cls, idx_Tk: torch.Tensor, num_experts: int) -> "PairOrder":
        k = idx_Tk.shape[1]
        q = torch.arange(idx_Tk.numel(), device=idx_Tk.device)
        return cls.grouped(idx_Tk.flatten(), q % k, q // k, num_experts, k)

    @classmethod
    def rows(cls, tokens_per_expert: torch.Tensor, device) -> "PairOrder":
        """Rows grouped by expert (a token dispatcher's output): each row one pair, one slot.

        The expert of each row is expanded where the counts live (a CPU tensor by the
        experts contract, so no host sync on CUDA) and then copied to ``device``."""
        counts = tokens_per_expert
        experts = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts).to(device)
        q = torch.arange(experts.numel(), device=device)
        return cls.grouped(experts, torch.zeros_like(q), q, len(counts))

    @cached_property
    def segments(self) -> list[tuple[int, int, int, bool]]:
        return _segments(self.counts_SE.flatten().tolist(), self.counts_SE.shape[1])

    def require_every_row(self, rows: int) -> None:
        """Refuse ``rows`` outputs that the slot-0 block does not write one by one.

        The kernels allocate their per-token outputs (``hbar``, ``dout``, d(base)) with
        ``new_empty``: each row is written by its token's slot-0 pair and added to by
        the later slots. Both constructors put every token in slot 0 once
        (:meth:`by_slot_and_expert` T tokens, :meth:`rows` each row its own token), so
        that is every row exactly when the block holds ``rows`` pairs; a row outside it
        would leave uninitialised memory in the output and, through the base linears,
        in the weight gradients (``DeRSExperts.forward`` cuts a dispatcher's padding
        rows off before the kernel for that reason)."""
        slots = self.counts_SE.shape[0]
        if self.order_P.numel() != slots * rows:
            raise ValueError(
                f"the DeRS kernel got {rows} rows but {self.order_P.numel()} (token, slot) pairs in "
                f"{slots} slot(s): rows that belong to no pair would stay unwritten"
            )

    def counts_per_expert(self, num_experts: int) -> list[int]:
        counts = [0] * num_experts
        for expert, start, stop, _ in self.segments:
            counts[expert] += stop - start
        return counts


def _segments(counts: list[int], num_experts: int) -> list[tuple[int, int, int, bool]]:
    """Non-empty runs (expert, start, stop, first) from counts per (slot, expert) key."""
    out, start = [], 0
    for key, count in enumerate(counts):
        if count:
            out.append((key % num_experts, start, start + count, key < num_experts))
        start += count
    return out


def dropin_sparse_swiglu(experts, dispatched_input, tokens_per_expert, permuted_probs, tile=None):
    """The sparse-delta SwiGLU kernel on dispatched rows (each row one pair, one slot)."""
    pairs = PairOrder.rows(tokens_per_expert, dispatched_input.device)
    tile = kernel_tile(experts, dispatched_input, tile)
    return sparse_swiglu_compute(experts, dispatched_input, pairs, permuted_probs.unsqueeze(1), tile)


def dropin_lowrank_swiglu(experts, dispatched_input, tokens_per_expert, permuted_probs, tile=None):
    """The fused low-rank SwiGLU kernel on dispatched rows: ``DeRSExperts.forward``'s result.

    Each dispatched row is a "token" with one slot, so the base GEMMs run over all
    rows once (as the drop-in path does) and the deltas/activation go through
    :class:`_LowRankSwiGLU` instead of per-expert ``[rows, F]`` temporaries. A
    proposal for the drop-in path (docs/benchmarks.md); needs
    :func:`lowrank_swiglu_applies` and no ``--moe-apply-probs-on-input``.
    """
    pairs = PairOrder.rows(tokens_per_expert, dispatched_input.device)
    tile = kernel_tile(experts, dispatched_input, tile)
    return lowrank_swiglu_compute(experts, dispatched_input, pairs, permuted_probs.unsqueeze(1), tile)


def fused_expert_compute(experts, x_TH, idx_Tk, p_Tk, tile: int) -> torch.Tensor:
    """Σ_s p_s · expert_{idx_s}(x) for every token: [T, H] (a partial sum over TP when sharded)."""
    E = experts.num_local_experts
    if lowrank_swiglu_applies(experts):
        return lowrank_swiglu_compute(experts, x_TH, PairOrder.by_slot_and_expert(idx_Tk, E), p_Tk, tile)
    if sparse_swiglu_applies(experts):
        return sparse_swiglu_compute(experts, x_TH, PairOrder.by_slot_and_expert(idx_Tk, E), p_Tk, tile)
    return generic_expert_compute(experts, x_TH, PairOrder.by_expert(idx_Tk, E), p_Tk)


def lowrank_swiglu_applies(experts) -> bool:
    config = experts.config
    return (
        experts.ders.kind == "lowrank"
        and config.gated_linear_unit
        and config.activation_func is F.silu
        and config.activation_func_clamp_value is None
        and not config.glu_linear_offset
        and grouped_gemm_fits(experts.linear_fc2.weight.shape[1], experts.linear_fc2.weight.dtype)
    )


def generic_expert_compute(experts, x_TH, pairs: PairOrder, p_Tk) -> torch.Tensor:
    """Any delta kind and activation: [T, k, F] activations, deltas per expert segment."""
    T, k = p_Tk.shape
    gated = experts.config.gated_linear_unit
    counts = pairs.counts_per_expert(experts.num_local_experts)
    fc1_TF, fc1_bias = experts.linear_fc1(x_TH)  # base: once per token
    delta_PF = experts.delta_terms(x_TH[pairs.token_P], counts, ("fc1_gate", "fc1_up") if gated else ("fc1",))
    delta_PF = torch.zeros_like(delta_PF).index_copy(0, pairs.order_P, delta_PF)  # back to (token, slot) order
    fc1_TkF = fc1_TF.unsqueeze(1) + delta_PF.view(T, k, -1)
    if fc1_bias is not None:
        fc1_TkF = fc1_TkF + fc1_bias
    h_TkF = experts.activation(fc1_TkF)
    h_TkF = (h_TkF * p_Tk.unsqueeze(-1)).to(h_TkF.dtype)  # probabilities as DeRSExperts applies them

    out_TH, fc2_bias = experts.linear_fc2(h_TkF.sum(1))  # base: once per token on Σ_s p_s h_s
    h_PF = h_TkF.reshape(T * k, -1)[pairs.order_P]
    out_TH = out_TH.index_add(0, pairs.token_P, experts.delta_terms(h_PF, counts, ("fc2",)))
    if fc2_bias is not None:
        out_TH = out_TH + fc2_bias * p_Tk.sum(1, keepdim=True).to(out_TH.dtype)
    return out_TH


def lowrank_swiglu_compute(experts, x_TH, pairs: PairOrder, p_Tk, tile: int) -> torch.Tensor:
    """DeRS-LM with SwiGLU: base GEMMs through megatron's linears, the middle fused.

    fc1: ``a = s·[A_gate; A_up] x`` for every expert at once ([T, 2, E, R], one GEMM),
    each pair picks its expert's 2R values. fc2: the kernel returns ``v = A2_e h``
    per pair; ``p·s·v`` is scattered into a [T, E·R] matrix (one-hot on the R side)
    and ONE GEMM against the concatenated B2 gives Σ_s p_s Δ2_e h_s. The rank goes
    into the kernel zero-padded to :func:`aligned_rank` (grouped GEMM operands need
    16-byte rows); the padding contributes exact zeros and its gradients are dropped.
    """
    deltas = experts.deltas
    gate, up, fc2 = deltas["fc1_gate"], deltas["fc1_up"], deltas["fc2"]
    rows, _ = experts.base_slices["fc1_gate"]
    _, cols = experts.base_slices["fc2"]
    E, R, H = gate.lora_A.shape
    T = x_TH.shape[0]
    pairs.require_every_row(T)
    scale = gate.scale

    base_T2F, fc1_bias = experts.linear_fc1(x_TH)  # base fc1 once per token
    if fc1_bias is not None:
        base_T2F = base_T2F + fc1_bias
    Rp = aligned_rank(R, base_T2F.dtype)
    a_T2ER = x_TH @ torch.cat([gate.lora_A.reshape(E * R, H), up.lora_A.reshape(E * R, H)]).t()
    a_P2R = a_T2ER.view(T, 2, E, R)[pairs.token_P, :, pairs.expert_P] * scale  # [P, 2, R]
    a_P2R = _pad_rank(a_P2R, Rp, dim=2).reshape(-1, 2 * Rp)
    p_P = p_Tk.flatten()[pairs.order_P]
    hbar_TF, v_PR = _LowRankSwiGLU.apply(
        base_T2F, a_P2R,
        _pad_rank(gate.lora_B[:, rows or slice(None)].transpose(1, 2), Rp, dim=1),  # [E, R, F]
        _pad_rank(up.lora_B[:, rows or slice(None)].transpose(1, 2), Rp, dim=1),
        _pad_rank(fc2.lora_A[:, :, cols or slice(None)], Rp, dim=1),
        p_P, pairs.token_P, _kernel_tiles(pairs, tile),
    )
    v_PR = v_PR[:, :R]
    out_TH, fc2_bias = experts.linear_fc2(hbar_TF)  # base fc2 once per token, on Σ_s p_s h_s
    pv_PR = (v_PR * (p_P * scale).unsqueeze(1)).to(v_PR.dtype)  # in p's dtype: dp stays fp32 (prob_grad_dtype)
    z_TER = v_PR.new_zeros(T, E, R).index_put((pairs.token_P, pairs.expert_P), pv_PR)  # (token, expert) unique
    out_TH = torch.addmm(out_TH, z_TER.view(T, E * R), fc2.lora_B.permute(1, 0, 2).reshape(-1, E * R).t())
    if fc2_bias is not None:
        out_TH = out_TH + fc2_bias * p_Tk.sum(1, keepdim=True).to(out_TH.dtype)
    return out_TH


def aligned_rank(rank: int, dtype: torch.dtype) -> int:
    """The rank rounded up to 16-byte rows of ``dtype``: grouped GEMM operands need them
    (``torch.nn.functional.grouped_mm`` refuses other strides on CPU and CUDA)."""
    per_row = 16 // torch.empty((), dtype=dtype).element_size()
    return -(-rank // per_row) * per_row


def grouped_gemm_fits(ffn_columns: int, dtype: torch.dtype) -> bool:
    """Whether ``[rows, F]`` operands have 16-byte rows, which the kernel's grouped GEMMs need."""
    return ffn_columns * torch.empty((), dtype=dtype).element_size() % 16 == 0


def _pad_rank(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """``t`` zero-padded to ``rank`` along ``dim`` (autograd slices the gradient back)."""
    missing = rank - t.shape[dim]
    if not missing:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, missing]
    return F.pad(t, pad)


@dataclass(frozen=True)
class KernelTile:
    """A tile of the kernel: consecutive pairs of one slot (so at most one per token)."""

    pairs: slice  # its rows of the sorted pairs
    token_n: torch.Tensor  # their tokens
    offsets_E: torch.Tensor  # int32 [E]: end of each expert's rows within the tile (grouped GEMM offsets)
    first: bool  # slot 0: every token's row of the outputs is written here, then added to


def _kernel_tiles(pairs: PairOrder, tile: int) -> list[KernelTile]:
    """Each slot's block of pairs cut into tiles of ``tile`` rows, whatever the experts.

    The number of tiles is ``slots · ceil(P / slots / tile)`` and every tile's
    expert boundaries come from one device computation on ``counts_SE`` (no host
    sync, no per-expert work): a tile spans as many experts as its rows hold.
    """
    slots, _ = pairs.counts_SE.shape
    per_slot = pairs.order_P.numel() // slots
    tile = max(1, min(tile, per_slot))
    starts = range(0, per_slot, tile)
    if not starts:
        return []
    device = pairs.counts_SE.device
    lo_J = torch.arange(0, per_slot, tile, device=device)
    rows_J = (per_slot - lo_J).clamp(max=tile)
    ends_SE = pairs.counts_SE.cumsum(1)  # each expert's end within its slot's block
    offsets_SJE = torch.minimum((ends_SE[:, None, :] - lo_J[None, :, None]).clamp(min=0), rows_J[None, :, None])
    offsets_SJE = offsets_SJE.to(torch.int32)
    tiles = []
    for s in range(slots):
        for j, lo in enumerate(starts):
            rows = slice(s * per_slot + lo, s * per_slot + min(lo + tile, per_slot))
            tiles.append(KernelTile(rows, pairs.token_P[rows], offsets_SJE[s, j], s == 0))
    return tiles


def _gmm(a: torch.Tensor, b: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Grouped GEMM over a tile's expert groups: [n, K] x [E, K, N] -> [n, N] (group e's
    rows times b[e]) or [K, n] x [n, N] -> [E, K, N] (each group's product)."""
    return F.grouped_mm(a, b, offs=offsets_E)


class _LowRankSwiGLU(torch.autograd.Function):
    """From the shared fc1 output to fc2's input, for DeRS-LM SwiGLU experts.

    forward(base [T, 2F], a [P, 2R] (scaled, per pair), b1g, b1u, a2 [E, R, F], p [P],
    token [P], tiles) -> (hbar [T, F] = Σ_pairs p·h, v [P, R] = A2_e h)

    with pairs in :class:`PairOrder` order and, per pair of expert e,
    ``g = base_g[token] + a_g B1g_e``, ``u`` likewise (B1 passed transposed, [R, F]),
    ``h = silu(g)·u``. Pairs go tile by tile (:func:`_kernel_tiles`): a tile's
    scratch stays in cache and no [T·k, F] tensor is kept; the backward recomputes
    g, u, h instead of saving them, so the layer saves what a dense SwiGLU MLP saves
    (fc1 output, fc2 input) plus O(T·k·R). A token's rows of hbar and d(base) are
    written by its slot-0 pair and added to by the others (no zero fill).

    Every per-expert product of a tile is ONE grouped GEMM (``grouped_mm`` with the
    tile's expert offsets), so the ops per tile, and per layer, do not depend on
    the number of experts (tests/test_fused.py::test_kernel_ops_do_not_grow_with_experts):
    about 12 ops a tile forward and 22 backward. Element-wise work stays in
    contiguous tiles (elementwise ops and row scatters run several times slower on
    strided views on CPU, docs/benchmarks.md).
    """

    @staticmethod
    def forward(ctx, base_T2F, a_P2R, b1g_ERF, b1u_ERF, a2_ERF, p_P, token_P, tiles):
        base_T2F = base_T2F.contiguous()
        b1g_ERF, b1u_ERF, a2_ERF = b1g_ERF.contiguous(), b1u_ERF.contiguous(), a2_ERF.contiguous()
        R, F_ = a2_ERF.shape[1:]
        p_P1 = p_P.detach().unsqueeze(1)  # its own dtype: h·p rounds once, as megatron's MLP (mlp.py:337-340)
        hbar_TF = base_T2F.new_empty(base_T2F.shape[0], F_)
        v_PR = base_T2F.new_empty(p_P.shape[0], R)
        longest = max((t.token_n.shape[0] for t in tiles), default=0)
        g_, u_, h_ = _scratch(base_T2F, longest, F_, 3)
        a2_EFR = a2_ERF.transpose(1, 2)
        for t in tiles:
            n = t.token_n.shape[0]
            g, u, h = g_[:n], u_[:n], h_[:n]
            _gate_up_grouped(base_T2F, t, a_P2R[t.pairs], b1g_ERF, b1u_ERF, g, u)
            torch._C._nn.silu(g, out=h)
            h.mul_(u)
            v_PR[t.pairs] = _gmm(h, a2_EFR, t.offsets_E)  # v = A2_e h
            _write_rows(hbar_TF, t.token_n, h.mul_(p_P1[t.pairs]), t.first)
        ctx.save_for_backward(base_T2F, a_P2R, b1g_ERF, b1u_ERF, a2_ERF, p_P1)
        ctx.tiles, ctx.longest, ctx.p_dtype = tiles, longest, p_P.dtype
        return hbar_TF, v_PR

    @staticmethod
    def backward(ctx, dhbar_TF, dv_PR):
        base_T2F, a_P2R, b1g_ERF, b1u_ERF, a2_ERF, p_P1 = ctx.saved_tensors
        R, F_ = a2_ERF.shape[1:]
        dhbar_TF = dhbar_TF.contiguous()
        dv_PR = a_P2R.new_zeros(a_P2R.shape[0], R) if dv_PR is None else dv_PR.contiguous()
        grads = _Grads(base_T2F, a_P2R, a2_ERF, ctx.p_dtype)
        g_, u_, s_, dh_ = _scratch(base_T2F, ctx.longest, F_, 4)
        hp_ = product_scratch(base_T2F, ctx.longest, F_, grads.p_P.dtype)  # h·dhbar, exact products
        dgu = base_T2F.new_empty(ctx.longest, 2 * F_)  # [dg | du]: one contiguous row per pair
        for t in ctx.tiles:
            n, c, offsets = t.token_n.shape[0], t.pairs, t.offsets_E
            g, u, s, dh, dgu_ = g_[:n], u_[:n], s_[:n], dh_[:n], dgu[:n]
            _gate_up_grouped(base_T2F, t, a_P2R[c], b1g_ERF, b1u_ERF, g, u)
            torch._C._nn.silu(g, out=s)
            h = torch.mul(s, u)
            grads.a2_ERF += _gmm(dv_PR[c].t(), h, offsets)  # v = A2_e h
            torch.index_select(dhbar_TF, 0, t.token_n, out=dh)  # dL/d(p h)
            torch.sum(exact_products(h, dh, hp_), 1, out=grads.p_P[c])  # dL/dp = h · dhbar
            dLdh = _gmm(dv_PR[c], a2_ERF, offsets).addcmul_(dh, p_P1[c])  # p·dhbar + A2_eᵀ dv
            torch.mul(dLdh, s, out=dgu_[:, F_:])  # du = dL/dh · silu(g)
            torch.mul(dLdh, u, out=dh)  # dL/dh · u
            torch.ops.aten.silu_backward.grad_input(dh, g, grad_input=dgu_[:, :F_])  # dg
            grads.add_pair_tile(t, dgu_, a_P2R[c], b1g_ERF, b1u_ERF)
        return (grads.base_T2F, grads.a_P2R, grads.b1g_ERF, grads.b1u_ERF, grads.a2_ERF,
                grads.p_P.to(ctx.p_dtype), None, None)


class _Grads:
    """Gradient buffers of :class:`_LowRankSwiGLU`; the factor gradients accumulate tile by tile."""

    def __init__(self, base_T2F, a_P2R, a2_ERF, p_dtype):
        self.base_T2F = torch.empty_like(base_T2F)  # every row written by its token's slot-0 pair
        self.a_P2R = torch.empty_like(a_P2R)
        self.p_P = a_P2R.new_empty(a_P2R.shape[0], dtype=prob_grad_dtype(p_dtype))
        self.b1g_ERF, self.b1u_ERF, self.a2_ERF = (torch.zeros_like(a2_ERF) for _ in range(3))

    def add_pair_tile(self, t: KernelTile, dgu_n2F, a_n2R, b1g_ERF, b1u_ERF):
        """[dg | du] of one tile into d(base), d(a) and dB1 (g = base_g + a_g B1g_e, u likewise)."""
        R, F_ = b1g_ERF.shape[1:]
        dg, du = dgu_n2F[:, :F_], dgu_n2F[:, F_:]
        _write_rows(self.base_T2F, t.token_n, dgu_n2F, t.first)
        self.a_P2R[t.pairs, :R] = _gmm(dg, b1g_ERF.transpose(1, 2), t.offsets_E)
        self.a_P2R[t.pairs, R:] = _gmm(du, b1u_ERF.transpose(1, 2), t.offsets_E)
        self.b1g_ERF += _gmm(a_n2R[:, :R].t(), dg, t.offsets_E)
        self.b1u_ERF += _gmm(a_n2R[:, R:].t(), du, t.offsets_E)


def _gate_up_grouped(base_T2F, t: KernelTile, a_n2R, b1g_ERF, b1u_ERF, g_nF, u_nF) -> None:
    """g <- base_gate[tok] + a_g B1g_e ; u <- base_up[tok] + a_u B1u_e (rank-R updates, one
    grouped GEMM each over the tile's experts)."""
    F_, R = g_nF.shape[1], b1g_ERF.shape[1]
    torch.index_select(base_T2F[:, :F_], 0, t.token_n, out=g_nF)
    torch.index_select(base_T2F[:, F_:], 0, t.token_n, out=u_nF)
    g_nF.add_(_gmm(a_n2R[:, :R], b1g_ERF, t.offsets_E))
    u_nF.add_(_gmm(a_n2R[:, R:], b1u_ERF, t.offsets_E))


def _scratch(like, tile, F_, count):
    return [like.new_empty(tile, F_) for _ in range(count)]


def _write_rows(out_TF, tok_n, rows_nF, first: bool) -> None:
    """out[tok] = rows (a token's first pair) or out[tok] += rows."""
    if first:
        out_TF.index_put_((tok_n,), rows_nF)
    else:
        out_TF.index_add_(0, tok_n, rows_nF)
