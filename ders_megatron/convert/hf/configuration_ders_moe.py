"""Configuration of the compact DeRS MoE format (``model_type = "ders_moe"``).

This file is copied next to every ``--format ders`` export, so that
``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` works without
ders-megatron installed: it must import nothing but transformers.

The model is the decoder of a transformers MoE family, ``base_model_type``
(``qwen2_moe``: attention with optional q/k/v bias; ``qwen3_moe``: per-head
QK-norm), built by transformers itself, whose MoE layers store one shared base FFN
plus a light delta per expert (DeRS, arXiv 2503.01359).

Each projection (gate_proj, up_proj, down_proj) has a delta kind,
``ders_matrices[proj]``:

* ``"lowrank:R"``: Δ_e = ders_scale · B_e A_e;
* ``"sparse:P"``: values at round((1 - P) · O · I) positions re-derived from a
  stored seed (``modeling_ders_moe.sample_unique``);
* ``"dense"``: a full Δ_e;
* ``"quant:K"``: K-bit codes packed in bytes with a scale (and, K >= 2, an
  offset) per group of ``ders_quant_group_size`` inputs (K = 1: sign · scale);
* ``"indexed:P"``: values at stored flat positions.

``ders_kind`` names the uniform kind (lowrank, sparse, dense: then
``ders_matrices`` follows from ``ders_rank`` / ``ders_drop_rate``) or "codec"
(compressed, per-matrix kinds).

Routing (Qwen2-MoE's router): softmax over all experts, top-k, renormalized when
``norm_topk_prob``; this equals megatron-core's TopKRouter (softmax over the top-k
logits) for ``norm_topk_prob=True`` and ``--moe-router-pre-softmax`` for False.
"""

from huggingface_hub.dataclasses import strict
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig

DERS_KINDS = ("lowrank", "sparse", "dense", "codec")
MATRIX_KINDS = ("lowrank", "sparse", "dense", "quant", "indexed")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SHARED_EXPERT_KINDS = ("none", "full", "ders")
BASE_MODEL_TYPES = ("qwen2_moe", "qwen3_moe", "olmoe")  # whose decoder modeling_ders_moe builds


@strict
class DeRSMoEConfig(Qwen2MoeConfig):
    r"""Qwen2-MoE's fields plus:

    head_dim (`int`, *optional*): attention head size (default hidden_size / heads).
    ders_kind (`str`): "lowrank", "sparse", "dense" or "codec" (per-matrix kinds).
    ders_rank (`int`): rank of uniform low-rank deltas.
    ders_scale (`float`): factor on B·A (alpha / rank, or 1).
    ders_drop_rate (`float`): uniform sparse deltas keep round((1 - p) · out · in) values per matrix.
    ders_matrices (`dict`, *optional*): delta kind per projection (see the module doc).
    ders_quant_group_size (`int`): inputs per quantization group (capped at the row length).
    shared_expert_kind (`str`): "none", "full" (a separate FFN, Qwen2-MoE's) or "ders"
        (extended DeRS: the experts' base plus its own delta).
    shared_expert_gate (`bool`): the shared expert's output is scaled by sigmoid(x · g).
    base_model_type (`str`): the transformers family whose decoder (attention, norms, RoPE,
        dense MLPs, router) the model is: "qwen2_moe", "qwen3_moe" or "olmoe".
    attention_bias (`bool`): Qwen3-MoE's and OLMoE's bias on q/k/v/o (always False in exports).
    clip_qkv (`float`, *optional*): OLMoE's clamp of q/k/v (always None in exports).
    """

    model_type = "ders_moe"
    attribute_map = {"num_local_experts": "num_experts"}  # OLMoE's decoder reads this name (OlmoeExperts)

    head_dim: int | None = None
    ders_kind: str = "lowrank"
    ders_rank: int = 4
    ders_scale: float = 1.0
    ders_drop_rate: float = 0.99
    ders_matrices: dict | None = None
    ders_quant_group_size: int = 128
    shared_expert_kind: str = "none"
    shared_expert_gate: bool = False
    base_model_type: str = "qwen2_moe"
    attention_bias: bool = False
    clip_qkv: float | None = None

    def __post_init__(self, **kwargs):
        if self.base_model_type not in BASE_MODEL_TYPES:
            raise ValueError(f"base_model_type must be one of {BASE_MODEL_TYPES}, got {self.base_model_type!r}")
        if self.ders_kind not in DERS_KINDS:
            raise ValueError(f"ders_kind must be one of {DERS_KINDS}, got {self.ders_kind!r}")
        if self.ders_matrices is None:
            if self.ders_kind == "codec":
                raise ValueError('ders_kind "codec" needs ders_matrices (a delta kind per projection)')
            spec = {"lowrank": f"lowrank:{self.ders_rank}", "sparse": f"sparse:{self.ders_drop_rate!r}"}
            self.ders_matrices = {p: spec.get(self.ders_kind, self.ders_kind) for p in PROJECTIONS}
        for proj in PROJECTIONS:
            kind = str(self.ders_matrices.get(proj, "")).split(":")[0]
            if kind not in MATRIX_KINDS:
                raise ValueError(f"ders_matrices[{proj!r}] must be one of {MATRIX_KINDS} (with its value), "
                                 f"got {self.ders_matrices.get(proj)!r}")
        if self.shared_expert_kind not in SHARED_EXPERT_KINDS:
            raise ValueError(
                f"shared_expert_kind must be one of {SHARED_EXPERT_KINDS}, got {self.shared_expert_kind!r}"
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)
        if self.base_model_type in ("qwen3_moe", "olmoe") and not self.use_sliding_window:
            # Qwen2MoeConfig writes 0 for "no window"; Qwen3-MoE's model reads None as "no window"
            # (modeling_qwen3_moe.py: create_causal_mask if sliding_window is None); OLMoE has none.
            self.sliding_window = None


__all__ = ["DeRSMoEConfig"]
