"""A PyTorch LayerNorm/RMSNorm that works under sequence parallelism.

megatron-core's torch fallback norm (``WrappedTorchNorm``) asserts
``not config.sequence_parallel`` (``transformer/torch_norm.py:50``), and MoE with
TP > 1 requires sequence parallelism (``transformer/moe/moe_layer.py:630``).
Without Transformer Engine or apex, this norm is what lets TP+SP run. Under SP
each TP rank normalizes its own sequence chunk, so the norm weights see partial
gradients; marking them ``sequence_parallel`` makes ``finalize_model_grads``
sum them over the TP group (``distributed/finalize_model_grads.py:452``).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


def ParallelTorchNorm(
    config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused
) -> torch.nn.Module:
    """Builder with megatron's ``LayerNormBuilder`` signature (``torch_norm.py:19``)."""
    if config.normalization == "RMSNorm":
        norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
    elif config.normalization == "LayerNorm":
        norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
    else:
        raise ValueError(
            f"--normalization {config.normalization} is not supported by the torch norm; "
            "use LayerNorm or RMSNorm."
        )
    for param in norm.parameters():
        param.sequence_parallel = config.sequence_parallel
    return norm


def QKNorm(config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused) -> torch.nn.Module:
    """Per-head query/key norm (``--qk-layernorm``; Qwen3's ``q_norm`` / ``k_norm``) on the
    local backend.

    megatron-core's attention applies it to ``[sq, b, heads, head_dim]`` after the fused QKV
    projection has gathered the sequence (``transformer/attention.py:1920-1924``), so it
    never sees a sequence-parallel chunk: unlike :func:`ParallelTorchNorm` it is not marked
    ``sequence_parallel``. Each TP rank holds other heads, so its weight gradient is partial;
    ``finalize_model_grads`` sums q/k_layernorm gradients over TP when ``qk_layernorm`` is on
    (``distributed/finalize_model_grads.py:451-453``). megatron's own local choice,
    ``WrappedTorchNorm``, refuses sequence parallelism outright (``transformer/torch_norm.py:50``),
    which MoE with TP > 1 requires.
    """
    if config.normalization == "RMSNorm":
        return torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
    if config.normalization == "LayerNorm":
        return torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
    raise ValueError(f"--normalization {config.normalization} is not supported by the torch QK norm; "
                     "use LayerNorm or RMSNorm.")


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) whose backward is the all-reduce of the gradients: every rank's
    result feeds that rank's own (different) outputs, so each input's gradient is the sum
    of all ranks' gradients (megatron's ``reduce_from_tensor_model_parallel_region`` passes
    the gradient through unchanged, right only for outputs replicated over the group)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone()
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def _default_tp_group():
    """megatron's TP group when one is set up (``parallel_state``), else None (one rank)."""
    from megatron.core import parallel_state

    if not (torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized()):
        return None
    return parallel_state.get_tensor_model_parallel_group()


class FullWidthQKNorm(torch.nn.Module):
    """RMSNorm over the whole projected query (or key) of a token, all heads at once:
    OLMoE's ``q_norm`` / ``k_norm`` (transformers ``modeling_olmoe.py`` OlmoeAttention:
    ``q_norm(q_proj(x))`` over ``num_heads * head_dim``), ``--ders-qk-layernorm-width full``.

    megatron-core builds ``q_layernorm`` / ``k_layernorm`` with ``hidden_size`` = head_dim
    (``transformer/attention.py:1722-1739``) and applies them to ``[sq, b, heads, head_dim]``
    after the QKV split (``:1920-1924``), per head. This module takes that call and
    normalizes the last two axes together. Under TP each rank holds ``heads / tp``
    consecutive heads (query heads in group order, as HF's ``q_proj`` rows), so the mean
    of squares needs the sum over the TP group.

    The weight is full width and replicated on every TP rank (the checkpoint holds it once,
    as HF does); each rank scales its own heads by its slice. Its gradient is therefore
    non-zero on the rank's slice only, and ``finalize_model_grads`` summing q/k_layernorm
    gradients over TP (``distributed/finalize_model_grads.py:451-453``) assembles the full
    gradient on every rank. Not marked ``sequence_parallel``: it sees the whole sequence.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, *, projection: str,
                 tp_group=None, **unused):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"--ders-qk-layernorm-width full needs --normalization RMSNorm, got "
                             f"{config.normalization}")
        if projection not in ("query", "key"):
            raise ValueError(f"projection must be 'query' or 'key', got {projection!r}")
        heads = config.num_attention_heads if projection == "query" else (
            config.num_query_groups or config.num_attention_heads)
        self.tp_group = tp_group if tp_group is not None else _default_tp_group()
        tp = self.tp_group.size() if self.tp_group is not None else 1
        if heads % tp:
            raise ValueError(f"--ders-qk-layernorm-width full: {heads} {projection} heads do not split over "
                             f"--tensor-model-parallel-size {tp}")
        self.width = heads * hidden_size  # num_heads * head_dim: what the mean of squares divides by
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(self.width, dtype=config.params_dtype))

    def forward(self, x_SBNd: torch.Tensor) -> torch.Tensor:  # [seq, batch, local heads, head_dim]
        x_SBW = x_SBNd.reshape(*x_SBNd.shape[:-2], -1)  # [seq, batch, local heads * head_dim]
        squares_SB1 = x_SBW.float().pow(2).sum(-1, keepdim=True)
        rank = 0
        if self.tp_group is not None and self.tp_group.size() > 1:
            squares_SB1 = _SumOverGroup.apply(squares_SB1, self.tp_group)
            rank = self.tp_group.rank()
        normed_SBW = x_SBW.float() * torch.rsqrt(squares_SB1 / self.width + self.eps)
        local = x_SBW.shape[-1]
        weight_W = self.weight[rank * local:(rank + 1) * local]  # this rank's heads
        return (weight_W * normed_SBW.to(x_SBNd.dtype)).view_as(x_SBNd)

    def extra_repr(self) -> str:
        return f"width={self.width}, eps={self.eps}"
