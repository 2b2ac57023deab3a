"""Fused DeRS MoE layer: one shared base, linearity instead of token dispatch.

:class:`FusedDeRSMoELayer` takes the place of megatron-core's ``MoELayer`` in a
layer spec (``--moe-ders-impl fused``). It keeps megatron's router
(``TopKRouter``: score functions, pre/post softmax, aux/seq/global aux losses,
z-loss, expert bias, token dropping) and shared expert, and replaces
dispatch + experts + combine with two identities (``W_e = W_base + Δ_e``)::

    W1_e x              = W1_base x + Δ1_e x                      (base fc1 once per token)
    Σ_s p_s W2_{e_s} h_s = W2_base (Σ_s p_s h_s) + Σ_s p_s Δ2_{e_s} h_s  (base fc2 once per token)

so the layer costs the dense FFN it was upcycled from plus the k activations
and the delta terms. Shapes: ``T`` tokens, ``H`` hidden, ``F`` this rank's FFN
columns, ``k`` top-k slots, ``E`` experts, ``R`` rank, ``ER = E·R``.

The delta terms and the low-rank SwiGLU kernel are in
:mod:`ders_megatron.layers.expert_compute` (the drop-in experts run the same kernel).

Parallel layout (the drop-in experts' placement, ``ders_megatron/layers/placement.py``):
the layer holds a :class:`~ders_megatron.layers.experts.DeRSExperts` with ALL experts
(so parameter names and ``sharded_state_dict`` are the drop-in path's, and a
checkpoint written by one path loads into the other). With expert-TP = TP > 1
the base is a column/row-parallel dense MLP under sequence parallelism: the
input (and the routing) is all-gathered from the SP region, the partial output
reduce-scattered; the deltas are replicated and each rank applies the slice of
its base shard (their gradients are partial sums over TP, marked
``sequence_parallel`` so ``finalize_model_grads`` sums them). With expert-TP 1
every TP rank holds the whole base and runs its own sequence chunk, with no
communication at all.

Expert parallelism is rejected (``--expert-model-parallel-size`` must be 1):
every rank already holds every expert's delta, so there is nothing to
dispatch; the EP ranks would only be data-parallel replicas, and the drop-in
experts' gradient reduction (expert-DP) would then miss them.
"""

from __future__ import annotations

import logging

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.utils import log_single_rank

from ders_megatron.layers.expert_compute import fused_expert_compute, kernel_tile, lowrank_swiglu_applies, routed_slots
from ders_megatron.layers.experts import DeRSMoELayer
from ders_megatron.layers.sparse_compute import sparse_swiglu_applies

logger = logging.getLogger(__name__)

def check_fused_supported(config, pg_collection) -> None:
    """Refuse settings the fused layer does not implement, naming the flag."""
    ep = pg_collection.ep.size()
    if ep > 1:
        raise ValueError(
            "--moe-ders-impl fused keeps every expert's delta on every rank and dispatches no "
            f"tokens, so it does not use expert parallelism: set --expert-model-parallel-size 1 "
            f"(got {ep}) or use --moe-ders-impl dropin."
        )
    refused = {
        "--moe-apply-probs-on-input": config.moe_apply_probs_on_input,
        "--moe-shared-expert-overlap": config.moe_shared_expert_overlap,
        "--moe-latent-size": config.moe_latent_size,
    }
    for flag, value in refused.items():
        if value:
            raise ValueError(f"{flag} is not supported with --moe-ders-impl fused (no token dispatcher)")


