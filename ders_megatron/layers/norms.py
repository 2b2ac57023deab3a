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
