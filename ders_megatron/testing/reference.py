"""The slow reference for every DeRS path: megatron-core's own SequentialMLP MoE
with synthesized expert weights W_e = W_base + Δ_e.

Gradients map back by the chain rule: dL/dW_base = Σ_e dL/dW_e, and each
delta kind's parameters get dL/dΔ_e pulled back through its parametrization
(:func:`expected_delta_grads`).
"""

from __future__ import annotations

import torch

from ders_megatron.deltas import DenseDeltas, LowRankDeltas, SparseDeltas
from ders_megatron.specs import ders_moe_spec, vanilla_moe_spec


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
    for name, param in ders_layer.experts.named_parameters():
        if name.startswith("deltas.") or name.endswith("bias"):
            param.copy_(torch.randn(param.shape, generator=gen) * scale)


@torch.no_grad()
def load_synthesized(ders_layer, vanilla) -> None:
    """Each SequentialMLP expert gets W_base + Δ_e (and the shared base bias)."""
    experts = ders_layer.experts
    for e, mlp in enumerate(vanilla.experts.local_experts):
        for key, weight in experts.synthesized_weights(e).items():
            mlp.get_parameter(key).copy_(weight)
        for linear in ("linear_fc1", "linear_fc2"):
            bias = getattr(experts.get_submodule(linear), "bias", None)
            if bias is not None:
                mlp.get_submodule(linear).bias.copy_(bias)


def _fc1_grads(mlp, gated: bool) -> dict[str, torch.Tensor]:
    grad = mlp.linear_fc1.weight.grad
    if gated:
        gate, up = torch.chunk(grad, 2, dim=0)
        return {"fc1_gate": gate, "fc1_up": up}
    return {"fc1": grad}


def expected_delta_grads(ders_layer, vanilla) -> dict[str, torch.Tensor]:
    """Gradients the DeRS experts' parameters must have, from the reference's dL/dW_e."""
    experts = ders_layer.experts
    gated = experts.config.gated_linear_unit
    per_expert = [
        {**_fc1_grads(mlp, gated), "fc2": mlp.linear_fc2.weight.grad}
        for mlp in vanilla.experts.local_experts
    ]
    expected = {
        "linear_fc1.weight": sum(mlp.linear_fc1.weight.grad for mlp in vanilla.experts.local_experts),
        "linear_fc2.weight": sum(mlp.linear_fc2.weight.grad for mlp in vanilla.experts.local_experts),
    }
    for linear in ("linear_fc1", "linear_fc2"):
        biases = [getattr(mlp.get_submodule(linear), "bias", None) for mlp in vanilla.experts.local_experts]
        if biases[0] is not None:
            expected[f"{linear}.bias"] = sum(b.grad for b in biases)
    for matrix, deltas in experts.deltas.items():
        grad_EOI = torch.stack([g[matrix] for g in per_expert])
        expected.update(_pull_back(deltas, grad_EOI, f"deltas.{matrix}"))
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
    if isinstance(deltas, SparseDeltas):
        values = []
        for e in range(deltas.num_experts):
            row, col, index = deltas.positions(e)
            g = torch.zeros(deltas.kept, dtype=grad_EOI.dtype)
            g[index] = grad_EOI[e][row, col]
            values.append(g)
        return {f"{prefix}.values": torch.stack(values)}
    raise TypeError(f"no pull-back for {type(deltas).__name__}")
