"""Where DeRS tensors live under TP/SP/EP and how their gradients are reduced.

Placement table (``docs/design.md`` has the long form):

| tensor            | tensor parallel                | expert parallel        | gradient reduced over |
|-------------------|--------------------------------|------------------------|-----------------------|
| base fc1 / fc2    | column / row shard over the    | replicated on every    | data parallel (DDP,   |
|                   | expert-TP group (= TP group)   | EP rank                | EP ranks included)    |
| base, ETP=1, TP>1 | replicated on TP ranks         | replicated             | DP, then summed over  |
|                   |                                |                        | TP (each TP rank saw  |
|                   |                                |                        | other tokens)         |
| deltas            | replicated; each rank applies  | local experts only     | expert-DP (DDP), and  |
|                   | the slice of its base shard    | (drop-in path)         | summed over ETP when  |
|                   |                                |                        | ETP > 1 (partials)    |

The "summed over TP" rows use megatron-core's own seam: parameters marked
``sequence_parallel`` get their gradients all-reduced over the TP group by
``finalize_model_grads`` (``distributed/finalize_model_grads.py:452``), as
layer norms under SP do. This needs ETP == TP when ETP > 1 (the groups then
coincide); other ETP values are rejected.
``allreduce`` follows ``tensor_parallel/layers.py:1013``: True puts the base in
the dense buffers reduced over the data-parallel group (EP ranks included),
False puts deltas in the expert buffers reduced over expert-DP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ders_megatron.core.config import check_expert_tp


@dataclass(frozen=True)
class ExpertPlacement:
    """Sizes and ranks the DeRS experts need, read from a ProcessGroupCollection."""

    tp_size: int
    etp_size: int
    etp_rank: int
    ep_size: int
    ep_rank: int
    sequence_parallel: bool

    @classmethod
    def from_groups(cls, pg_collection, config) -> "ExpertPlacement":
        placement = cls(
            tp_size=pg_collection.tp.size(),
            etp_size=pg_collection.expt_tp.size(),
            etp_rank=pg_collection.expt_tp.rank(),
            ep_size=pg_collection.ep.size(),
            ep_rank=pg_collection.ep.rank(),
            sequence_parallel=config.sequence_parallel,
        )
        placement.validate()
        return placement

    def validate(self) -> None:
        check_expert_tp(self.etp_size, self.tp_size)
        if self.tp_size > 1 and not self.sequence_parallel:
            raise ValueError(
                "DeRS experts with --tensor-model-parallel-size > 1 need --sequence-parallel "
                "(megatron-core MoE requires it too, transformer/moe/moe_layer.py:630)."
            )

    @property
    def base_sharded(self) -> bool:
        return self.etp_size > 1

    @property
    def base_needs_tp_sum(self) -> bool:
        """ETP=1 under TP>1: every TP rank holds the whole base and sees other tokens."""
        return self.etp_size == 1 and self.tp_size > 1

    def shard_rows(self, rows: int, stride: int = 1) -> list[slice]:
        """This rank's row slices of a [rows, ...] matrix split column-parallel with a stride."""
        chunk = rows // (self.etp_size * stride)
        return [
            slice((s * self.etp_size + self.etp_rank) * chunk, (s * self.etp_size + self.etp_rank + 1) * chunk)
            for s in range(stride)
        ]


def tp_shard(full: torch.Tensor, dim: int, stride: int, rank: int, world: int) -> torch.Tensor:
    """Megatron's strided split (``tensor_parallel/layers.py:_initialize_affine_weight_cpu``)."""
    if world == 1:
        return full
    chunks = torch.split(full, full.shape[dim] // (world * stride), dim=dim)
    return torch.cat(chunks[rank::world], dim=dim)


def mark_base(params, placement: ExpertPlacement) -> None:
    """The shared base is a dense (data-parallel) parameter, sharded like TP layers."""
    for param in params:
        param.allreduce = True
        if not placement.base_sharded:
            # Whole on every TP rank: not a TP shard (grad-norm dedup counts it once,
            # tensor_parallel/layers.py:101), whatever the expert linear set.
            param.tensor_model_parallel = False
        if placement.base_needs_tp_sum:
            param.sequence_parallel = True


def mark_deltas(params, placement: ExpertPlacement) -> None:
    """Deltas are expert parameters stacked on axis 0 (the local experts)."""
    for param in params:
        param.allreduce = False
        param.expert_axis = 0
        if placement.base_sharded:
            # Each ETP rank applied only its slice: partial gradients, summed over TP(=ETP).
            param.sequence_parallel = True
