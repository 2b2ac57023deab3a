"""DeRS experts under DeepSpeed-MoE (``ders_megatron/convert/deepspeed/``, deepspeed 0.19.8).

* outputs and every gradient equal the synthesized-weight reference (W_e = W_base + Δ_e,
  DeepSpeed's own gating functions, dense einsum dispatch), at world size 1 and at world
  size 2 with expert parallel 2; and one ZeRO-2 step through ``deepspeed.initialize``
  moves every parameter by the reference gradient averaged over ranks;
* ZeRO 2 at world size 2 trains, ``save_checkpoint``/``load_checkpoint`` round-trip
  exactly and training continues identically; ZeRO 1 at world size 1 trains;
* parameter counts match ``ders_megatron.core.accounting`` and megatron's DeRS MoE layer;
* the DeepSpeed <-> megatron key map, on a single MoE layer: same init, same weights,
  same expert outputs.

Skipped without deepspeed (``pip install -e .[deepspeed]``). DeepSpeed runs only in this
module's own gloo ranks (:class:`PlainGlooPool`); the megatron side of a comparison runs
in conftest's ``dist1``, and the pytest process itself never imports deepspeed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("deepspeed not installed (pip install -e .[deepspeed])", allow_module_level=True)

from ders_megatron.core.config import DenseDeltaConfig, LowRankDeltaConfig
from ders_megatron.core.config import SparseDeltaConfig  # noqa: E402
from ders_megatron.convert.deepspeed import DeRSFFNConfig  # noqa: E402
from ders_megatron.testing.distributed import DistributedPool  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "deepspeed" / "train_ders_moe.py"

KINDS = {
    "lowrank": LowRankDeltaConfig(rank=3, alpha=6.0),
    "sparse": SparseDeltaConfig(drop_rate=0.9),
    "dense": DenseDeltaConfig(),
}
# (FFN, routing): SwiGLU top-2 with capacity for every token; GELU + bias top-1 whose
# capacity (factor 1) drops tokens. Random parts of DeepSpeed's gate (random token
# selection, sampled second expert) are off so the reference routes identically.
FLAVOURS = {
    "swiglu-top2": (dict(gated=True, activation="silu"), dict(k=2, capacity_factor=2.0, top2_2nd_expert_sampling=False)),
    "gelu-bias-top1": (dict(bias=True), dict(k=1, capacity_factor=1.0, use_rts=False)),
}
D, FFN, NUM_EXPERTS = 16, 24, 4

# float32. The DeRS path computes x·W_base + x·Δ_e where the reference computes
# x·(W_base + Δ_e), and dispatches by index where the reference multiplies one-hot
# masks: re-associated sums of O(1) terms differ by a few ulps, gradients summed over
# 4 experts and 2 ranks by a few more. 1e-5 / 1e-4 is well above that and far below
# any real error (a wrong slice, expert or scale gives O(1e-2) and up). The engine-step
# check reads the gradient back as w_before - w_after (SGD, lr 1): one more rounding
# of |w| <= 1, below 1e-7.
ATOL, RTOL = 1e-5, 1e-4


# --------------------------------------------------------------------------- #
# Ranks without the megatron CPU runtime
# --------------------------------------------------------------------------- #
def PlainGlooPool(world_size: int) -> DistributedPool:
    """Gloo ranks WITHOUT the megatron CPU runtime: its ``torch.cuda`` redirections send
    DeepSpeed's accelerator and ``torch.optim`` down CUDA paths. Megatron-side checks run
    in conftest's ``dist1``. DS_ACCELERATOR is read at deepspeed's first accelerator query."""
    return DistributedPool(world_size, cpu_runtime=False, env={"DS_ACCELERATOR": "cpu"})


# --------------------------------------------------------------------------- #
# Worker-side helpers
# --------------------------------------------------------------------------- #
def _init_deepspeed() -> None:
    """DeepSpeed over the pool's gloo group, on its CPU accelerator (once per worker)."""
    import logging

    import deepspeed
    import deepspeed.comm as ds_dist
    import deepspeed.ops

    deepspeed.utils.logger.setLevel(logging.WARNING)
    if ds_dist.is_initialized():
        return
    # Training never uses DeepSpeed's shared-memory all-reduce op (only
    # inference_all_reduce does, comm/torch.py:291-305); marking it incompatible skips
    # its ~30 s C++ build on first use (comm/torch.py:47-53), so no compiler is needed.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")  # wraps the existing group (comm/comm.py:877-880)


