"""The slow reference for every DeRS path: megatron-core's own SequentialMLP MoE
with synthesized expert weights W_e = W_base + Δ_e.

Gradients map back by the chain rule: dL/dW_base = Σ_e dL/dW_e, and each
delta kind's parameters get dL/dΔ_e pulled back through its parametrization
(:func:`expected_delta_grads`).
"""

from __future__ import annotations

import torch

from ders_megatron.core.deltas import DenseDeltas, LowRankDeltas, PositionDeltas
from ders_megatron.layers.specs import ders_moe_spec, vanilla_moe_spec


def build_moe_layers(config, ders, layer_number: int = 1):
    """(DeRS MoE layer, vanilla megatron MoE layer) for one config, same router weights."""
    ders_layer = ders_moe_spec(ders)(config=config)
    ders_layer.set_layer_number(layer_number)
    vanilla = vanilla_moe_spec()(config=config)
    vanilla.set_layer_number(layer_number)
    for mlp in vanilla.experts.local_experts:
        mlp.linear_fc2.register_forward_hook(_clone_output)
    vanilla.router.load_state_dict(ders_layer.router.state_dict())
    return ders_layer, vanilla


def _clone_output(module, inputs, outputs):
    """Work around megatron-core 0.19.2 with bias and no expert comm (TP=EP=1):
    ``RowParallelLinear`` returns the output of ``_ReduceFromModelParallelRegion``
    as is, and ``MLP.forward`` then adds the bias in place
    (``transformer/mlp.py:354``), which autograd forbids on a custom Function's
    view. Cloning changes no value."""
    output, bias = outputs
    return output.clone(), bias


@torch.no_grad()
def randomize_deltas(ders_layer, scale: float = 0.05, seed: int = 0) -> None:
    """Non-zero deltas (and base biases) so the comparison exercises every term."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in ders_layer.named_parameters():
        if ".deltas." in f".{name}" or ".biases." in name or name.startswith("experts.") and name.endswith("bias"):
            param.copy_(torch.randn(param.shape, generator=gen) * scale)


@torch.no_grad()
def load_synthesized(ders_layer, vanilla) -> None:
    """Each SequentialMLP expert gets W_base + Δ_e (and the shared base bias, or its own); the shared
    expert gets W_base + Δ_shared (extended DeRS) or a copy of megatron's own."""
    experts = ders_layer.experts
    for e, mlp in enumerate(vanilla.experts.local_experts):
        for key, weight in experts.synthesized_weights(e).items():
            mlp.get_parameter(key).copy_(weight)
        for linear, own in (("linear_fc1", "fc1"), ("linear_fc2", "fc2")):
            bias = experts.biases[own][e] if experts.own_bias else getattr(experts.get_submodule(linear), "bias", None)
            if bias is not None:
                mlp.get_submodule(linear).bias.copy_(bias)
    shared = ders_layer.shared_experts
    if shared is None:
        return
    if hasattr(shared, "synthesized_weights"):
        for key, weight in shared.synthesized_weights().items():
            vanilla.shared_experts.get_parameter(key).copy_(weight)
        if shared.gate_weight is not None:
            vanilla.shared_experts.gate_weight.copy_(shared.gate_weight)
    else:
        vanilla.shared_experts.load_state_dict(shared.state_dict())


def _fc1_grads(mlp, gated: bool) -> dict[str, torch.Tensor]:
    grad = mlp.linear_fc1.weight.grad
    if gated:
        gate, up = torch.chunk(grad, 2, dim=0)
        return {"fc1_gate": gate, "fc1_up": up}
    return {"fc1": grad}


def _weight_grads(mlp, gated: bool) -> dict[str, torch.Tensor]:
    return {**_fc1_grads(mlp, gated), "fc2": mlp.linear_fc2.weight.grad}


def expected_grads(ders_layer, vanilla) -> dict[str, torch.Tensor]:
    """Gradients every non-router parameter of the DeRS MoE layer must have, by name,
    from the reference's dL/dW (chain rule through W = W_base + Δ)."""
    experts = ders_layer.experts
    gated = experts.config.gated_linear_unit
    mlps = list(vanilla.experts.local_experts)
    base_users = list(mlps)
    expected = {}
    shared = ders_layer.shared_experts
    if shared is not None and hasattr(shared, "synthesized_weights"):
        base_users.append(vanilla.shared_experts)  # extended DeRS: the shared expert uses the base
        for matrix, deltas in shared.deltas.items():
            grad = _weight_grads(vanilla.shared_experts, gated)[matrix].unsqueeze(0)
            expected.update(_pull_back(deltas, grad, f"shared_experts.deltas.{matrix}"))
        if shared.gate_weight is not None:
            expected["shared_experts.gate_weight"] = vanilla.shared_experts.gate_weight.grad
    elif shared is not None:
        for name, param in vanilla.shared_experts.named_parameters():
            expected[f"shared_experts.{name}"] = param.grad
    for linear in ("linear_fc1", "linear_fc2"):
        expected[f"experts.{linear}.weight"] = sum(m.get_submodule(linear).weight.grad for m in base_users)
        biases = [getattr(m.get_submodule(linear), "bias", None) for m in mlps]
        if biases[0] is not None and experts.own_bias:  # each expert's own: [E, out]
            expected[f"experts.biases.{linear[-3:]}"] = torch.stack([b.grad for b in biases])
        elif biases[0] is not None:
            expected[f"experts.{linear}.bias"] = sum(b.grad for b in biases)
    per_expert = [_weight_grads(mlp, gated) for mlp in mlps]
    for matrix, deltas in experts.deltas.items():
        grad_EOI = torch.stack([g[matrix] for g in per_expert])
        expected.update(_pull_back(deltas, grad_EOI, f"experts.deltas.{matrix}"))
    return expected


def _pull_back(deltas, grad_EOI: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """dL/dθ of a delta parametrization from dL/dΔ_e for every expert."""
    if isinstance(deltas, DenseDeltas):
        return {f"{prefix}.weight": grad_EOI}
    if isinstance(deltas, LowRankDeltas):
        a, b, s = deltas.lora_A.detach(), deltas.lora_B.detach(), deltas.scale
        return {
            f"{prefix}.lora_A": s * b.transpose(1, 2) @ grad_EOI,  # [E, R, I]
            f"{prefix}.lora_B": s * grad_EOI @ a.transpose(1, 2),  # [E, O, R]
        }
    if isinstance(deltas, PositionDeltas):  # sparse (dare) and magnitude: values at positions
        values = []
        for e in range(deltas.num_experts):
            row, col, index = deltas.positions(e)
            g = torch.zeros(deltas.kept, dtype=grad_EOI.dtype)
            g[index] = grad_EOI[e][row, col]
            values.append(g)
        return {f"{prefix}.values": torch.stack(values)}
    raise TypeError(f"no pull-back for {type(deltas).__name__}")
