"""Move parameters between an unsharded reference and a TP/EP-sharded model.

Distributed parity tests build the unsharded (world-size-1 layout) model, take
its full tensors, slice them into the sharded model by rank, run both, and
gather the sharded outputs and gradients back to full tensors to compare
(torchtitan ``test_distributed_linear.py`` style).

A parameter's placement is read from megatron-core's own attributes:
``tensor_model_parallel`` / ``partition_dim`` / ``partition_stride``
(``tensor_parallel/layers.py:set_tensor_model_parallel_attributes``) for TP,
``allreduce=False`` for expert parameters (TP over the expert-TP group), and
for the experts axis either megatron's ``local_experts.<i>`` naming
(``SequentialMLP``) or our ``expert_axis`` attribute (DeRS stacked deltas).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from megatron.core import parallel_state

_LOCAL_EXPERT = re.compile(r"local_experts\.(\d+)\.")
_LAYER = re.compile(r"(?<![a-z_])layers\.(\d+)\.")


def _is_expert(param) -> bool:
    return not getattr(param, "allreduce", True)


def _tp_group(param):
    if _is_expert(param):
        return parallel_state.get_expert_tensor_parallel_group()
    return parallel_state.get_tensor_model_parallel_group()


def _num_local_experts(model) -> int:
    for module in model.modules():
        if hasattr(module, "num_local_experts"):
            return module.num_local_experts
    return 1


def _layer_offset(model) -> int:
    """Global index of this pipeline stage's first transformer layer."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    for module in model.modules():
        if isinstance(module, TransformerLayer):
            return module.layer_number - 1
    return 0


def global_name(name: str, num_local_experts: int, layer_offset: int = 0) -> str:
    """The name a parameter has in the world-size-1 model.

    ``local_experts.<local>`` becomes the global expert index for this EP rank,
    ``layers.<local>`` the global layer index for this PP stage, and the
    ``module.`` prefixes that DDP/Float16Module wrapping adds are dropped.
    """
    while name.startswith("module."):
        name = name[len("module."):]
    ep_rank = parallel_state.get_expert_model_parallel_rank()

    def to_global_expert(match):
        return f"local_experts.{ep_rank * num_local_experts + int(match.group(1))}."

    def to_global_layer(match):
        return f"layers.{layer_offset + int(match.group(1))}."

    name = _LOCAL_EXPERT.sub(to_global_expert, name)
    return _LAYER.sub(to_global_layer, name)


def _tp_chunks(full: torch.Tensor, param, world: int):
    stride = getattr(param, "partition_stride", 1)
    dim = param.partition_dim
    chunk = full.shape[dim] // (world * stride)
    return list(torch.split(full, chunk, dim=dim)), dim


def shard_tensor(full: torch.Tensor, param) -> torch.Tensor:
    """This rank's slice of ``full`` for ``param`` (TP by stride, then the experts axis)."""
    axis = getattr(param, "expert_axis", None)
    if axis is not None:
        ep_size = parallel_state.get_expert_model_parallel_world_size()
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        full = full.chunk(ep_size, dim=axis)[ep_rank]
    if getattr(param, "tensor_model_parallel", False):
        group = _tp_group(param)
        world, rank = group.size(), group.rank()
        if world > 1:
            chunks, dim = _tp_chunks(full, param, world)
            full = torch.cat(chunks[rank::world], dim=dim)
    return full


def _all_gather(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(group.size())]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def unshard_tensor(local: torch.Tensor, param) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: the full tensor, on every rank."""
    if getattr(param, "tensor_model_parallel", False):
        group = _tp_group(param)
        world = group.size()
        if world > 1:
            stride = getattr(param, "partition_stride", 1)
            dim = param.partition_dim
            per_rank = [p.chunk(stride, dim=dim) for p in _all_gather(local, group)]
            local = torch.cat([per_rank[r][s] for s in range(stride) for r in range(world)], dim)
    axis = getattr(param, "expert_axis", None)
    if axis is not None:
        ep_group = parallel_state.get_expert_model_parallel_group()
        if ep_group.size() > 1:
            local = torch.cat(_all_gather(local, ep_group), dim=axis)
    return local


def _gather_experts_by_name(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """With EP, every rank holds different ``local_experts.<g>`` keys: exchange them."""
    ep_group = parallel_state.get_expert_model_parallel_group()
    if ep_group.size() == 1:
        return tensors
    gathered: list[dict] = [None] * ep_group.size()
    dist.all_gather_object(gathered, {k: v for k, v in tensors.items() if "local_experts." in k}, group=ep_group)
    merged = dict(tensors)
    for part in gathered:
        merged.update(part)
    return merged


def full_tensors(model, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient) of a sharded model as a full tensor, by global name.

    Gradients are read from ``main_grad`` when megatron DDP wraps the model; frozen
    parameters (the magnitude codec's ``indices``, quantized codes) have none and are left out.
    """
    nle, offset = _num_local_experts(model), _layer_offset(model)
    out = {}
    for name, param in model.named_parameters():
        if grads and not param.requires_grad:
            continue
        if grads:
            tensor = getattr(param, "main_grad", None)
            tensor = param.grad if tensor is None else tensor
            if tensor is None:
                tensor = torch.zeros_like(param)
        else:
            tensor = param.detach()
        out[global_name(name, nle, offset)] = unshard_tensor(tensor.detach().clone(), param)
    return _gather_experts_by_name(out)


@torch.no_grad()
def load_full_tensors(model, full: dict[str, torch.Tensor]) -> None:
    """Copy each full tensor's slice for this rank into the sharded model."""
    nle, offset = _num_local_experts(model), _layer_offset(model)
    for name, param in model.named_parameters():
        key = global_name(name, nle, offset)
        if key not in full:
            raise KeyError(f"reference has no tensor for {key} (local name {name})")
        local = shard_tensor(full[key], param)
        if local.shape != param.shape:
            raise ValueError(f"{key}: reference slice {tuple(local.shape)} != parameter {tuple(param.shape)}")
        param.copy_(local)
