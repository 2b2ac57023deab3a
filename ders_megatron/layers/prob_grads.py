"""The router probabilities' gradient in the DeRS kernels: fp32, as megatron's experts sum it.

Both tiled kernels (:mod:`ders_megatron.layers.expert_compute`,
:mod:`ders_megatron.layers.sparse_compute`) scale each pair's activation by its
probability in the probability's own dtype and sum dL/dp = Σ_F h·dhbar from exact
fp32 products, so a bf16 model's router gets the gradient megatron's SequentialMLP
gives it instead of one rounded to bf16 (issue 16). Shapes: ``n`` a tile's pairs,
``F`` this rank's FFN columns.
"""

from __future__ import annotations

import torch


def prob_grad_dtype(p_dtype: torch.dtype) -> torch.dtype:
    """The dtype dL/dp is summed in: at least fp32, as megatron's experts have it.

    ``MLP.forward`` scales the bf16 activation by the fp32 router probabilities
    (``transformer/mlp.py:337-340``: ``h * per_token_scale`` promotes to fp32, then
    ``.to(bf16)``), so autograd sums dL/dp = Σ_F h·dy in fp32 from exact products;
    SequentialMLP (``transformer/moe/experts.py:1354-1364``) passes each expert its
    probabilities as the dispatcher gives them (fp32 with ``--moe-router-dtype fp32``;
    DeepEP/HybridEP insist on it, ``token_dispatcher.py:1127-1133,1303-1309``)."""
    return torch.promote_types(p_dtype, torch.float32)


def product_scratch(like: torch.Tensor, rows: int, columns: int, grad_dtype: torch.dtype):
    """A [rows, F] buffer for :func:`exact_products` when the activations are narrower than
    ``grad_dtype`` (bf16/fp16 models), else None (the product goes in place)."""
    if like.dtype == grad_dtype:
        return None
    return like.new_empty(rows, columns, dtype=grad_dtype)


def exact_products(a_nF: torch.Tensor, b_nF: torch.Tensor, scratch_nF: torch.Tensor | None) -> torch.Tensor:
    """a·b element-wise: in ``scratch`` (fp32 for bf16 a, b: the products are exact there),
    or in place in ``a`` without one."""
    if scratch_nF is None:
        return a_nF.mul_(b_nF)
    return scratch_nF[: a_nF.shape[0]].copy_(a_nF).mul_(b_nF)
