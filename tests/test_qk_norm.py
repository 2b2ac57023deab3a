"""The full-width QK norm (``--ders-qk-layernorm-width full``, OLMoE's q_norm / k_norm):
at TP=2 each rank holds half the heads; outputs, input gradients and the weight gradient
(summed over TP, as ``finalize_model_grads`` does for q/k_layernorm) equal transformers'
own ``OlmoeRMSNorm`` on the whole projection."""

from types import SimpleNamespace

import pytest
import torch

SEQ, BATCH, HEADS, GROUPS, HEAD_DIM, EPS = 5, 2, 4, 2, 8, 1e-5


def _inputs(heads: int):
    gen = torch.Generator().manual_seed(heads)
    x = torch.randn(SEQ, BATCH, heads, HEAD_DIM, generator=gen)  # [sq, b, heads, head_dim], as megatron hands it
    weight = 1 + 0.1 * torch.randn(heads * HEAD_DIM, generator=gen)
    grad_out = torch.randn(SEQ, BATCH, heads, HEAD_DIM, generator=gen)
    return x, weight, grad_out


def _sharded_norm(projection: str, heads: int):
    """Runs on each of 2 ranks: this rank's heads through FullWidthQKNorm at TP=2."""
    from megatron.core import parallel_state

    from ders_megatron.layers.norms import FullWidthQKNorm
    from ders_megatron.testing.distributed import model_parallel

    x, weight, grad_out = _inputs(heads)
    config = SimpleNamespace(num_attention_heads=HEADS, num_query_groups=GROUPS, normalization="RMSNorm",
                             params_dtype=torch.float32)
    with model_parallel(tp=2):
        group = parallel_state.get_tensor_model_parallel_group()
        norm = FullWidthQKNorm(config, HEAD_DIM, EPS, projection=projection, tp_group=group)
        with torch.no_grad():
            norm.weight.copy_(weight)
        local = heads // 2
        rank = group.rank()
        x_local = x[:, :, rank * local:(rank + 1) * local].clone().requires_grad_()
        y = norm(x_local)
        (y * grad_out[:, :, rank * local:(rank + 1) * local]).sum().backward()
        return y.detach(), x_local.grad, norm.weight.grad


@pytest.mark.parametrize("projection, heads", [("query", HEADS), ("key", GROUPS)])
def test_full_width_qk_norm_at_tp2_equals_olmoe_norm(dist2, projection, heads):
    from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm

    x, weight, grad_out = _inputs(heads)
    reference = OlmoeRMSNorm(heads * HEAD_DIM, eps=EPS)
    with torch.no_grad():
        reference.weight.copy_(weight)
    x_ref = x.clone().requires_grad_()
    y_ref = reference(x_ref.reshape(SEQ, BATCH, -1)).view_as(x)
    (y_ref * grad_out).sum().backward()

    (y0, gx0, gw0), (y1, gx1, gw1) = dist2.run(_sharded_norm, projection, heads)
    # float32 on both sides; the sharded mean of squares adds two partial sums (ulps of
    # O(1) values). 1e-6 fails on a wrong width, slice or missing all-reduce (>= 1e-2).
    tol = dict(atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat([y0, y1], dim=2), y_ref, **tol)
    torch.testing.assert_close(torch.cat([gx0, gx1], dim=2), x_ref.grad, **tol)
    # Each rank's weight gradient lives on its own heads' slice; their sum is the whole.
    local = heads * HEAD_DIM // 2
    assert not gw0[local:].any() and not gw1[:local].any()
    torch.testing.assert_close(gw0 + gw1, reference.weight.grad, **tol)
