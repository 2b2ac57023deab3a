"""The real megatron-core MoE stack on CPU/gloo: parallel layouts equal world size 1."""

import pytest

from ders_megatron.testing.parity import gpt_parity


def test_tp2_sp_matches_single_rank(dist2):
    losses = dist2.run(gpt_parity, [dict(tp=2)])
    assert losses[0] == losses[1]  # both ranks computed the same losses


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_ep2_and_tp2_ep2_match_single_rank(dist2, dispatcher):
    layouts = [dict(ep=2), dict(tp=2, ep=2, etp=1), dict(tp=2, ep=1, etp=2)]
    dist2.run(gpt_parity, layouts, dict(moe_token_dispatcher_type=dispatcher))


# --------------------------------------------------------------------------- #
# Pipeline parallelism through megatron-core's schedules.
# --------------------------------------------------------------------------- #
def _pipeline_losses(reference, num_microbatches=4):
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ders_megatron.testing.models import SEQ, build_gpt, tiny_batch, tiny_config
    from ders_megatron.testing.sharding import load_full_tensors

    config = tiny_config(num_layers=4, pipeline_dtype=torch.float32)
    model = build_gpt(config)
    load_full_tensors(model, reference)
    batches = iter([tiny_batch(batch_size=1, seed=i) for i in range(num_microbatches)])

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(per_token_loss):
            loss = per_token_loss.float().mean()
            return loss, {"lm loss": loss.detach()}

        return output, loss_func

    results = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=batches,
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=SEQ,
        micro_batch_size=1,
        forward_only=False,
    )
    return [r["lm loss"].item() for r in results]


def pipeline_parity():
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import build_gpt, tiny_config
    from ders_megatron.testing.sharding import full_tensors
    import torch

    with model_parallel():
        reference = full_tensors(build_gpt(tiny_config(num_layers=4, pipeline_dtype=torch.float32)))
        single = _pipeline_losses(reference)
    with model_parallel(pp=2):
        piped = _pipeline_losses(reference)
    return single, piped


def test_pp2_schedule_matches_pp1_losses(dist2):
    (single0, piped0), (single1, piped1) = dist2.run(pipeline_parity)
    assert piped0 == []  # the first stage computes no loss
    assert len(piped1) == 4
    # Same float32 ops in the same order on one stage or two: 1e-6 relative.
    assert piped1 == pytest.approx(single1, rel=1e-6)
    assert single0 == single1


# --------------------------------------------------------------------------- #
# megatron-core optimizer: distributed optimizer equals the plain one.
# --------------------------------------------------------------------------- #
def _one_optimizer_step(layout, distributed_optimizer, reference, ders=None):
    import torch
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from torch import distributed as dist

    from ders_megatron.testing.models import build_gpt, lm_loss, tiny_batch, tiny_config
    from ders_megatron.testing.parity import wrap_ddp
    from ders_megatron.testing.sharding import full_tensors, load_full_tensors

    config = tiny_config()
    model = build_gpt(config, ders=ders)
    load_full_tensors(model, reference)
    ddp = wrap_ddp(model, config, distributed_optimizer=distributed_optimizer)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=1e-2, weight_decay=0.01, clip_grad=1.0,
            use_distributed_optimizer=distributed_optimizer, params_dtype=torch.float32,
        ),
        [ddp],
    )
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    # Each data-parallel rank sees its own batch, so the gradient reduction matters.
    loss = lm_loss(ddp, tiny_batch(seed=dist.get_rank()))
    loss.backward()
    finalize_model_grads([ddp])
    update_successful, grad_norm, _ = optimizer.step()
    assert update_successful
    return full_tensors(model), grad_norm


def distributed_optimizer_parity(layout, ders=None):
    import torch

    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import build_gpt, tiny_config
    from ders_megatron.testing.parity import perturb_deltas
    from ders_megatron.testing.sharding import full_tensors

    with model_parallel(**layout):
        model = build_gpt(tiny_config(), ders=ders)
        perturb_deltas(model, 0.05)  # LoRA B = 0 would leave A without gradient
        reference = full_tensors(model)
        plain, plain_norm = _one_optimizer_step(layout, False, reference, ders)
        sharded, sharded_norm = _one_optimizer_step(layout, True, reference, ders)
    # Same reductions, but the distributed optimizer reduce-scatters and
    # all-gathers instead of all-reducing: a few ulps on O(1) values.
    assert abs(plain_norm - sharded_norm) <= 1e-5 * plain_norm
    changed = 0
    for name, ref in reference.items():
        torch.testing.assert_close(sharded[name], plain[name], atol=1e-6, rtol=1e-5)
        changed += not torch.equal(plain[name], ref)
    assert changed == len(reference), "the step left some parameters unchanged"


@pytest.mark.parametrize("layout", [dict(), dict(ep=2)], ids=["dp2", "ep2"])
def test_distributed_optimizer_matches_plain(dist2, layout):
    dist2.run(distributed_optimizer_parity, layout)


@pytest.mark.parametrize("layout", [dict(ep=2), dict(tp=2)], ids=["ep2", "tp2"])
def test_distributed_optimizer_with_ders_experts(dist2, layout):
    from ders_megatron.core.config import SparseDeltaConfig
    from ders_megatron.core.config import DeRSConfig

    dist2.run(distributed_optimizer_parity, layout, DeRSConfig(delta=SparseDeltaConfig(drop_rate=0.9)))
    dist2.run(distributed_optimizer_parity, layout, DeRSConfig())


# --------------------------------------------------------------------------- #
# dist_checkpointing: saved at TP=2, loaded at TP=1, identical logits.
# --------------------------------------------------------------------------- #
def _full_logits(model, batch):
    import torch
    from megatron.core import parallel_state
    from torch import distributed as dist

    model.eval()
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], None)
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(group.size())]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def checkpoint_reshard(ckpt_dir, save_layout, load_layout):
    import torch
    from megatron.core import dist_checkpointing

    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import build_gpt, tiny_batch, tiny_config

    import os

    os.makedirs(ckpt_dir, exist_ok=True)  # dist_checkpointing expects it to exist
    batch = tiny_batch()
    with model_parallel(**save_layout, seed=7):
        saved = build_gpt(tiny_config())
        saved_logits = _full_logits(saved, batch)
        dist_checkpointing.save(saved.sharded_state_dict(), ckpt_dir)
    with model_parallel(**load_layout, seed=99):  # another seed: a fresh, different init
        loaded = build_gpt(tiny_config())
        before = _full_logits(loaded, batch)
        state = dist_checkpointing.load(loaded.sharded_state_dict(), ckpt_dir)
        loaded.load_state_dict(state)
        after = _full_logits(loaded, batch)
    assert not torch.allclose(before, saved_logits), "the fresh model already matched"
    # Same weights; TP=2 sums the attention/MLP partial products in another order.
    torch.testing.assert_close(after, saved_logits, atol=1e-5, rtol=1e-5)


def test_checkpoint_saved_at_tp2_loads_at_tp1(dist2, tmp_path):
    dist2.run(checkpoint_reshard, str(tmp_path / "ckpt"), dict(tp=2), dict())


def test_checkpoint_saved_at_ep2_loads_at_tp2(dist2, tmp_path):
    dist2.run(checkpoint_reshard, str(tmp_path / "ckpt"), dict(ep=2), dict(tp=2))
