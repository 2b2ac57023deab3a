"""DeRS experts for DeepSpeed-MoE (deepspeed 0.19.8): ``pip install ders-megatron[deepspeed]``.

* :mod:`.ffn` — the math (shared base, one-expert deltas, the experts module); no DeepSpeed import.
* :mod:`.layer` — :class:`DeRSMoE`, DeepSpeed's ``MoE`` with DeRS experts: placement table,
  gradient routing, checkpoint names (imports deepspeed).
* :mod:`.convert` — DeepSpeed <-> megatron-core key map for one MoE layer; reads a DeepSpeed
  checkpoint directory (torch only).

``DeRSMoE`` and ``check_checkpoint_layout`` are imported on first use, so the math and the
conversion work without deepspeed installed.
"""

from ders_megatron.convert.deepspeed.convert import (
    deepspeed_to_megatron,
    local_expert_state,
    megatron_to_deepspeed,
    read_deepspeed_checkpoint,
)
from ders_megatron.convert.deepspeed.ffn import DeRSFFNConfig, DeRSLocalExperts, ExpertDelta, SharedBase

__all__ = [
    "DeRSFFNConfig",
    "DeRSLocalExperts",
    "DeRSMoE",
    "ExpertDelta",
    "SharedBase",
    "check_checkpoint_layout",
    "deepspeed_to_megatron",
    "local_expert_state",
    "megatron_to_deepspeed",
    "read_deepspeed_checkpoint",
]


def __getattr__(name):
    if name in ("DeRSMoE", "check_checkpoint_layout"):
        from ders_megatron.convert.deepspeed import layer

        return getattr(layer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
