"""DeepSpeed DeRS MoE layer <-> megatron-core DeRS MoE layer: one explicit key map.

Only the MoE layer converts; the rest of a DeepSpeed model (attention, norms,
embeddings) is the user's own ``nn.Module`` with no fixed layout, so a whole
megatron checkpoint cannot be produced from it. Keys on the megatron side are
relative to a megatron MoE layer (``decoder.layers.<L>.mlp.``, ``docs/design.md``
"Checkpoint key layout"); its experts' plain ``state_dict`` is the ``experts.*``
part. E = global experts, ``<m>`` = ``fc1_gate``/``fc1_up``/``fc2`` (gated) or
``fc1``/``fc2``:

| DeepSpeed (``DeRSMoE``, per-expert tensors ``[1, ...]``) | megatron (``DeRSMoELayer``) |
|---|---|
| ``ders_base.linear_fc{1,2}.{weight,bias}`` | ``experts.linear_fc{1,2}.{weight,bias}`` |
| ``deepspeed_moe.experts.deepspeed_experts.<e>.deltas.<m>.<p>`` | ``experts.deltas.<m>.<p>[e]`` (``<p>`` = ``lora_A``, ``lora_B``, ``values`` or ``weight``) |
| ``deepspeed_moe.experts.deepspeed_experts.<e>.deltas.<m>.position_seed`` (sparse, same for all e) | ``experts.deltas.<m>.position_seed`` |
| ``deepspeed_moe.gate.wg.weight`` ``[E, D]`` | ``router.weight`` ``[E, D]`` |
| (none: the gate has no bias, ``moe/sharded_moe.py:541``) | ``router.bias`` ``[E]`` = 0, present when ``bias`` (megatron's router follows ``add_bias_linear``, ``transformer/moe/router.py:64``) |

megatron's linears also save a weightless ``_extra_state``; it is not produced
here (their load pre-hook fills it in, ``tensor_parallel/layers.py:1087``) and
ignored the other way. ``<e>`` is the GLOBAL expert index, as in a full state dict or a DeepSpeed
checkpoint directory (:func:`read_deepspeed_checkpoint`). The router weights map
one to one, but the routing does not: DeepSpeed's gate has a capacity (token
dropping), random token selection and, for top-2, a sampled second expert; pick
megatron router settings to match before comparing logits. Sparse positions are
re-derived from (seed, layer, expert, matrix): the megatron layer must have the
``layer_number`` of :class:`DeRSFFNConfig`.
"""

from __future__ import annotations

import glob
import os
import re

import torch

from ders_megatron.convert.deepspeed.ffn import DeRSFFNConfig
from ders_megatron.io.safe_load import load_file

DS_EXPERTS = "deepspeed_moe.experts.deepspeed_experts"
DS_GATE = "deepspeed_moe.gate.wg.weight"
DS_BASE = "ders_base"


def _delta_shapes(config: DeRSFFNConfig, out: int, inp: int) -> dict[str, tuple[int, ...]]:
    """One expert's delta parameters ``[1, ...]`` by name (``ders_megatron/core/deltas.py``)."""
    delta = config.delta
    if delta.kind == "lowrank":
        return {"lora_A": (1, delta.rank, inp), "lora_B": (1, out, delta.rank)}
    if delta.kind == "sparse":
        return {"values": (1, delta.kept(out, inp))}
    return {"weight": (1, out, inp)}


