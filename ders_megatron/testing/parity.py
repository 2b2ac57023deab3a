"""Test bodies: a sharded megatron-core model against its unsharded reference.

Each body runs on every rank of a :class:`DistributedPool`. It first runs the
world-size-1 layout (every rank computes the same thing), keeps the full
parameters, loss and gradients, then builds the sharded layout, loads the
reference weights sliced by rank, and compares loss and every gradient
gathered back to full tensors.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads

from ders_megatron.testing.distributed import model_parallel
from ders_megatron.testing.models import build_gpt, lm_loss, tiny_batch, tiny_config
from ders_megatron.testing.sharding import full_tensors, load_full_tensors

# float32 everywhere. Sharded runs add partial sums in another order (TP
# reductions, all-to-all reorderings): differences are a few ulps of values
# O(1), amplified through 2 layers and softmax; 1e-5 absolute / 1e-4 relative
# covers that with margin and still fails on any real bug (those give O(1e-2+)).
ATOL, RTOL = 1e-5, 1e-4


def wrap_ddp(model, config, distributed_optimizer: bool = False):
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
    )
    return DistributedDataParallel(config, ddp_config, module=model)


@torch.no_grad()
def perturb_deltas(model, scale: float, seed: int = 0) -> None:
    """Non-zero DeRS deltas (LoRA B starts at zero, which would hide A's gradient).

    The magnitude codec's stored positions (``indices``) get distinct sorted random
    positions per global expert instead of noise (noise casts to duplicate positions);
    the noise is still drawn for them, so every other parameter gets what it got before."""
    from ders_megatron.core.deltas import sample_unique

    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if ".deltas." in name:
            param.copy_(torch.randn(param.shape, generator=gen) * scale)
            if name.endswith(".indices"):
                deltas = model.get_submodule(name.rsplit(".", 1)[0])
                for e, expert in enumerate(deltas.expert_ids):  # by global expert: equal under EP
                    flat = sample_unique(deltas.out_features * deltas.in_features, param.shape[1], seed + expert)
                    param[e].copy_(flat.to(param.dtype))


def loss_and_grads(config_overrides: dict, ders=None, reference: dict | None = None, seed=0, perturb=0.0):
    """One forward/backward through DDP + finalize_model_grads; full params and grads back."""
    config = tiny_config(**config_overrides)
    model = build_gpt(config, ders=ders)
    if reference is not None:
        load_full_tensors(model, reference)
    elif perturb:
        perturb_deltas(model, perturb)
    ddp = wrap_ddp(model, config)
    ddp.zero_grad_buffer()
    loss = lm_loss(ddp, tiny_batch(seed=seed))
    loss.backward()
    finalize_model_grads([ddp])
    return loss.detach(), full_tensors(model), full_tensors(model, grads=True)


def assert_grads_close(grads: dict, ref_grads: dict, atol=ATOL, rtol=RTOL) -> None:
    assert grads.keys() == ref_grads.keys(), sorted(set(grads) ^ set(ref_grads))
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def gpt_parity(layouts: list[dict], config_overrides: dict | None = None, ders=None, perturb=0.0) -> list[float]:
    """Compare loss and all gradients of each layout with world size 1; return the losses."""
    config_overrides = config_overrides or {}
    with model_parallel():
        ref_loss, ref_params, ref_grads = loss_and_grads(config_overrides, ders, perturb=perturb)
    dead = [name for name, grad in ref_grads.items() if not grad.abs().sum() > 0]
    assert not dead, f"reference gradients are zero for {dead}: the comparison would be vacuous"
    losses = [ref_loss.item()]
    for layout in layouts:
        with model_parallel(**layout):
            loss, _, grads = loss_and_grads(config_overrides, ders, reference=ref_params)
        torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=RTOL, msg=lambda m: f"{layout}: {m}")
        assert_grads_close(grads, ref_grads)
        losses.append(loss.item())
    return losses
