"""Drop-in DeRS experts for megatron-core's ``MoELayer``.

:class:`DeRSExperts` meets the experts contract of megatron-core 0.19.2
(``transformer/moe/moe_layer.py:67-97``): built as
``(num_local_experts, config, /, *, pg_collection, name)``, called as
``forward(dispatched_input, tokens_per_expert, permuted_probs) -> (output, None)``
with ``tokens_per_expert`` a CPU tensor and the probabilities applied by the
experts themselves (as ``SequentialMLP``/``MLP`` do, ``transformer/mlp.py:258``).

Every expert is ``W_e = W_base + Δ_e``. The base is the same for all experts,
so its product is ONE dense GEMM over all dispatched rows; the deltas add a
per-expert term on each expert's segment of rows. For gated FFNs the gate and
up projections carry separate deltas (fc1_gate, fc1_up), which is how the DeRS
paper counts them (Table 1).
"""

from __future__ import annotations

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)

from ders_megatron.core.config import DeRSConfig, delta_matrices
from ders_megatron.core.deltas import build_deltas, derive_seed, merge_ffn
from ders_megatron.core.deltas import PositionDeltas
from ders_megatron.layers.expert_compute import dropin_lowrank_swiglu, dropin_sparse_swiglu, lowrank_swiglu_applies
from ders_megatron.layers.sparse_compute import STACKED, prepare_stacked_indexes, sparse_swiglu_applies
from ders_megatron.layers.placement import ExpertPlacement, mark_base, mark_deltas, tp_shard
from ders_megatron.layers.shared_expert import DeRSSharedExpert


def _backend(use_te: bool):
    if use_te:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalSpecProvider()


