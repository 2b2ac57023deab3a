"""DeRS experts inside ``deepspeed.moe.layer.MoE``: placement, gradient routing, checkpoint names.

:class:`DeRSMoE` is DeepSpeed's own ``MoE`` (gate, dispatch, all-to-all, combine,
expert-parallel groups all DeepSpeed's, ``deepspeed/moe/layer.py:17``) whose
experts module is :class:`~ders_megatron.convert.deepspeed.ffn.DeRSLocalExperts`.

Placement (deepspeed 0.19.8):

| tensor | key inside the MoE layer | expert parallel | marked | gradient reduced over |
|---|---|---|---|---|
| base fc1 / fc2 (+ biases) | ``ders_base.linear_fc{1,2}.*`` | replicated on every rank | ``allreduce=True`` | the whole data-parallel group, EP ranks included (``engine.py:3877``, ZeRO ``dp_process_group``) |
| Δ of global expert ``g`` | ``deepspeed_moe.experts.deepspeed_experts.<i>.deltas.<m>.*`` (``i`` = local index) | only on EP rank ``g // num_local`` | ``allreduce=False``, ``group_name=ep_size_<N>`` | the expert-data-parallel group (``engine.py:3898``, ZeRO ``stage_1_and_2.py:880``) |
| gate | ``deepspeed_moe.gate.wg.weight`` | replicated | DeepSpeed's (unmarked) | data parallel |

Gradient scale: DeepSpeed divides every gradient, expert ones included, by the
data-parallel world size (``engine.py:3898-3900``, ``stage_1_and_2.py:1688``),
so a mean loss per rank gives the gradient of the mean over ranks for base and
deltas alike.

Checkpoints (``engine.save_checkpoint``/``load_checkpoint``, ``engine.py:5040``,
``:4133``): every key of a ``MoE`` module that contains "expert" (except the gate)
is an expert parameter. It must match ``.deepspeed_moe.experts.deepspeed_experts.<i>``
(``engine.py:5104-5120``: the local index is rewritten to the global one and each
expert gets its own ``layer_<l>_expert_<g>_mp_rank_00_model_states.pt``); the
other keys go to ``mp_rank_00_model_states.pt`` unless their FULL name contains
"expert" (``_get_non_moe_state_dict``, ``engine.py:5003``), in which case they
are saved nowhere and ``load_checkpoint`` fails on missing keys. Hence the base
is ``ders_base`` (no "expert"), and :func:`check_checkpoint_layout` rejects models
whose path to a DeRS MoE layer contains "expert".
"""

from __future__ import annotations

import re

import deepspeed.comm as ds_dist
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import is_moe_param
from deepspeed.utils import groups
from torch import nn

from ders_megatron.convert.deepspeed.ffn import DeRSFFNConfig, DeRSLocalExperts, SharedBase

EXPERT_PREFIX = "deepspeed_moe.experts.deepspeed_experts."  # engine.py:5104