class FusedDeRSMoELayer(DeRSMoELayer):
    """megatron-core's MoE layer with dispatch/experts/combine replaced by the fused form.

    Built by ``MoELayer.__init__`` from the drop-in submodules, so ``router``,
    ``experts`` (a ``DeRSExperts`` holding all experts) and ``shared_experts``
    are the drop-in path's modules; TransformerLayer treats it as an MoE layer
    (``transformer/transformer_layer.py:445``). The token dispatcher megatron
    builds is never used.
    """

    def __init__(
        self,
        config,
        submodules=None,
        layer_number=None,
        pg_collection=None,
        is_mtp_layer: bool = False,
        name: str | None = None,
        ders=None,
    ):
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        check_fused_supported(config, pg_collection)
        super().__init__(
            config=config,
            submodules=submodules,
            layer_number=layer_number,
            pg_collection=pg_collection,
            is_mtp_layer=is_mtp_layer,
            name=name,
        )
        self.ders = ders
        if self.experts.own_bias:
            raise ValueError("per-expert biases (--add-bias-linear) are not in the fused layer: use "
                             "--moe-ders-impl dropin, or --moe-ders-shared-bias (one bias in the shared base)")
        p = self.experts.placement
        log_single_rank(
            logger,
            logging.INFO,
            f"DeRS fused MoE layer: all {config.num_moe_experts} experts' deltas on every rank, no "
            f"token dispatch; expert parallelism unused (EP=1); base "
            + (f"sharded over TP={p.tp_size} (SP gather / reduce-scatter)" if p.base_sharded else "whole on each rank")
            + f"; {self._kernel_name()}.",
        )

    def _kernel_name(self) -> str:
        if lowrank_swiglu_applies(self.experts):
            return "low-rank SwiGLU kernel"
        return "sparse SwiGLU kernel" if sparse_swiglu_applies(self.experts) else "generic delta path"

    def forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
        """hidden_states [S, B, H] (S/tp under SP) -> ([S, B, H], None), as ``MoELayer.forward``."""
        if intermediate_tensors is not None:
            raise NotImplementedError("the fused DeRS MoE layer does not support partial CUDA-graph capture")
        # Same guard as transformer/moe/moe_layer.py:629.
        if self.training and self.attn_tp_group.size() > 1 and not self.config.sequence_parallel:
            raise ValueError("MoE with tensor parallelism needs --sequence-parallel during training")
        if padding_mask is not None:
            padding_mask = padding_mask.transpose(0, 1).bool()  # as moe_layer.py:647
        if self.moe_layer_recompute and self.training:  # as moe_layer.py:694
            if self.config.fp8 or self.config.fp4:
                from megatron.core.extensions.transformer_engine import te_checkpoint

                return te_checkpoint(
                    self._forward, False, tensor_parallel.random.get_cuda_rng_tracker,
                    self.tp_group, hidden_states, padding_mask,
                )
            return tensor_parallel.checkpoint(self._forward, False, hidden_states, padding_mask)
        return self._forward(hidden_states, padding_mask)

    def _forward(self, hidden_states, padding_mask=None):
        shared_output = self.shared_experts_compute(hidden_states)  # None without shared expert
        probs_TE, routing_map_TE = self.route(hidden_states, padding_mask)
        output = self.fused_experts(hidden_states, probs_TE, routing_map_TE)
        if shared_output is not None:
            output = output + shared_output
        return output, None

    def fused_experts(self, hidden_states, probs_TE, routing_map_TE):
        """Routed experts on [S, B, H] local tokens -> [S, B, H], no dispatch."""
        idx_Tk, p_Tk = routed_slots(probs_TE, routing_map_TE, self.config.moe_router_topk)
        comm = self.experts.placement.base_sharded  # expert-TP = TP > 1, SP on
        x = hidden_states
        if comm:
            # Backward reduce-scatters: each TP rank's dx / dp is a partial sum over its F slice.
            x = gather_from_sequence_parallel_region(x, group=self.tp_group)
            p_Tk = gather_from_sequence_parallel_region(p_Tk, group=self.tp_group)
            idx_Tk = gather_from_sequence_parallel_region(idx_Tk, group=self.tp_group)
        x_TH = x.reshape(-1, x.shape[-1])
        tile = kernel_tile(self.experts, x_TH, self.ders.kernel_tile)
        out_TH = fused_expert_compute(self.experts, x_TH, idx_Tk, p_Tk, tile)
        out = out_TH.view(x.shape)
        if comm:
            out = reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
        return out