def _example():
    """examples/deepspeed/train_ders_moe.py as a module (loaded once per process)."""
    if "train_ders_moe" not in sys.modules:
        spec = importlib.util.spec_from_file_location("train_ders_moe", EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_ders_moe"] = module
        spec.loader.exec_module(module)
    return sys.modules["train_ders_moe"]


def _ffn_config(kind: str, flavour: str, **overrides) -> DeRSFFNConfig:
    ffn, _ = FLAVOURS[flavour]
    return DeRSFFNConfig(hidden_size=D, ffn_hidden_size=FFN, num_experts=NUM_EXPERTS, delta=KINDS[kind], **ffn, **overrides)


@torch.no_grad()
def _randomize(module, seed: int, scale: float = 0.05) -> None:
    """Non-zero deltas (and biases) so every term and gradient is exercised."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(module.named_parameters()):
        if name.endswith("bias") or ".deltas." in f".{name}":
            param.copy_(torch.randn(param.shape, generator=gen) * scale)


def _synthesized(base, expert) -> tuple[torch.Tensor, torch.Tensor]:
    """W_e = W_base + Δ_e, differentiable in the base and the delta parameters."""
    deltas = expert.deltas
    if "fc1_gate" in deltas:
        gate, up = base.linear_fc1.weight.chunk(2)
        fc1 = torch.cat([gate + deltas["fc1_gate"].delta_weight(0), up + deltas["fc1_up"].delta_weight(0)])
    else:
        fc1 = base.linear_fc1.weight + deltas["fc1"].delta_weight(0)
    return fc1, base.linear_fc2.weight + deltas["fc2"].delta_weight(0)


def _reference_moe(base, experts, gate_weight, x_SD, routing):
    """DeepSpeed's gating functions, GShard's dense einsum dispatch/combine, and one plain FFN
    per expert with synthesized weights."""
    from deepspeed.moe.sharded_moe import top1gating, top2gating

    logits = torch.nn.functional.linear(x_SD.float(), gate_weight.float())  # as TopKGate.forward
    cf = routing["capacity_factor"]
    if routing["k"] == 1:
        l_aux, combine_SEC, dispatch_SEC, _ = top1gating(logits, cf, 4, use_rts=False)
    else:
        l_aux, combine_SEC, dispatch_SEC, _ = top2gating(logits, cf, 4, top2_2nd_expert_sampling=False)
    x_ECD = torch.einsum("sec,sd->ecd", dispatch_SEC.to(x_SD.dtype), x_SD)
    outs = []
    for e, expert in enumerate(experts):
        fc1, fc2 = _synthesized(base, expert)
        h = base.activation(torch.nn.functional.linear(x_ECD[e], fc1, base.linear_fc1.bias))
        outs.append(torch.nn.functional.linear(h, fc2, base.linear_fc2.bias))
    return torch.einsum("sec,ecd->sd", combine_SEC.to(x_SD.dtype), torch.stack(outs)), l_aux


def _close(got, want, name):
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def _layer_and_reference(config, routing, ep_size):
    """A DeRS MoE layer and the unsharded reference pieces (base, all experts, gate weight)
    with the same, randomized, weights."""
    import copy

    from ders_megatron.convert.deepspeed.ffn import ExpertDelta
    from ders_megatron.convert.deepspeed.layer import DeRSMoE

    torch.manual_seed(0)  # the gate (torch's default init): the same on every rank
    layer = DeRSMoE(config, ep_size=ep_size, **routing)

    # Every rank builds the unsharded reference: all experts, from the same seeds.
    experts = [ExpertDelta(config, e) for e in range(NUM_EXPERTS)]
    for g in layer.deepspeed_moe.experts.expert_ids:  # init does not depend on the EP layout
        for (name, got), want in zip(layer.local_expert(g).state_dict().items(), experts[g].state_dict().values()):
            assert torch.equal(got, want), f"expert {g} {name}: init differs from the unsharded one"
    for e, expert in enumerate(experts):
        _randomize(expert, seed=100 + e)
    _randomize(layer.ders_base, seed=7)
    for g in layer.deepspeed_moe.experts.expert_ids:
        layer.local_expert(g).load_state_dict(experts[g].state_dict())
    base = copy.deepcopy(layer.ders_base)
    gate_weight = layer.deepspeed_moe.gate.wg.weight.detach().clone().requires_grad_(True)
    return layer, base, experts, gate_weight


def _tokens(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, upstream gradient) [4, 8, D]: each rank its own tokens."""
    gen = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(4, 8, D, generator=gen), torch.randn(4, 8, D, generator=gen)


def _reference_loss(base, experts, gate_weight, x, upstream, routing) -> torch.Tensor:
    """The loss every parity check differentiates: <output, upstream> + 0.1 * aux loss."""
    out, l_aux = _reference_moe(base, experts, gate_weight, x.reshape(-1, D), routing)
    return (out.view_as(x) * upstream).sum() + 0.1 * l_aux


def reference_parity(kind: str, flavour: str, ep_size: int) -> None:
    import torch.distributed as dist

    _init_deepspeed()
    rank = dist.get_rank()
    config = _ffn_config(kind, flavour)
    routing = FLAVOURS[flavour][1]
    layer, base, experts, gate_weight = _layer_and_reference(config, routing, ep_size)
    x, upstream = _tokens(rank)
    x_ds, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, l_aux, _ = layer(x_ds)
    ((out * upstream).sum() + 0.1 * l_aux).backward()
    with torch.no_grad():
        ref_out, ref_aux = _reference_moe(base, experts, gate_weight, x.reshape(-1, D), routing)
    _reference_loss(base, experts, gate_weight, x_ref, upstream, routing).backward()

    _close(out, ref_out.view_as(x), "output")
    _close(l_aux, ref_aux, "aux loss")
    _close(x_ds.grad, x_ref.grad, "input grad")
    _close(layer.deepspeed_moe.gate.wg.weight.grad, gate_weight.grad, "gate grad")  # local tokens only

    def summed(grad):  # over ranks: each rank saw other tokens
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad

    for name, param in base.named_parameters():
        assert param.grad.abs().sum() > 0, f"vacuous: zero reference gradient for base {name}"
        _close(summed(layer.ders_base.get_parameter(name).grad), summed(param.grad), f"base {name}")
    for e, expert in enumerate(experts):
        for name, param in expert.named_parameters():
            want = summed(param.grad)
            assert want.abs().sum() > 0, f"vacuous: zero reference gradient for expert {e} {name}"
            if e in layer.deepspeed_moe.experts.expert_ids:
                # all-to-all brought every rank's tokens for expert e to its owner
                _close(layer.local_expert(e).get_parameter(name).grad, want, f"expert {e} {name}")


class _LossOf(torch.nn.Module):
    """The parity loss around a DeRS MoE layer, as a model for ``deepspeed.initialize``."""

    def __init__(self, layer):
        super().__init__()
        self.moe = layer

    def forward(self, x, upstream):
        out, l_aux, _ = self.moe(x)
        return (out * upstream).sum() + 0.1 * l_aux


def zero2_sgd_step_equals_reference(kind: str) -> None:
    """One ZeRO-2 SGD step (lr 1) at world 2, EP 2: every parameter moves by the mean over
    ranks of its reference gradient (DeepSpeed averages expert gradients over the
    data-parallel world too, engine.py:3898-3900, stage_1_and_2.py:1688)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    _init_deepspeed()
    rank, world = dist.get_rank(), dist.get_world_size()
    routing = FLAVOURS["swiglu-top2"][1]
    layer, base, experts, gate_weight = _layer_and_reference(_ffn_config(kind, "swiglu-top2"), routing, 2)
    model = _LossOf(layer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # A client optimizer needs DeepSpeed's MoE param groups (moe/utils.py:72).
    param_groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "dense"})
    ds_config = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0 (runtime/constants.py:203)
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(param_groups, lr=1.0), config=ds_config)
    x, upstream = _tokens(rank)
    engine.backward(engine(x, upstream))
    engine.step()
    _reference_loss(base, experts, gate_weight, x, upstream, routing).backward()

    step = {n: before[n] - p.detach() for n, p in model.named_parameters()}  # lr * grad, lr = 1

    def mean(grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / world

    _close(step["moe.deepspeed_moe.gate.wg.weight"], mean(gate_weight.grad), "gate step")
    for name, param in base.named_parameters():
        _close(step[f"moe.ders_base.{name}"], mean(param.grad), f"base {name} step")
    first = layer.ep_rank * layer.num_local_experts
    for e, expert in enumerate(experts):
        for name, param in expert.named_parameters():
            want = mean(param.grad)
            if e in layer.deepspeed_moe.experts.expert_ids:
                key = f"moe.deepspeed_moe.experts.deepspeed_experts.{e - first}.{name}"
                _close(step[key], want, f"expert {e} {name} step")


def zero2_train_save_load(ckpt_dir: str) -> dict:
    import copy

    import torch.distributed as dist

    from ders_megatron.convert.deepspeed import deepspeed_to_megatron, local_expert_state, read_deepspeed_checkpoint

    _init_deepspeed()
    ex = _example()
    args = ex.build_parser().parse_args(SMALL_ARGS + ["--ep-size", "2", "--swiglu"])
    ds_config = ex.load_ds_config(args)
    assert ds_config["zero_optimization"]["stage"] == 2
    engine = ex.build_engine(args, ds_config)
    losses = ex.train(engine, args, 0, 16)
    engine.save_checkpoint(ckpt_dir, tag="t16", client_state={"step": 16})
    saved = copy.deepcopy(engine.module.state_dict())
    continued = ex.train(engine, args, 16, 4)
    final = copy.deepcopy(engine.module.state_dict())

    other = copy.copy(args)
    other.seed = args.seed + 1  # another init, to see the load overwrite it
    resumed = ex.build_engine(other, ds_config)
    assert not all(torch.equal(v, saved[k]) for k, v in resumed.module.state_dict().items())
    _, client_state = resumed.load_checkpoint(ckpt_dir, tag="t16")
    assert client_state["step"] == 16
    for key, value in resumed.module.state_dict().items():
        assert torch.equal(value, saved[key]), f"{key} not restored exactly"
    continued_again = ex.train(resumed, args, 16, 4)
    for key, value in resumed.module.state_dict().items():
        assert torch.equal(value, final[key]), f"{key} diverged after resuming"

    # The checkpoint read back in one piece (global expert indices) and converted.
    full = read_deepspeed_checkpoint(ckpt_dir, tag="t16")
    rank = dist.get_rank()
    for block in range(args.layers):
        prefix = f"blocks.{block}.moe."
        moe = engine.module.blocks[block].moe
        mine = local_expert_state(full, prefix, moe.ep_rank, moe.num_local_experts)
        assert mine.keys() == {k[len(prefix):] for k in saved if k.startswith(prefix)}
        for key, value in mine.items():
            assert torch.equal(value, saved[prefix + key]), key
        megatron = deepspeed_to_megatron(full, ex.ffn_config(args, block + 1), prefix=prefix)
        assert megatron["experts.deltas.fc1_gate.lora_A"].shape[0] == args.num_experts
    return dict(rank=rank, losses=losses, continued=continued, continued_again=continued_again)


def zero1_train_world1() -> list[float]:
    """ZeRO 1, one rank, sparse deltas over a frozen base."""
    _init_deepspeed()
    ex = _example()
    args = ex.build_parser().parse_args(SMALL_ARGS + ["--zero-stage", "1", "--moe-ders", "sparse", "--moe-ders-freeze-base"])
    engine = ex.build_engine(args, ex.load_ds_config(args))
    base = {n: p.detach().clone() for n, p in engine.module.named_parameters() if ".ders_base." in n}
    losses = ex.train(engine, args, 0, 16)
    for name, param in engine.module.named_parameters():
        if name in base:
            assert torch.equal(param, base[name]), f"frozen {name} moved"
    return losses


SMALL_ARGS = ["--cpu", "--vocab", "32", "--seq", "8", "--hidden", "16", "--ffn", "32", "--layers", "2"]


def deepspeed_side(kind: str, flavour: str, randomize: bool, **overrides) -> dict:
    """A DeRS MoE layer built under DeepSpeed: its state, parameter counts, and (randomized)
    its experts' synthesized weights and output on fixed tokens per expert."""
    from ders_megatron.convert.deepspeed.layer import DeRSMoE

    _init_deepspeed()
    config = _ffn_config(kind, flavour, **overrides)
    layer = DeRSMoE(config, **FLAVOURS[flavour][1])
    if randomize:
        _randomize(layer, seed=3)
    numel = lambda params: sum(p.numel() for p in params)  # noqa: E731
    base = layer.ders_base
    x_GECD = torch.randn(1, NUM_EXPERTS, CAPACITY, D, generator=torch.Generator().manual_seed(0))
    return dict(
        config=config,
        state=layer.state_dict(),
        deltas=numel(layer.deepspeed_moe.experts.parameters()),
        gate=numel(layer.deepspeed_moe.gate.parameters()),
        base_weights=base.linear_fc1.weight.numel() + base.linear_fc2.weight.numel(),
        base_biases=numel(p for n, p in base.named_parameters() if n.endswith("bias")),
        total=numel(layer.parameters()),
        synthesized=[layer.local_expert(e).synthesized_weights(base) for e in range(NUM_EXPERTS)],
        x=x_GECD,
        out=layer.deepspeed_moe.experts(x_GECD).detach(),
    )


CAPACITY = 5


def megatron_side(config: DeRSFFNConfig, topk: int, state: dict | None = None, x_GECD=None) -> dict:
    """megatron-core's DeRS MoE layer (drop-in experts) of the same dims and layer number:
    its initial state, or, loaded with ``state``, its experts on ``x``."""
    from ders_megatron.core.config import DeRSConfig
    from ders_megatron.layers.specs import ders_moe_spec
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import tiny_config

    with model_parallel():
        mc_config = tiny_config(
            num_layers=config.num_layers, hidden_size=config.hidden_size,
            ffn_hidden_size=config.ffn_hidden_size, moe_ffn_hidden_size=config.ffn_hidden_size,
            num_moe_experts=config.num_experts, moe_router_topk=topk, gated_linear_unit=config.gated,
            activation_func=getattr(torch.nn.functional, config.activation),
            add_bias_linear=config.bias, init_method_std=config.init_method_std,
            moe_router_pre_softmax=topk == 1,  # megatron requires it for top-1; only experts are compared
        )
        layer = ders_moe_spec(DeRSConfig(delta=config.delta, seed=config.seed))(config=mc_config)
        layer.set_layer_number(config.layer_number)
        result = dict(total=sum(p.numel() for p in layer.parameters()))
        if state is None:
            return dict(result, state=layer.state_dict())
        layer.load_state_dict(state, strict=True)
        experts = layer.experts
        E, C = config.num_experts, x_GECD.shape[2]
        out, _ = experts(x_GECD.reshape(-1, config.hidden_size), torch.full((E,), C), torch.ones(E * C))
        synthesized = [experts.synthesized_weights(e) for e in range(E)]
        return dict(result, state=layer.state_dict(), out=out.detach(), synthesized=synthesized)


def layout_check_rejects_expert_paths() -> None:
    from ders_megatron.convert.deepspeed.layer import DeRSMoE, check_checkpoint_layout

    _init_deepspeed()
    config = _ffn_config("lowrank", "swiglu-top2")
    good = torch.nn.ModuleDict({"moe": DeRSMoE(config)})
    check_checkpoint_layout(good)
    bad = torch.nn.ModuleDict({"my_experts": DeRSMoE(config)})
    with pytest.raises(ValueError, match="rename the attributes"):
        check_checkpoint_layout(bad)
    good["moe"].ders_base.linear_fc1.weight.allreduce = False  # a base marked as expert
    with pytest.raises(ValueError, match="disagree"):
        check_checkpoint_layout(good)
    with pytest.raises(ValueError, match="use_data_before_expert_parallel_"):
        good["moe"].set_deepspeed_parallelism(use_data_before_expert_parallel_=True)


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def ds1():
    pool = PlainGlooPool(world_size=1)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def ds2():
    pool = PlainGlooPool(world_size=2)
    yield pool
    pool.close()


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_world1_equals_synthesized_reference(ds1, kind, flavour):
    ds1.run(reference_parity, kind, flavour, 1)


@pytest.mark.parametrize("kind,flavour", [(k, "swiglu-top2") for k in sorted(KINDS)] + [("lowrank", "gelu-bias-top1")])
def test_world2_ep2_equals_synthesized_reference(ds2, kind, flavour):
    ds2.run(reference_parity, kind, flavour, 2)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_zero2_world2_ep2_step_equals_reference(ds2, kind):
    ds2.run(zero2_sgd_step_equals_reference, kind)


def test_zero2_world2_ep2_trains_and_checkpoint_round_trips(ds2, tmp_path):
    results = ds2.run(zero2_train_save_load, str(tmp_path))
    for r in results:
        # ln(32) = 3.47 at the start; 16 Adam steps at lr 3e-3 on a learnable map take
        # it well down. 10% is a loose floor that noise between steps cannot fake.
        first, last = sum(r["losses"][:4]) / 4, sum(r["losses"][-4:]) / 4
        assert last < 0.9 * first, r["losses"]
        assert r["continued"] == r["continued_again"]  # bitwise: same floats, same order
    files = sorted(os.listdir(tmp_path / "t16"))
    expert_files = [f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in range(2) for e in range(4)]
    assert set(expert_files) <= set(files) and "mp_rank_00_model_states.pt" in files
    main = torch.load(tmp_path / "t16" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert "blocks.0.moe.ders_base.linear_fc1.weight" in main
    assert not any("deltas" in key for key in main)
    expert = torch.load(tmp_path / "t16" / expert_files[3], weights_only=True)
    assert expert and all(k.startswith("blocks.0.moe.deepspeed_moe.experts.deepspeed_experts.3.deltas.") for k in expert)


def test_zero1_world1_trains(ds1):
    losses = ds1.run(zero1_train_world1)[0]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.9 * first, losses  # as in the ZeRO 2 test


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_parameter_accounting_matches_paper_and_megatron(ds1, dist1, kind, flavour):
    from ders_megatron.core.accounting import DeltaSpec, MoEShape, added_parameters
    from ders_megatron.convert.deepspeed import megatron_to_deepspeed

    ds = ds1.run(deepspeed_side, kind, flavour, False)[0]
    config, topk = ds["config"], FLAVOURS[flavour][1]["k"]
    delta = config.delta
    spec = DeltaSpec(
        kind=kind,
        rank=delta.rank if kind == "lowrank" else None,
        drop_rate=delta.drop_rate if kind == "sparse" else None,
    )
    shape = MoEShape(
        hidden_size=D, ffn_hidden_size=FFN, num_layers=1, num_experts=NUM_EXPERTS,
        topk=topk, gated=config.gated, bias=config.bias,
    )
    report = added_parameters(shape, spec)
    assert ds["deltas"] == report.per_layer.expert_weights  # base = dense FFN: deltas are all it adds
    assert ds["gate"] == report.per_layer.router
    assert ds["base_weights"] == shape.dense_weight_params
    # One bias in the shared base, as the megatron path; the paper counts one per expert.
    assert ds["base_biases"] == shape.dense_bias_params

    megatron = dist1.run(megatron_side, config, topk)[0]
    # megatron's router has an [E] bias when add_bias_linear (router.py:64); DeepSpeed's gate none
    assert megatron["total"] == ds["total"] + (NUM_EXPERTS if config.bias else 0)
    mc_state = dict(megatron["state"])
    if config.bias:
        mc_state["router.bias"] = torch.zeros(NUM_EXPERTS)  # randomly initialised; DeepSpeed holds only 0
    as_ds = megatron_to_deepspeed(mc_state, config)  # tensor by tensor, through the key map
    assert as_ds.keys() == ds["state"].keys()
    for key, value in as_ds.items():
        assert value.shape == ds["state"][key].shape, key


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_conversion_to_megatron_layer_and_back(ds1, dist1, kind, flavour):
    from ders_megatron.convert.deepspeed import deepspeed_to_megatron, megatron_to_deepspeed

    topk = FLAVOURS[flavour][1]["k"]
    # Built from the same seed and layer number, both paths start from the same layer.
    ds = ds1.run(deepspeed_side, kind, flavour, False, layer_number=2, num_layers=2)[0]
    megatron = dist1.run(megatron_side, ds["config"], topk)[0]
    converted = deepspeed_to_megatron(ds["state"], ds["config"])
    weights = {k: v for k, v in megatron["state"].items() if not k.endswith("._extra_state")}  # None
    assert converted.keys() == weights.keys()
    for key, value in weights.items():
        if not key.startswith("router."):  # megatron's router is initialised from its own RNG
            assert torch.equal(converted[key], value), f"{key}: init differs from megatron's"

    ds = ds1.run(deepspeed_side, kind, flavour, True, layer_number=2, num_layers=2)[0]
    converted = deepspeed_to_megatron(ds["state"], ds["config"])
    megatron = dist1.run(megatron_side, ds["config"], topk, converted, ds["x"])[0]
    back = megatron_to_deepspeed(megatron["state"], ds["config"])
    assert back.keys() == ds["state"].keys()
    for key, value in ds["state"].items():
        assert torch.equal(back[key], value), key
    for e in range(NUM_EXPERTS):  # same fp32 merge on the same tensors: bitwise
        for key, value in megatron["synthesized"][e].items():
            assert torch.equal(ds["synthesized"][e][key], value), f"expert {e} {key}"
    _close(ds["out"].reshape(-1, D), megatron["out"], "megatron experts output")


def test_checkpoint_layout_check(ds1):
    ds1.run(layout_check_rejects_expert_paths)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="DeRSFFNConfig.activation"):
        DeRSFFNConfig(hidden_size=4, ffn_hidden_size=8, num_experts=2, activation="tanh")
    with pytest.raises(ValueError, match="DeRSFFNConfig.hidden_size"):
        DeRSFFNConfig(hidden_size=0, ffn_hidden_size=8, num_experts=2)
    with pytest.raises(ValueError, match="DeRSFFNConfig.delta"):
        DeRSFFNConfig(hidden_size=4, ffn_hidden_size=8, num_experts=2, delta="lowrank")


def test_conversion_names_missing_and_misshapen_keys():
    from ders_megatron.convert.deepspeed import deepspeed_to_megatron
    from ders_megatron.convert.deepspeed.ffn import DeRSLocalExperts, SharedBase

    config = _ffn_config("lowrank", "swiglu-top2")
    base = SharedBase(config)
    experts = DeRSLocalExperts(config, base, range(NUM_EXPERTS))
    state = {f"ders_base.{k}": v for k, v in base.state_dict().items()}
    state.update({f"deepspeed_moe.experts.{k}": v for k, v in experts.state_dict().items()})
    with pytest.raises(KeyError, match="deepspeed_moe.gate.wg.weight"):
        deepspeed_to_megatron(state, config)
    state["deepspeed_moe.gate.wg.weight"] = torch.zeros(NUM_EXPERTS, D + 1)
    with pytest.raises(ValueError, match=r"shape \(4, 17\), expected \(4, 16\)"):
        deepspeed_to_megatron(state, config)
    state["deepspeed_moe.gate.wg.weight"] = torch.zeros(NUM_EXPERTS, D)
    assert "router.weight" in deepspeed_to_megatron(state, config)
    state["deepspeed_moe.experts.deepspeed_experts.9.deltas.fc2.lora_A"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected keys"):
        deepspeed_to_megatron(state, config)


def test_example_cli_flags_are_frozen():
    ex = _example()
    flags = {s for a in ex.build_parser()._actions for s in a.option_strings}
    assert flags == {
        "-h", "--help", "--cpu", "--ds-config", "--zero-stage", "--steps", "--seed", "--vocab", "--seq",
        "--hidden", "--ffn", "--layers", "--swiglu", "--num-experts", "--ep-size", "--top-k",
        "--capacity-factor", "--aux-loss-coeff", "--moe-ders", "--moe-ders-rank", "--moe-ders-alpha",
        "--moe-ders-drop-rate", "--moe-ders-freeze-base", "--save-dir", "--load-dir", "--local_rank",
    }