class DeRSExperts(MegatronModule):
    """All local experts of one MoE layer as one shared base plus per-expert deltas."""

    def __init__(
        self,
        num_local_experts: int,
        config,
        /,
        *,
        pg_collection,
        name: str | None = None,
        ders: DeRSConfig,
        use_te: bool = False,
    ):
        super().__init__(config=config)
        self.ders = ders
        self.num_local_experts = num_local_experts
        self.placement = ExpertPlacement.from_groups(pg_collection, config)
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.tp
        self.expt_dp_group = pg_collection.expt_dp
        first = self.placement.ep_rank * num_local_experts
        self.expert_ids = list(range(first, first + num_local_experts))
        self.layer = 0
        self.own_bias = bool(ders.expert_bias and config.add_bias_linear)
        self._build_base(config, pg_collection, use_te, name)
        self.biases = self._build_expert_biases(config) if self.own_bias else None
        self.deltas = torch.nn.ModuleDict(
            {
                matrix: build_deltas(
                    ders.delta,
                    self.expert_ids, out, inp, seed=ders.seed, matrix=matrix, dtype=config.params_dtype
                )
                for matrix, (out, inp) in delta_matrices(
                    config.hidden_size, config.moe_ffn_hidden_size, config.gated_linear_unit
                ).items()
            }
        )
        mark_deltas(self.deltas.parameters(), self.placement)
        self.base_slices = self._slices_of_base_shard(config)  # matrix -> (rows, cols) of this rank's shard
        self.reset_base_parameters()

    # ------------------------------------------------------------------ build
    def _build_base(self, config, pg_collection, use_te, name):
        """megatron-core parallel linears (TE's when installed) sharded over expert-TP.

        Built with ``is_expert=True`` so their communication is left to the token
        dispatcher (``explicit_expert_comm``, ``tensor_parallel/layers.py:960``),
        then re-marked as data-parallel parameters (:func:`mark_base`).
        """
        backend = _backend(use_te)
        gated = config.gated_linear_unit
        ffn = config.moe_ffn_hidden_size
        self.linear_fc1 = backend.column_parallel_linear()(
            config.hidden_size,
            ffn * (2 if gated else 1),
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.add_bias_linear and not self.own_bias,
            skip_bias_add=True,
            is_expert=True,
            tp_comm_buffer_name="fc1",
            tp_group=pg_collection.expt_tp,
            stride=2 if gated else 1,
        )
        self.linear_fc2 = backend.row_parallel_linear()(
            ffn,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear and not self.own_bias,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=True,
            tp_comm_buffer_name="fc2",
            tp_group=pg_collection.expt_tp,
        )
        base = list(self.linear_fc1.parameters()) + list(self.linear_fc2.parameters())
        mark_base(base, self.placement)
        for param in base:
            param.requires_grad_(not self.ders.freeze_base)

    def _build_expert_biases(self, config) -> torch.nn.ParameterDict:
        """Each local expert's own fc1 [F·g] and fc2 [H] bias, zero until loaded (upcycling
        copies the dense bias into each, compression each vanilla expert's): the paper counts a
        bias per expert (core/accounting.py). Placed as the deltas are (EP on axis 0)."""
        if self.placement.etp_size > 1:
            raise ValueError(
                "per-expert biases (--add-bias-linear) need --expert-tensor-parallel-size 1; or pass "
                "--moe-ders-shared-bias (one bias in the shared base)")
        fc1_out = config.moe_ffn_hidden_size * (2 if config.gated_linear_unit else 1)
        biases = torch.nn.ParameterDict({
            "fc1": torch.nn.Parameter(torch.zeros(self.num_local_experts, fc1_out, dtype=config.params_dtype)),
            "fc2": torch.nn.Parameter(torch.zeros(self.num_local_experts, config.hidden_size, dtype=config.params_dtype)),
        })
        mark_deltas(biases.parameters(), self.placement)
        return biases

    def expert_bias_rows(self, which: str, counts: list[int]) -> torch.Tensor:
        """[T, out] of the own ``fc1``/``fc2`` bias of each row's expert (rows grouped by expert)."""
        bias_EO = self.biases[which]  # [experts, out]
        return torch.repeat_interleave(bias_EO, torch.tensor(counts, device=bias_EO.device), dim=0)

    def _slices_of_base_shard(self, config) -> dict[str, tuple[slice | None, slice | None]]:
        """(rows, cols) of each full delta matrix that this rank's base shard covers."""
        p = self.placement
        ffn = config.moe_ffn_hidden_size
        (local_ffn,) = p.shard_rows(ffn)
        return {
            "fc1_gate": (local_ffn, None),
            "fc1_up": (local_ffn, None),
            "fc1": (local_ffn, None),
            "fc2": (None, local_ffn),
        }

    def set_layer_number(self, layer_number: int) -> None:
        """Deterministic init per (seed, layer, expert, matrix), identical on every rank."""
        self.layer = layer_number
        for deltas in self.deltas.values():
            deltas.set_layer_number(layer_number)
        self.reset_base_parameters()
        self.prepare_sparse_indexes()

    def prepare_sparse_indexes(self) -> None:
        """Sparse kinds: build each expert's CSR index of this rank's slice now (rebuilt by the
        delta modules after a load), so no forward derives positions or copies them. Under the
        SwiGLU kernel the gate's and up's Δᵀ are never multiplied (their stacked index's is)."""
        swiglu = sparse_swiglu_applies(self)
        for matrix, deltas in self.deltas.items():
            if isinstance(deltas, PositionDeltas):
                deltas.prepare_index(*self.base_slices[matrix],
                                     transposed=not (swiglu and matrix in STACKED))
        if swiglu:
            prepare_stacked_indexes(self)

    @torch.no_grad()
    def reset_base_parameters(self) -> None:
        """Initialise the FULL base from a seeded generator and keep this rank's shard.

        megatron initialises expert weights from the expert-parallel RNG tracker,
        which is seeded per EP rank: a replicated base would differ across EP ranks.
        """
        p = self.placement
        for name, linear, init, dim, stride in (
            ("base_fc1", self.linear_fc1, self.config.init_method, 0, 2 if self.config.gated_linear_unit else 1),
            ("base_fc2", self.linear_fc2, self.config.output_layer_init_method, 1, 1),
        ):
            shape = list(linear.weight.shape)
            shape[dim] *= p.etp_size
            full = torch.empty(shape, dtype=torch.float32)
            # megatron's init methods draw from the global generator; `full` is a CPU tensor, so
            # seeding the CPU generator alone is enough. torch.manual_seed would also reseed
            # every CUDA generator, which fork_rng(devices=[]) does not restore.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(derive_seed(self.ders.seed, self.layer, -1, name))
                init(full)
            linear.weight.copy_(tp_shard(full, dim, stride, p.etp_rank, p.etp_size))
            if getattr(linear, "bias", None) is not None:
                linear.bias.zero_()

    # ---------------------------------------------------------------- forward
    def delta_terms(self, x_TI: torch.Tensor, counts: list[int], matrices: tuple[str, ...]) -> torch.Tensor:
        """The delta part of the experts' product on rows grouped by local expert (``counts``
        rows each); the fused layer's generic path and the shared expert call it too.

        Σ over ``matrices`` side by side: per expert segment, x_seg @ Δ_e[slice]^T -> [T, O']."""
        outputs = []
        for e, x_seg in enumerate(torch.split(x_TI, counts)):
            parts = [
                self.deltas[m].apply_delta(x_seg, e, *self.base_slices[m]) for m in matrices
            ]
            outputs.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
        return torch.cat(outputs, dim=0)

    def activation(self, fc1_TF: torch.Tensor) -> torch.Tensor:
        """The config's activation, gated or not (as ``transformer/mlp.py:324``)."""
        config = self.config
        if not config.gated_linear_unit:
            return config.activation_func(fc1_TF)
        x_glu, x_linear = torch.chunk(fc1_TF, 2, dim=-1)
        if (clamp := config.activation_func_clamp_value) is not None:
            x_glu = x_glu.clamp(min=None, max=clamp)
            x_linear = x_linear.clamp(min=-clamp, max=clamp)
        return config.activation_func(x_glu) * (x_linear + config.glu_linear_offset)

    def forward(self, dispatched_input, tokens_per_expert, permuted_probs):
        """dispatched_input [T, H] grouped by local expert; returns ([T, H], None).

        Under expert-TP the output is this rank's partial sum, as megatron's expert
        linears leave it for the dispatcher to reduce.

        Low-rank SwiGLU experts (the common case) run the fused layer's kernel on the
        dispatched rows: the same math as :meth:`forward_unfused` without its per-expert
        ``[rows, F]`` temporaries, which made the drop-in layer 1.19x slower than
        megatron's SequentialMLP and 2x the dense MLP's memory (docs/benchmarks.md).

        Rows past ``sum(tokens_per_expert)`` belong to no token: HybridEP's static budget
        hands the experts ``num_permuted_tokens`` rows however many were routed
        (``transformer/moe/token_dispatcher.py:1089-1103,1165-1170``; TEGroupedMLP's
        grouped GEMMs read only the counted rows). They are cut off before any GEMM, so
        neither their contents nor an unwritten kernel buffer reaches a weight gradient,
        and their output rows are zeros.
        """
        rows = dispatched_input.shape[0]
        valid = int(tokens_per_expert.sum())  # a CPU tensor by the experts contract: no device sync
        if valid < rows:
            out_TH, _ = self._forward_counted_rows(
                dispatched_input[:valid], tokens_per_expert, permuted_probs[:valid]
            )
            return torch.nn.functional.pad(out_TH, (0, 0, 0, rows - valid)), None
        return self._forward_counted_rows(dispatched_input, tokens_per_expert, permuted_probs)

    def _forward_counted_rows(self, dispatched_input, tokens_per_expert, permuted_probs):
        """:meth:`forward` on rows that are exactly the counted ones."""
        if self.uses_lowrank_kernel():
            out_TH = dropin_lowrank_swiglu(
                self, dispatched_input, tokens_per_expert, permuted_probs, self.ders.kernel_tile
            )
            return out_TH, None
        if self.uses_sparse_kernel():
            out_TH = dropin_sparse_swiglu(
                self, dispatched_input, tokens_per_expert, permuted_probs, self.ders.kernel_tile
            )
            return out_TH, None
        return self.forward_unfused(dispatched_input, tokens_per_expert, permuted_probs)

    def uses_lowrank_kernel(self) -> bool:
        """Low-rank deltas, SwiGLU, probabilities applied after the activation, no own biases."""
        return lowrank_swiglu_applies(self) and not self.config.moe_apply_probs_on_input and not self.own_bias

    def uses_sparse_kernel(self) -> bool:
        """Values-at-positions deltas (sparse, magnitude), SwiGLU, probabilities after the activation,
        no own biases."""
        return sparse_swiglu_applies(self) and not self.config.moe_apply_probs_on_input and not self.own_bias

    def forward_unfused(self, dispatched_input, tokens_per_expert, permuted_probs):
        """Every delta kind and activation: base GEMMs over all rows, delta terms per expert."""
        counts = tokens_per_expert.tolist()
        x_TH = dispatched_input
        probs_T = permuted_probs
        if self.config.moe_apply_probs_on_input:
            x_TH = (probs_T.unsqueeze(-1) * x_TH).to(dispatched_input.dtype)
            probs_T = torch.ones_like(probs_T)
        fc1_matrices = ("fc1_gate", "fc1_up") if self.config.gated_linear_unit else ("fc1",)

        fc1_TF, fc1_bias = self.linear_fc1(x_TH)  # base: one GEMM over all rows
        fc1_TF = fc1_TF + self.delta_terms(x_TH, counts, fc1_matrices)
        if fc1_bias is not None:
            fc1_TF = fc1_TF + fc1_bias
        if self.own_bias:
            fc1_TF = fc1_TF + self.expert_bias_rows("fc1", counts)
        h_TF = self.activation(fc1_TF)
        h_TF = (h_TF * probs_T.unsqueeze(-1)).to(h_TF.dtype)

        out_TH, fc2_bias = self.linear_fc2(h_TF)
        out_TH = out_TH + self.delta_terms(h_TF, counts, ("fc2",))
        if self.own_bias:
            fc2_bias = self.expert_bias_rows("fc2", counts)  # [T, H]
        if fc2_bias is not None:
            out_TH = out_TH + fc2_bias * probs_T.unsqueeze(-1)
        return out_TH, None

    def backward_dw(self) -> None:
        """Delayed weight-gradient hook of the experts contract: nothing is delayed here."""

    # ------------------------------------------------------------ checkpoint
    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """dist_checkpointing layout, independent of TP/EP so checkpoints reshard.

        * base ``linear_fc1/2``: a dense TP layer (axis 0 / 1 over TP = expert-TP,
          gated fc1 through megatron's swiglu factory, ``transformer/mlp.py:425``),
          replicated over data parallel with EP ranks; unsharded with ETP = 1.
        * deltas ``deltas.<matrix>.<param>``: a global experts axis in front
          (from this EP rank's offset, as ``SequentialMLP.sharded_state_dict``,
          ``transformer/moe/experts.py:1377``), replicated over expert-TP and
          expert-DP; the sparse position seed is replicated everywhere.
        """
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        dp_cp_group = metadata["dp_cp_group"]
        sharded = {}
        sharded.update(self._base_sharded_state_dict(prefix, sharded_offsets, metadata))
        p = self.placement
        for name, bias in (self.biases or {}).items():  # own biases: a global experts axis in front
            key = f"{prefix}biases.{name}"
            sharded[key] = ShardedTensor.from_rank_offsets(
                key, bias, *sharded_offsets, (len(sharded_offsets), p.ep_rank, p.ep_size),
                replica_id=(0, p.etp_rank, self.expt_dp_group.rank()), prepend_axis_num=len(sharded_offsets),
            )
        for matrix, deltas in self.deltas.items():
            for name, tensor in deltas.state_dict(prefix="", keep_vars=True).items():
                key = f"{prefix}deltas.{matrix}.{name}"
                if name in dict(deltas.named_buffers()):
                    sharded.update(
                        make_sharded_tensors_for_checkpoint(
                            {name: tensor}, f"{prefix}deltas.{matrix}.", {}, sharded_offsets,
                            tp_group=self.tp_group, dp_cp_group=dp_cp_group,
                        )
                    )
                    continue
                sharded[key] = ShardedTensor.from_rank_offsets(
                    key,
                    tensor,
                    *sharded_offsets,
                    (len(sharded_offsets), p.ep_rank, p.ep_size),
                    replica_id=(0, p.etp_rank, self.expt_dp_group.rank()),
                    prepend_axis_num=len(sharded_offsets),
                )
        return sharded

    def _base_sharded_state_dict(self, prefix, sharded_offsets, metadata):
        sharded = {}
        singleton = metadata.get("singleton_local_shards", False)
        for name, linear, axis in (("linear_fc1", self.linear_fc1, 0), ("linear_fc2", self.linear_fc2, 1)):
            axis_map = {}
            if self.placement.base_sharded:
                axis_map = {"weight": axis} if name == "linear_fc2" else {"weight": 0, "bias": 0}
            sub = make_sharded_tensors_for_checkpoint(
                linear.state_dict(prefix="", keep_vars=True),
                f"{prefix}{name}.",
                axis_map,
                sharded_offsets,
                tp_group=self.tp_group,
                dp_cp_group=metadata["dp_cp_group"],
            )
            if name == "linear_fc1" and self.config.gated_linear_unit and self.placement.base_sharded:
                for key in (f"{prefix}{name}.weight", f"{prefix}{name}.bias"):
                    if key in sub:
                        sub[key] = apply_swiglu_sharded_factory(
                            sub[key], sharded_offsets, singleton,
                            tp_group=self.tp_group, dp_group=metadata["dp_cp_group"],
                        )
            sharded.update(sub)
        return sharded

    # ------------------------------------------------------------- reference
    @torch.no_grad()
    def synthesized_weights(self, expert: int) -> dict[str, torch.Tensor]:
        """This rank's shard of W_e = W_base + Δ_e (fc1 in megatron's [gate; up] layout)."""
        return merge_ffn(self.deltas, expert, self.linear_fc1.weight, self.linear_fc2.weight, self.base_slices)


class DeRSMoELayer(MoELayer):
    """megatron-core's MoELayer, telling the DeRS experts their global layer number.

    ``TransformerLayer`` calls ``mlp.set_layer_number`` right after building the
    MoE module (``transformer/transformer_layer.py:439``); the base class passes
    it to the router only.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(self.shared_experts, DeRSSharedExpert):
            self.shared_experts.attach_base(self.experts)  # extended DeRS shares the base

    def set_layer_number(self, layer_number: int):
        super().set_layer_number(layer_number)
        for module in (self.experts, self.shared_experts):
            if hasattr(module, "set_layer_number"):
                module.set_layer_number(layer_number)
