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