def _shared_keys(config: DeRSFFNConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """DeepSpeed key -> (megatron key, shape) of the tensors that are not per expert."""
    d, f, e = config.hidden_size, config.ffn_hidden_size, config.num_experts
    fc1_out = 2 * f if config.gated else f
    keys = {
        DS_GATE: ("router.weight", (e, d)),
        f"{DS_BASE}.linear_fc1.weight": ("experts.linear_fc1.weight", (fc1_out, d)),
        f"{DS_BASE}.linear_fc2.weight": ("experts.linear_fc2.weight", (d, f)),
    }
    if config.bias:
        keys[f"{DS_BASE}.linear_fc1.bias"] = ("experts.linear_fc1.bias", (fc1_out,))
        keys[f"{DS_BASE}.linear_fc2.bias"] = ("experts.linear_fc2.bias", (d,))
    return keys


def _take(state: dict, key: str, shape: tuple[int, ...], used: set) -> torch.Tensor:
    if key not in state:
        raise KeyError(f"missing {key!r}")
    tensor = state[key]
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    used.add(key)
    return tensor


def _check_all_used(state: dict, used: set, belongs) -> None:
    extra = sorted(k for k in state if belongs(k) and k not in used)
    if extra:
        raise ValueError(f"unexpected keys (another delta kind or layout?): {extra[:8]}")


def deepspeed_to_megatron(state: dict, config: DeRSFFNConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """One DeRS MoE layer: DeepSpeed keys under ``prefix`` (all E experts, global indices)
    -> megatron MoE-layer keys. Every key and shape is checked; nothing is left over."""
    used: set = set()
    out = {mc: _take(state, prefix + ds, shape, used).clone() for ds, (mc, shape) in _shared_keys(config).items()}
    for matrix, (o, i) in config.matrices().items():
        for name, shape in _delta_shapes(config, o, i).items():
            per_expert = [
                _take(state, f"{prefix}{DS_EXPERTS}.{e}.deltas.{matrix}.{name}", shape, used)
                for e in range(config.num_experts)
            ]
            out[f"experts.deltas.{matrix}.{name}"] = torch.cat(per_expert)  # [E, ...]
        if config.delta.kind == "sparse":
            seeds = [
                _take(state, f"{prefix}{DS_EXPERTS}.{e}.deltas.{matrix}.position_seed", (1,), used)
                for e in range(config.num_experts)
            ]
            if any(not torch.equal(s, seeds[0]) for s in seeds):
                raise ValueError(f"experts disagree on the {matrix} position seed; megatron stores one per layer")
            out[f"experts.deltas.{matrix}.position_seed"] = seeds[0].clone()
    if config.bias:
        out["router.bias"] = torch.zeros(config.num_experts, dtype=out["router.weight"].dtype)
    own = re.compile(re.escape(prefix) + r"(deepspeed_moe\.|" + DS_BASE + r"\.)")
    _check_all_used(state, used, own.match)
    return out


def megatron_to_deepspeed(state: dict, config: DeRSFFNConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of :func:`deepspeed_to_megatron` (megatron MoE-layer keys -> DeepSpeed keys
    under ``prefix``, global expert indices, per-expert tensors ``[1, ...]``)."""
    used: set = set()
    out = {prefix + ds: _take(state, mc, shape, used).clone() for ds, (mc, shape) in _shared_keys(config).items()}
    if config.bias and torch.count_nonzero(_take(state, "router.bias", (config.num_experts,), used)):
        raise ValueError("router.bias is not zero: DeepSpeed's gate has no bias to hold it")
    for matrix, (o, i) in config.matrices().items():
        for name, shape in _delta_shapes(config, o, i).items():
            stacked = _take(state, f"experts.deltas.{matrix}.{name}", (config.num_experts,) + shape[1:], used)
            for e in range(config.num_experts):
                out[f"{prefix}{DS_EXPERTS}.{e}.deltas.{matrix}.{name}"] = stacked[e : e + 1].clone()
        if config.delta.kind == "sparse":
            seed = _take(state, f"experts.deltas.{matrix}.position_seed", (1,), used)
            for e in range(config.num_experts):
                out[f"{prefix}{DS_EXPERTS}.{e}.deltas.{matrix}.position_seed"] = seed.clone()
    # ``*._extra_state`` holds no weights: None from megatron's local linears
    # (tensor_parallel/layers.py:1232), FP8 metadata from TE's.
    _check_all_used(
        state, used, lambda k: k.startswith(("experts.", "router.weight")) and not k.endswith("._extra_state")
    )
    return out


def local_expert_state(state: dict, prefix: str, ep_rank: int, num_local_experts: int) -> dict[str, torch.Tensor]:
    """A full (global-index) DeepSpeed state dict -> what ``DeRSMoE.load_state_dict`` takes on one
    EP rank: that rank's experts, renumbered locally (as ``engine.py:4211-4215`` does on load)."""
    pattern = re.compile(re.escape(f"{prefix}{DS_EXPERTS}.") + r"(\d+)\.(.*)")
    first = ep_rank * num_local_experts
    out = {}
    for key, tensor in state.items():
        if not key.startswith(prefix):
            continue
        match = pattern.match(key)
        if match is None:
            out[key[len(prefix):]] = tensor
        elif first <= int(match.group(1)) < first + num_local_experts:
            out[f"{DS_EXPERTS}.{int(match.group(1)) - first}.{match.group(2)}"] = tensor
    return out


def read_deepspeed_checkpoint(load_dir: str, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The model weights of a DeepSpeed ZeRO-0/1/2 checkpoint with native MoE layers, as ONE state
    dict with global expert indices: ``mp_rank_00_model_states.pt`` (everything but expert
    parameters) merged with every ``layer_<l>_expert_<g>_mp_rank_00_model_states.pt``
    (``engine.py:4368``). Tensor (model) parallel and ZeRO-3 checkpoints are not supported."""
    if tag is None:
        with open(os.path.join(load_dir, "latest")) as f:
            tag = f.read().strip()
    folder = os.path.join(load_dir, str(tag))
    main_file = os.path.join(folder, "mp_rank_00_model_states.pt")
    if not os.path.isfile(main_file):
        raise FileNotFoundError(f"{main_file} not found (ZeRO-3 and model-parallel checkpoints are not supported)")
    # Files are data: weights_only=True (io/safe_load.load_file). DeepSpeed 0.19's main file holds
    # the module's state dict, the ds_config as a plain dict, param shapes (OrderedDict of
    # torch.Size) and counters, all within weights_only; anything else is refused by name
    # (--trust-checkpoint / trust_checkpoints() for a full unpickle, as DeepSpeed's own loader does).
    state = dict(load_file(main_file, "DeepSpeed checkpoint file")["module"])
    for path in sorted(glob.glob(os.path.join(folder, "layer_*_expert_*_mp_rank_00_model_states.pt"))):
        state.update(load_file(path, "DeepSpeed checkpoint file"))
    return state