class DeRSMoE(MoE):
    """``deepspeed.moe.layer.MoE`` with DeRS experts: one shared base + per-expert deltas.

    Routing arguments are DeepSpeed's (``moe/layer.py:38``). Not offered:
    ``use_residual`` (its dense MLP would be a second full FFN), ``use_tutel``,
    and expert tensor parallelism (the base would need TP sharding; see the
    megatron path for that).

    With ``ep_size > 1`` each rank builds only its own experts' deltas, so it must
    know its expert-parallel rank at construction: call ``deepspeed.init_distributed()``
    first. The groups are then created here with DeepSpeed's own call
    (``MoE._create_process_groups``, ``moe/layer.py:89``), which the engine would
    otherwise make in ``deepspeed.initialize`` (``engine.py:2150-2155``); pass the
    config's ``use_data_before_expert_parallel_`` as ``use_data_before_expert_parallel``.
    """

    def __init__(
        self,
        config: DeRSFFNConfig,
        *,
        ep_size: int = 1,
        k: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 4,
        noisy_gate_policy: str | None = None,
        drop_tokens: bool = True,
        use_rts: bool = True,
        top2_2nd_expert_sampling: bool = True,
        use_data_before_expert_parallel: bool = False,
    ):
        super().__init__(
            config.hidden_size,
            nn.Identity(),  # placeholder: DeepSpeed's Experts is replaced below
            num_experts=config.num_experts,
            ep_size=ep_size,
            k=k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            min_capacity=min_capacity,
            noisy_gate_policy=noisy_gate_policy,
            drop_tokens=drop_tokens,
            use_rts=use_rts,
            top2_2nd_expert_sampling=top2_2nd_expert_sampling,
        )
        self.config = config
        self.use_data_before_expert_parallel = use_data_before_expert_parallel
        self.ep_rank = self._expert_parallel_rank()
        first = self.ep_rank * self.num_local_experts
        self.ders_base = SharedBase(config)
        self.deepspeed_moe.experts = DeRSLocalExperts(
            config, self.ders_base, range(first, first + self.num_local_experts)
        )
        self._mark_parameters()

    def _expert_parallel_rank(self) -> int:
        if not ds_dist.is_initialized():
            if self.ep_size > 1:
                raise ValueError(
                    f"DeRSMoE(ep_size={self.ep_size}) builds only this rank's experts and needs the "
                    "expert-parallel rank: call deepspeed.init_distributed() before building the model"
                )
            return 0  # one process: the engine creates the groups later
        self._create_process_groups(use_data_before_expert_parallel_=self.use_data_before_expert_parallel)
        return groups._get_expert_parallel_rank(self.expert_group_name)

    def _mark_parameters(self) -> None:
        """As DeepSpeed marks expert parameters (``moe/experts.py:22-26``); ``is_moe_param``
        (``moe/utils.py:27``) then routes them to expert optimizer groups and reductions."""
        for param in self.ders_base.parameters():
            param.allreduce = True  # explicit: a shared (data-parallel) parameter
            param.requires_grad_(not self.config.freeze_base)
        for param in self.deepspeed_moe.experts.parameters():
            param.allreduce = False
            param.group_name = self.expert_group_name

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by ``deepspeed.initialize`` (``engine.py:2155``). The groups may already exist
        (built at construction): setting the gate's group twice trips
        ``sharded_moe.py:556``, and a different rank layout would misplace the experts."""
        if use_data_before_expert_parallel_ != self.use_data_before_expert_parallel:
            raise ValueError(
                "the DeepSpeed config's use_data_before_expert_parallel_ "
                f"({use_data_before_expert_parallel_}) differs from DeRSMoE(use_data_before_expert_parallel="
                f"{self.use_data_before_expert_parallel}) the experts were placed with"
            )
        if self.deepspeed_moe.ep_group is None:
            super().set_deepspeed_parallelism(use_data_before_expert_parallel_)
        if groups._get_expert_parallel_rank(self.expert_group_name) != self.ep_rank:
            raise RuntimeError("expert-parallel rank changed after the DeRS experts were placed")

    def local_expert(self, global_expert: int):
        """The :class:`ExpertDelta` of a global expert held on this rank."""
        return self.deepspeed_moe.experts.deepspeed_experts[global_expert - self.ep_rank * self.num_local_experts]


def check_checkpoint_layout(model: nn.Module) -> None:
    """Raise if DeepSpeed's MoE checkpoint code would misfile a DeRS parameter.

    Every DeRS MoE layer must sit at a path without "expert" (or its base is dropped
    from ``mp_rank_00_model_states.pt``, ``engine.py:5003``); its expert parameters
    must be exactly those under ``deepspeed_experts.<i>`` (``engine.py:5104``).
    """
    for path, module in model.named_modules():
        if not isinstance(module, DeRSMoE):
            continue
        if "expert" in path:
            raise ValueError(
                f"DeRS MoE layer at {path!r}: DeepSpeed treats every checkpoint key containing "
                "'expert' as an expert parameter, so the shared base would be left out of the "
                "checkpoint; rename the attributes on that path"
            )
        pattern = re.compile(re.escape(EXPERT_PREFIX) + r"\d+\.")
        for name, param in module.named_parameters():
            in_expert_files = "expert" in name and "moe.gate.wg.weight" not in name  # engine.py:5102
            if in_expert_files != bool(pattern.match(name)) or is_moe_param(param) != in_expert_files:
                raise ValueError(f"{path}.{name}: expert marking and checkpoint name disagree")
