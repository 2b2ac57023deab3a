"""Extended DeRS: the shared expert ("universal FFN") as the routed experts' base plus
its own light delta, so it adds no full FFN.

It replaces megatron-core's ``SharedExpertMLP`` (``transformer/moe/shared_experts.py``)
in ``MoESubmodules.shared_experts`` and keeps its semantics: every token goes
through it, an optional sigmoid gate scales it (``--moe-shared-expert-gate``),
no bias. The base tensors are the ones of :class:`~ders_megatron.layers.experts.DeRSExperts`
in the same layer, attached by :class:`~ders_megatron.layers.experts.DeRSMoELayer`.

Communication follows the base's placement: with the base sharded over TP
(= expert-TP), the sequence-parallel input is all-gathered and the partial
output reduce-scattered, as a dense MLP under SP; with expert-TP 1 each TP rank
holds the whole base and runs its own sequence chunk with no communication.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)

from ders_megatron.core.config import check_shared_expert, delta_matrices
from ders_megatron.core.deltas import build_deltas, merge_ffn
from ders_megatron.layers.placement import ExpertPlacement


class DeRSSharedExpert(MegatronModule):
    """Shared expert = W_base + Δ_shared, built with megatron's shared-experts signature."""

    def __init__(self, *, config, pg_collection, gate: bool, name: str | None = None, ders):
        super().__init__(config=config)
        check_shared_expert("ders", ders.kind, config.moe_shared_expert_intermediate_size,
                            config.moe_ffn_hidden_size)
        if config.add_bias_linear:
            raise ValueError("shared experts support no bias (as megatron's); pass --disable-bias-linear")
        if config.moe_shared_expert_overlap:
            raise ValueError("--moe-shared-expert-overlap is not supported with --moe-ders-shared-expert ders")
        self.placement = ExpertPlacement.from_groups(pg_collection, config)
        self.tp_group = pg_collection.tp
        shared_id = config.num_moe_experts  # its own seeds, distinct from every routed expert
        self.deltas = torch.nn.ModuleDict(
            {
                matrix: build_deltas(ders.delta, [shared_id], out, inp, seed=ders.seed, matrix=matrix, dtype=config.params_dtype)
                for matrix, (out, inp) in delta_matrices(
                    config.hidden_size, config.moe_ffn_hidden_size, config.gated_linear_unit
                ).items()
            }
        )
        self.gate_weight = None
        if gate:
            self.gate_weight = torch.nn.Parameter(torch.empty(1, config.hidden_size, dtype=config.params_dtype))
            config.init_method(self.gate_weight)
            self.gate_weight.sequence_parallel = config.sequence_parallel
        for param in self.deltas.parameters():
            # A dense (data-parallel) parameter; partial over TP in both placements.
            param.allreduce = True
            param.sequence_parallel = self.placement.tp_size > 1
        self._experts = None

    def attach_base(self, experts) -> None:
        """Use ``experts``' base linears (kept out of this module's parameters).

        This module multiplies by the base weights directly, so their gradient also arrives
        in ``param.grad``. Under gradient-accumulation fusion (on by default on GPU) the base
        linears write their own weight gradient into ``main_grad`` and mark
        ``grad_added_to_main_grad``, and megatron DDP then drops ``param.grad`` unless the
        weight has ``zero_out_wgrad`` (``distributed/distributed_data_parallel.py:490-493``),
        which also makes the linears' dummy weight gradient zeros instead of ``torch.empty``
        (``tensor_parallel/layers.py:692-721``): megatron's own fix for tied embeddings
        (``language_module.py:261``).
        """
        object.__setattr__(self, "_experts", experts)
        for linear in (experts.linear_fc1, experts.linear_fc2):
            linear.weight.zero_out_wgrad = True

    def set_layer_number(self, layer_number: int) -> None:
        for deltas in self.deltas.values():
            deltas.set_layer_number(layer_number)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [S/tp, B, H] (SP) -> [S/tp, B, H]."""
        experts = self._experts
        comm = self.placement.base_sharded and self.placement.tp_size > 1
        x = gather_from_sequence_parallel_region(hidden_states, group=self.tp_group) if comm else hidden_states
        x_TH = x.reshape(-1, x.shape[-1])
        fc1_matrices = ("fc1_gate", "fc1_up") if self.config.gated_linear_unit else ("fc1",)
        fc1_TF = x_TH @ experts.linear_fc1.weight.t()
        fc1_TF = fc1_TF + torch.cat(
            [self.deltas[m].apply_delta(x_TH, 0, *experts.base_slices[m]) for m in fc1_matrices], dim=1
        )
        h_TF = experts.activation(fc1_TF)
        out_TH = h_TF @ experts.linear_fc2.weight.t() + self.deltas["fc2"].apply_delta(h_TF, 0, *experts.base_slices["fc2"])
        out = out_TH.view(*x.shape[:-1], out_TH.shape[-1])
        if comm:
            out = reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
        if self.gate_weight is not None:
            out = out * torch.sigmoid(torch.nn.functional.linear(hidden_states, self.gate_weight))
        return out

    def backward_dw(self) -> None:
        """Nothing is delayed."""

    @torch.no_grad()
    def synthesized_weights(self) -> dict[str, torch.Tensor]:
        """This rank's shard of W_base + Δ_shared, in megatron's MLP parameter names."""
        experts = self._experts
        return merge_ffn(self.deltas, 0, experts.linear_fc1.weight, experts.linear_fc2.weight, experts.base_slices)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Everything replicated (replica id over TP and data parallel)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            {},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )
