"""DeRS experts at world size 2 against the unsharded reference, and checkpoint resharding."""

import pytest

from ders_megatron.core.config import DenseDeltaConfig, IndexedSparseDeltaConfig, LowRankDeltaConfig, SparseDeltaConfig
from ders_megatron.core.config import DeRSConfig
from ders_megatron.testing.parity import gpt_parity

DERS = {
    "lowrank": DeRSConfig(delta=LowRankDeltaConfig(rank=2)),
    "sparse": DeRSConfig(delta=SparseDeltaConfig(drop_rate=0.9)),
    "dense": DeRSConfig(delta=DenseDeltaConfig()),
    # the magnitude codec's module: values at stored positions (random distinct ones, perturb_deltas)
    "magnitude": DeRSConfig(delta=IndexedSparseDeltaConfig(drop_rate=0.9)),
}
# At world size 2, TP=2 means expert-TP 2 (base sharded, deltas sliced); TP=2 with EP=2
# needs expert-TP 1 (base whole on each TP rank, its gradient summed over TP).
LAYOUTS = [dict(tp=2), dict(ep=2), dict(tp=2, ep=2, etp=1), dict(tp=2, etp=1)]


def ders_gpt_parity(kind, dispatcher):
    """Non-zero deltas first, so the deltas' own gradients and slices are exercised."""
    return gpt_parity(LAYOUTS, dict(moe_token_dispatcher_type=dispatcher), ders=DERS[kind], perturb=0.05)


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
@pytest.mark.parametrize("kind", sorted(DERS))
def test_ders_gpt_layouts_match_single_rank(dist2, kind, dispatcher):
    dist2.run(ders_gpt_parity, kind, dispatcher)


def test_extended_and_megatron_shared_experts_match_single_rank(dist2):
    shared = dict(moe_shared_expert_intermediate_size=64, moe_shared_expert_gate=True)
    dist2.run(gpt_parity, LAYOUTS, shared, ders=DERS["lowrank"], perturb=0.05)
    extended = DeRSConfig(delta=SparseDeltaConfig(drop_rate=0.9), extended_shared_expert=True)
    dist2.run(gpt_parity, LAYOUTS, shared, ders=extended, perturb=0.05)


# --------------------------------------------------------------------------- #
# Upcycling invariant: zero deltas make the MoE equal the dense model.
# --------------------------------------------------------------------------- #
def zero_delta_moe_equals_dense(kind):
    import torch

    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import build_gpt, tiny_batch, tiny_config

    batch = tiny_batch()
    with model_parallel():
        dense = build_gpt(tiny_config(num_moe_experts=None))
        moe = build_gpt(tiny_config(), ders=DERS[kind])  # fresh DeRS: every delta is zero
        dense_params = dict(dense.named_parameters())
        with torch.no_grad():
            for name, param in moe.named_parameters():
                source = name.replace(".mlp.experts.", ".mlp.")
                if source in dense_params:
                    param.copy_(dense_params[source])
                else:
                    assert ".router." in name or ".deltas." in name, name
        outputs = [m(batch["tokens"], batch["position_ids"], None) for m in (dense, moe)]
    # Top-2 probabilities renormalized to sum to 1 (softmax after top-k), so
    # Σ_k p_k·MLP(x) = MLP(x) up to the rounding of the sum of two terms.
    torch.testing.assert_close(outputs[1], outputs[0], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(DERS))
def test_zero_deltas_equal_dense_model(dist1, kind):
    dist1.run(zero_delta_moe_equals_dense, kind)


# --------------------------------------------------------------------------- #
# Identical initialization of every replicated tensor, whatever the layout.
# --------------------------------------------------------------------------- #
def init_is_layout_independent(kind):
    import torch
    from torch import distributed as dist

    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import build_gpt, tiny_config
    from ders_megatron.testing.sharding import full_tensors

    def expert_tensors():
        tensors = full_tensors(build_gpt(tiny_config(), ders=DERS[kind]))
        return {k: v for k, v in tensors.items() if ".mlp.experts." in k}

    with model_parallel(seed=1):
        reference = expert_tensors()
    for layout in LAYOUTS:
        with model_parallel(**layout, seed=1 + dist.get_rank()):  # even per-rank seeds differ
            tensors = expert_tensors()
        everyone = [None, None]
        dist.all_gather_object(everyone, tensors)
        for name, ref in reference.items():
            for rank_tensors in everyone:
                assert torch.equal(rank_tensors[name], ref), f"{layout}: {name} differs"


@pytest.mark.parametrize("kind", ["lowrank", "sparse"])
def test_init_identical_across_layouts_and_ranks(dist2, kind):
    dist2.run(init_is_layout_independent, kind)


# --------------------------------------------------------------------------- #
# Frozen base: a training step leaves it bit-identical, deltas move.
# --------------------------------------------------------------------------- #
def frozen_base_step(layout):
    import torch
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import build_gpt, lm_loss, tiny_batch, tiny_config
    from ders_megatron.testing.parity import wrap_ddp

    frozen = DeRSConfig(delta=LowRankDeltaConfig(rank=2), freeze_base=True)
    with model_parallel(**layout):
        config = tiny_config()
        model = build_gpt(config, ders=frozen)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        ddp = wrap_ddp(model, config)
        optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2), [ddp])
        for step in range(2):
            ddp.zero_grad_buffer()
            lm_loss(ddp, tiny_batch(seed=step)).backward()
            finalize_model_grads([ddp])
            optimizer.step()
        for name, param in model.named_parameters():
            if ".experts.linear_fc" in name:
                assert not param.requires_grad and torch.equal(param, before[name]), name
            elif ".deltas." in name:
                assert not torch.equal(param, before[name]), f"{name} did not train"


@pytest.mark.parametrize("layout", [dict(), dict(tp=2, ep=2, etp=1)], ids=["ws1", "tp2ep2"])
def test_frozen_base_stays_bit_identical(dist2, layout):
    dist2.run(frozen_base_step, layout)


# --------------------------------------------------------------------------- #
# dist_checkpointing: (TP=2, EP=2) <-> (TP=1, EP=1), then training continues.
# --------------------------------------------------------------------------- #
def _logits_and_step(model, config, batch):
    """Full logits, then one Adam step on ``batch``, then full logits again."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from ders_megatron.testing.models import lm_loss
    from ders_megatron.testing.parity import wrap_ddp
    from test_runtime_parallel import _full_logits

    logits = _full_logits(model, batch)
    model.train()
    ddp = wrap_ddp(model, config)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2), [ddp])
    ddp.zero_grad_buffer()
    lm_loss(ddp, batch).backward()
    finalize_model_grads([ddp])
    optimizer.step()
    return logits, _full_logits(model, batch)


def ders_checkpoint_reshard(ckpt_dir, kind, save_layout, load_layout):
    import os

    import torch
    from megatron.core import dist_checkpointing

    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import build_gpt, tiny_batch, tiny_config
    from ders_megatron.testing.parity import perturb_deltas

    os.makedirs(ckpt_dir, exist_ok=True)
    batch = tiny_batch()
    with model_parallel(**save_layout, seed=7):
        config = tiny_config()
        saved = build_gpt(config, ders=DERS[kind])
        perturb_deltas(saved, 0.05)
        dist_checkpointing.save(saved.sharded_state_dict(), ckpt_dir)
        saved_logits, saved_after_step = _logits_and_step(saved, config, batch)
    with model_parallel(**load_layout, seed=99):
        config = tiny_config()
        loaded = build_gpt(config, ders=DERS[kind])
        loaded.load_state_dict(dist_checkpointing.load(loaded.sharded_state_dict(), ckpt_dir))
        loaded_logits, loaded_after_step = _logits_and_step(loaded, config, batch)
    # Same weights, other partial-sum order across TP/EP: a few ulps of O(1) logits.
    torch.testing.assert_close(loaded_logits, saved_logits, atol=1e-5, rtol=1e-5)
    # One Adam step from the same state and gradients: lr·sign-like updates of 1e-2
    # amplify ulp-level gradient differences only where grad ≈ 0; 1e-4 covers it.
    torch.testing.assert_close(loaded_after_step, saved_after_step, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", sorted(DERS))
def test_checkpoint_reshards_between_tp2_ep2_and_single_rank(dist2, tmp_path, kind):
    dist2.run(ders_checkpoint_reshard, str(tmp_path / "a"), kind, dict(tp=2, ep=2, etp=1), dict())
    dist2.run(ders_checkpoint_reshard, str(tmp_path / "b"), kind, dict(), dict(tp=2, ep=2, etp=1))
    dist2.run(ders_checkpoint_reshard, str(tmp_path / "c"), kind, dict(tp=2), dict(ep=2))


# --------------------------------------------------------------------------- #
# Clear errors.
# --------------------------------------------------------------------------- #
def build_expecting_error(layout, overrides, ders):
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import build_gpt, tiny_config

    with model_parallel(**layout):
        try:
            build_gpt(tiny_config(**overrides), ders=ders)
        except ValueError as err:
            return str(err)
    return "no error"


@pytest.mark.parametrize(
    "layout,overrides,ders,message",
    [
        (dict(tp=1, etp=2), {}, DERS["lowrank"], "--expert-tensor-parallel-size 2 must be 1 or --tensor-model-parallel-size (1)"),
        (dict(), dict(moe_shared_expert_intermediate_size=48), DeRSConfig(extended_shared_expert=True),
         "--moe-shared-expert-intermediate-size"),
        (dict(), {}, DeRSConfig(delta=LowRankDeltaConfig(rank=40)), "--moe-ders-rank 40 exceeds"),
        (dict(), {}, DeRSConfig(delta=SparseDeltaConfig(drop_rate=0.9999)), "keeps no element"),
    ],
    ids=["etp-not-1-or-tp", "shared-size", "rank-too-large", "density-keeps-nothing"],
)
def test_invalid_settings_fail_clearly(dist2, layout, overrides, ders, message):
    for text in dist2.run(build_expecting_error, layout, overrides, ders):
        assert message in text


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="--moe-ders-impl"):
        DeRSConfig(impl="grouped")
