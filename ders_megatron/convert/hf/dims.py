"""What a converted model is, in one place: :class:`ModelDims`.

It is read from a Megatron checkpoint's ``args`` (Megatron dest names, as
megatron.training stores them) or from a Hugging Face config, and written back
as either. Every feature a side cannot express is rejected here, with a message
that names the flag or config field, before any tensor is touched.

Hugging Face families (:data:`IMPORT_FAMILIES`): Llama, Mistral, Qwen2 (q/k/v bias),
Qwen3 (per-head QK-norm), SmolLM2 (a Llama) for dense models; Mixtral (no shared
expert), Qwen2-MoE (one gated shared expert), Qwen3-MoE (fine-grained experts,
QK-norm) and OLMoE (QK-norm over all heads at once: ``--ders-qk-layernorm-width full``) for MoE; ``ders_moe`` is our compact DeRS format. Families that cannot be
converted faithfully are refused by name with the reason (:data:`REFUSED_FAMILIES`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, replace


from ders_megatron.core.config import (
    DEFAULTS,
    canonical_kind,
    ders_args,
    ders_config_from_args,
    qk_layernorm_width_of,
)

DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
IMPORT_FAMILIES = DENSE_FAMILIES + MOE_FAMILIES
EXPORT_FORMATS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "ders", "llama", "mistral", "qwen2", "qwen3")
DENSE_FORMATS = ("llama", "mistral", "qwen2", "qwen3")
QK_NORM_FORMATS = ("qwen3", "qwen3_moe")  # per-head q_norm / k_norm = megatron's --qk-layernorm
# q_norm over num_heads*head_dim, k_norm over num_kv_heads*head_dim (modeling_olmoe.py OlmoeAttention)
# = --qk-layernorm --ders-qk-layernorm-width full (layers/norms.py FullWidthQKNorm)
FULL_QK_NORM_FORMATS = ("olmoe",)
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "ders_moe": "DeRSMoEForCausalLM",
}
_MLA = ("multi-head latent attention (MLA): megatron-core 0.19.2 builds MLA only with Transformer Engine "
        "(transformer/multi_latent_attention.py:214 hands k_channels/v_channels to the core attention, which "
        "the local DotProductAttention does not take), so it cannot be built or checked here")
# model_type -> why it is not converted (named in the error).
REFUSED_FAMILIES = {
    "deepseek_v2": _MLA,
    "deepseek_v3": _MLA,
}
# Megatron's --use-rope-scaling is Llama 3.1's rule with these fixed parameters
# (models/common/embeddings/rotary_pos_embedding.py:92-99).
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


class ConversionError(ValueError):
    """The input cannot be converted as asked; the message says why and what to change."""


def _check(condition, message: str) -> None:
    if not condition:
        raise ConversionError(message)


def padded_vocab(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron's padding (``training/tokenizer/tokenizer.py:_vocab_size_with_padding``)."""
    _check(divisible_by >= 1 and tensor_parallel_size >= 1,
           "--make-vocab-size-divisible-by and --tensor-model-parallel-size must be >= 1")
    multiple = divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


@dataclass(frozen=True, kw_only=True)
class ModelDims:
    """A Llama-family decoder, dense or MoE (vanilla or DeRS), in Megatron's terms."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int  # the tokenizer's (HF) vocabulary
    padded_vocab_size: int  # Megatron's embedding rows (>= vocab_size)
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    rope_scaling_factor: float | None = None  # Llama 3.1 rule (--use-rope-scaling)
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_layernorm: bool = False  # RMSNorm on queries and keys (Qwen3's, OLMoE's q_norm / k_norm)
    qk_layernorm_width: str = DEFAULTS["qk_layernorm_width"]  # "head" (Qwen3) or "full" (OLMoE)
    # MoE (num_experts 0 = dense)
    num_experts: int = 0
    topk: int = 2
    moe_ffn_hidden_size: int = 0
    moe_pattern: tuple[int, ...] = ()  # 1 = MoE layer, per layer
    shared_expert_size: int = 0
    shared_expert_gate: bool = False
    router_pre_softmax: bool = False  # softmax over all experts, no renormalization
    # DeRS: the --moe-ders* values (core.config; "vanilla" = megatron's own SequentialMLP experts)
    ders_kind: str = DEFAULTS["kind"]
    ders_rank: int = DEFAULTS["rank"]
    ders_alpha: float | None = DEFAULTS["alpha"]
    ders_drop_rate: float = DEFAULTS["drop_rate"]
    ders_seed: int = DEFAULTS["seed"]
    ders_shared_expert: bool = False  # extended DeRS: shared expert = base + its own delta
    ders_codecs: str | None = None  # ders_kind "codec" (tools/compress.py): e.g. "fc1:quant:4,fc2:svd:8"
    ders_quant_group_size: int = DEFAULTS["quant_group_size"]
    extra: dict = field(default_factory=dict)  # router aux coefficient etc. for --finetune

    # ------------------------------------------------------------------ views
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, m in enumerate(self.moe_pattern) if m]

    @property
    def dense_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if not (self.moe_pattern and self.moe_pattern[i])]

    @property
    def moe_layer_freq(self) -> int | list[int]:
        """--moe-layer-freq as Megatron would be given it: an int when the pattern is one.

        It matters beyond style: with a list (or an int > 1) megatron-core saves
        per-layer checkpoint keys, with 1 layer-stacked ones
        (``transformer/transformer_block.py:736-740``), so a checkpoint loads only into
        a model built with the same form.
        """
        for freq in range(1, self.num_layers + 1):
            if list(self.moe_pattern) == [int(i % freq == 0) for i in range(self.num_layers)]:
                return freq
        return list(self.moe_pattern)

    @property
    def is_ders(self) -> bool:
        return self.ders_kind != "vanilla"

    @property
    def shared_expert_kind(self) -> str:
        if not self.shared_expert_size:
            return "none"
        return "ders" if self.ders_shared_expert else "full"

    @property
    def ders_scale(self) -> float:
        return 1.0 if self.ders_alpha is None else self.ders_alpha / self.ders_rank

    # ------------------------------------------------------- megatron args
    @classmethod
    def from_args(cls, args) -> "ModelDims":
        """From a checkpoint's ``args`` (ours or megatron.training's), rejecting what no
        HF format here can express."""
        get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        _check(get("position_embedding_type", "rope") == "rope", "only --position-embedding-type rope converts")
        _check(get("normalization", "RMSNorm") == "RMSNorm", "only --normalization RMSNorm converts")
        _check(get("swiglu", True), "only SwiGLU FFNs (--swiglu) convert to Llama-family formats")
        _check(not get("add_bias_linear", False), "--add-bias-linear has no Llama-family equivalent")
        _check(get("rotary_percent", 1.0) == 1.0, "--rotary-percent other than 1.0 has no HF equivalent here")
        _check(not get("rotary_interleaved", False), "--rotary-interleaved has no HF equivalent here")
        _check(not get("qk_l2_norm", False), "--qk-l2-norm has no HF equivalent here")
        _check(not get("multi_latent_attention", False), f"--multi-latent-attention: {_MLA}")
        _check(not get("apply_layernorm_1p", False), "--apply-layernorm-1p is not supported")
        _check(get("rotary_seq_len_interpolation_factor") in (None, 1),
               "--rotary-seq-len-interpolation-factor is not supported")
        hidden, heads = args.hidden_size, args.num_attention_heads
        groups = get("num_query_groups") if get("group_query_attention", False) else heads
        moe = cls._moe_from_args(args)
        padded = get("padded_vocab_size") or get("vocab_size")
        _check(padded, "the checkpoint args have neither padded_vocab_size nor vocab_size")
        return cls(
            num_layers=args.num_layers,
            hidden_size=hidden,
            ffn_hidden_size=args.ffn_hidden_size,
            num_attention_heads=heads,
            num_query_groups=groups or heads,
            kv_channels=get("kv_channels") or hidden // heads,
            vocab_size=get("vocab_size") or padded,
            padded_vocab_size=padded,
            max_position_embeddings=get("max_position_embeddings") or get("seq_length") or 4096,
            rotary_base=float(get("rotary_base", 10000)),
            rope_scaling_factor=get("rope_scaling_factor", 8.0) if get("use_rope_scaling", False) else None,
            # megatron.training stores --norm-epsilon as layernorm_epsilon (the TransformerConfig
            # field); only our converters' args add norm_epsilon.
            norm_epsilon=get("layernorm_epsilon") or get("norm_epsilon") or 1e-5,
            tie_embeddings=not get("untie_embeddings_and_output_weights", False),
            qkv_bias=bool(get("add_qkv_bias", False)),
            qk_layernorm=bool(get("qk_layernorm", False)),
            qk_layernorm_width=qk_layernorm_width_of(args),
            **moe,
        )

    @staticmethod
    def _moe_from_args(args) -> dict:
        get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        experts = get("num_experts") or 0
        kind = canonical_kind(get("moe_ders"))
        if not experts:
            _check(kind == "vanilla", "--moe-ders needs --num-experts")
            return {}
        _check(get("moe_router_score_function", "softmax") == "softmax",
               "--moe-router-score-function other than softmax has no HF equivalent")
        _check(get("moe_router_topk_scaling_factor") in (None, 1, 1.0),
               "--moe-router-topk-scaling-factor has no HF equivalent")
        _check(not get("moe_router_enable_expert_bias", False),
               "--moe-router-enable-expert-bias has no HF equivalent")
        _check(get("moe_router_num_groups") in (None, 0, 1), "group-limited routing has no HF equivalent")
        _check(not get("moe_apply_probs_on_input", False), "--moe-apply-probs-on-input has no HF equivalent")
        freq = get("moe_layer_freq", 1)
        layers = args.num_layers
        pattern = [1 if i % freq == 0 else 0 for i in range(layers)] if isinstance(freq, int) else list(freq)
        _check(len(pattern) == layers, f"--moe-layer-freq lists {len(pattern)} layers, --num-layers is {layers}")
        out = dict(
            num_experts=experts,
            topk=get("moe_router_topk", 2),
            moe_ffn_hidden_size=get("moe_ffn_hidden_size") or args.ffn_hidden_size,
            moe_pattern=tuple(pattern),
            shared_expert_size=get("moe_shared_expert_intermediate_size") or 0,
            shared_expert_gate=bool(get("moe_shared_expert_gate", False)),
            router_pre_softmax=bool(get("moe_router_pre_softmax", False)),
            ders_kind=kind,
            extra={"moe_aux_loss_coeff": get("moe_aux_loss_coeff", 0.0)},
        )
        if kind != "vanilla":
            ders = ders_config_from_args(args)  # the config's defaults and checks (names the flag)
            out.update(
                ders_rank=get("moe_ders_rank") or DEFAULTS["rank"],
                ders_alpha=get("moe_ders_alpha"),
                ders_drop_rate=ders.delta.drop_rate if kind == "sparse" else DEFAULTS["drop_rate"],
                ders_seed=ders.seed,
                ders_shared_expert=ders.extended_shared_expert,
                ders_codecs=get("moe_ders_codecs"),
                ders_quant_group_size=get("moe_ders_quant_group_size") or DEFAULTS["quant_group_size"],
            )
        return out

    def to_args(self) -> argparse.Namespace:
        """A checkpoint ``args`` with Megatron dest names (what ``--use-checkpoint-args`` reads)."""
        args = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            group_query_attention=self.num_query_groups != self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            max_position_embeddings=self.max_position_embeddings,
            seq_length=min(self.max_position_embeddings, 4096),
            position_embedding_type="rope",
            rotary_base=self.rotary_base,
            rotary_percent=1.0,
            use_rope_scaling=self.rope_scaling_factor is not None,
            rope_scaling_factor=self.rope_scaling_factor or 8.0,
            normalization="RMSNorm",
            norm_epsilon=self.norm_epsilon,
            swiglu=True,
            untie_embeddings_and_output_weights=not self.tie_embeddings,
            padded_vocab_size=self.padded_vocab_size,
            vocab_size=self.vocab_size,
            add_bias_linear=False,
            add_qkv_bias=self.qkv_bias,
            qk_layernorm=self.qk_layernorm,
            ders_qk_layernorm_width=self.qk_layernorm_width,
            num_experts=self.num_experts or None,
            moe_router_topk=self.topk,
            moe_ffn_hidden_size=self.moe_ffn_hidden_size or None,
            moe_layer_freq=self.moe_layer_freq if self.is_moe else 1,
            moe_shared_expert_intermediate_size=self.shared_expert_size or None,
            moe_shared_expert_gate=self.shared_expert_gate,
            moe_router_pre_softmax=self.router_pre_softmax,
            moe_router_score_function="softmax",
            **ders_args(
                self.ders_kind, rank=self.ders_rank, alpha=self.ders_alpha, drop_rate=self.ders_drop_rate,
                seed=self.ders_seed, impl=DEFAULTS["impl"], shared_expert=self.shared_expert_kind,
                codecs=self.ders_codecs, quant_group_size=self.ders_quant_group_size,
            ),
        )
        args.update(self.extra)
        return argparse.Namespace(**args)

    # ---------------------------------------------------------- HF configs
    @classmethod
    def from_hf_config(cls, config, *, divisible_by: int = 128, tensor_parallel_size: int = 1) -> "ModelDims":
        """From a transformers config of one of :data:`IMPORT_FAMILIES`."""
        family = config.model_type
        _check(family not in REFUSED_FAMILIES, f"model_type {family!r} is not converted: "
               f"{REFUSED_FAMILIES.get(family)}")
        _check(family in IMPORT_FAMILIES,
               f"unsupported Hugging Face architecture {family!r} "
               f"({', '.join(getattr(config, 'architectures', None) or [])}); "
               f"import supports model_type {', '.join(IMPORT_FAMILIES)}")
        _check(config.hidden_act == "silu", f"hidden_act {config.hidden_act!r}: only silu (SwiGLU) converts")
        heads = config.num_attention_heads
        dims = cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            ffn_hidden_size=config.intermediate_size,
            num_attention_heads=heads,
            num_query_groups=getattr(config, "num_key_value_heads", None) or heads,
            kv_channels=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=config.vocab_size,
            padded_vocab_size=padded_vocab(config.vocab_size, divisible_by, tensor_parallel_size),
            max_position_embeddings=config.max_position_embeddings,
            norm_epsilon=config.rms_norm_eps,
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=_hf_qkv_bias(config),
            qk_layernorm=family in QK_NORM_FORMATS + FULL_QK_NORM_FORMATS,
            qk_layernorm_width="full" if family in FULL_QK_NORM_FORMATS else "head",
            **_hf_rope(config),
            **_hf_moe(config),
        )
        _check_sliding_window(config)
        if family in FULL_QK_NORM_FORMATS:
            _check_olmoe(config, dims)
        return dims

    def check_format(self, fmt: str) -> None:
        """Reject, naming ``fmt``, what the export format cannot express."""
        _check(fmt in EXPORT_FORMATS, f"unknown --format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
        full = self.qk_layernorm and self.qk_layernorm_width == "full"
        if full:
            _check(fmt in FULL_QK_NORM_FORMATS + ("ders",), f"--format {fmt} has no QK-norm over all heads and "
                   "this checkpoint has --ders-qk-layernorm-width full; use --format olmoe or ders")
        elif self.qk_layernorm:
            _check(fmt in QK_NORM_FORMATS + ("ders",), f"--format {fmt} has no per-head QK-norm and this "
                   "checkpoint has --qk-layernorm; use --format qwen3 (dense), qwen3_moe or ders")
        else:
            _check(fmt not in QK_NORM_FORMATS + FULL_QK_NORM_FORMATS, f"--format {fmt} always normalizes "
                   "queries and keys and this checkpoint has no --qk-layernorm; use --format llama or qwen2 "
                   "(dense), mixtral or qwen2_moe")
        if fmt in DENSE_FORMATS:
            _check(not self.is_moe, f"--format {fmt} is for dense models; this checkpoint has MoE layers "
                   "(use mixtral, qwen2_moe, qwen3_moe or ders)")
            _check(fmt == "qwen2" or not self.qkv_bias,
                   f"--format {fmt} cannot hold q/k/v biases without an o_proj bias; use --format qwen2")
            return
        _check(self.is_moe, f"--format {fmt} needs a MoE checkpoint, but this one has no MoE layers "
               "(--num-experts unset); use --format llama, qwen2 or qwen3")
        if fmt == "olmoe" or (fmt == "ders" and full):
            self._check_olmoe_layout(fmt)
        if fmt == "mixtral":
            _check(not self.shared_expert_size, "--format mixtral has no shared expert; use --format qwen2_moe "
                   "(or ders)")
            _check(all(self.moe_pattern), "--format mixtral has MoE in every layer, but --moe-layer-freq puts "
                   f"dense layers at {self.dense_layers}; use --format qwen2_moe (mlp_only_layers) or ders")
            _check(not self.router_pre_softmax, "--format mixtral renormalizes the top-k probabilities; "
                   "--moe-router-pre-softmax does not (use --format qwen2_moe: norm_topk_prob=False)")
            _check(not self.qkv_bias, "--format mixtral has no q/k/v bias (--add-qkv-bias); use qwen2_moe")
        if fmt == "qwen3_moe":
            _check(not self.shared_expert_size, "--format qwen3_moe has no shared expert "
                   "(--moe-shared-expert-intermediate-size); use --format ders")
            _check(not self.qkv_bias, "--format qwen3_moe has no q/k/v bias without an o_proj bias "
                   "(--add-qkv-bias)")
        if fmt == "qwen2_moe":
            _check(self.shared_expert_size, "--format qwen2_moe always has a shared expert and this checkpoint "
                   "has none (--moe-shared-expert-intermediate-size); use --format mixtral or ders")
        if fmt == "ders":
            _check(self.is_ders, "--format ders needs a DeRS checkpoint (--moe-ders lowrank|sparse|dense); "
                   "this one has megatron's own experts: use mixtral, qwen2_moe or qwen3_moe")
            _check(not (self.qk_layernorm and self.qkv_bias), "--format ders builds Qwen3-MoE's decoder for "
                   "--qk-layernorm, which has no q/k/v bias without an o_proj bias (--add-qkv-bias)")

    def _check_olmoe_layout(self, fmt: str) -> None:
        """OLMoE's decoder: MoE in every layer, no shared expert, no q/k/v bias, head_dim =
        hidden / heads (its q_norm spans hidden_size, modeling_olmoe.py OlmoeAttention)."""
        what = "--format olmoe" if fmt == "olmoe" else "--format ders with --ders-qk-layernorm-width full (OLMoE's decoder)"
        _check(not self.shared_expert_size, f"{what} has no shared expert (--moe-shared-expert-intermediate-size)")
        _check(all(self.moe_pattern), f"{what} has MoE in every layer, but --moe-layer-freq puts dense layers at "
               f"{self.dense_layers}")
        _check(not self.qkv_bias, f"{what} has no q/k/v bias without an o_proj bias (--add-qkv-bias)")
        _check(self.kv_channels * self.num_attention_heads == self.hidden_size,
               f"{what} needs --kv-channels ({self.kv_channels}) = --hidden-size / --num-attention-heads "
               f"({self.hidden_size // self.num_attention_heads}): its q_norm spans hidden_size")

    def hf_config(self, fmt: str, token_ids: dict | None = None, dtype: str = "float32",
                  ders_matrices: dict[str, str] | None = None):
        """The transformers config of export format ``fmt`` (``check_format`` first)."""
        import transformers

        self.check_format(fmt)
        common = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups,
            head_dim=self.kv_channels,
            hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.norm_epsilon,
            tie_word_embeddings=self.tie_embeddings,
            rope_parameters=self._rope_parameters(),
            architectures=[ARCHITECTURES["ders_moe" if fmt == "ders" else fmt]],
            dtype=dtype,
            **(token_ids or {}),
        )
        if fmt == "llama":
            return transformers.LlamaConfig(intermediate_size=self.ffn_hidden_size, attention_bias=False,
                                            mlp_bias=False, **common)
        if fmt == "mistral":  # full attention: megatron has no sliding window
            return transformers.MistralConfig(intermediate_size=self.ffn_hidden_size, sliding_window=None, **common)
        if fmt == "qwen2":
            return transformers.Qwen2Config(intermediate_size=self.ffn_hidden_size, **common)
        if fmt == "qwen3":
            return transformers.Qwen3Config(intermediate_size=self.ffn_hidden_size, attention_bias=False,
                                            use_sliding_window=False, **common)
        moe = dict(num_experts_per_tok=self.topk)
        if fmt == "olmoe":
            common.pop("head_dim")  # OLMoE's is hidden / heads (checked)
            return transformers.OlmoeConfig(intermediate_size=self.moe_ffn_hidden_size, num_experts=self.num_experts,
                                            norm_topk_prob=not self.router_pre_softmax, attention_bias=False,
                                            clip_qkv=None, **moe, **common)
        if fmt == "mixtral":
            return transformers.MixtralConfig(intermediate_size=self.moe_ffn_hidden_size,
                                              num_local_experts=self.num_experts, sliding_window=None,
                                              **moe, **common)
        qwen = dict(
            intermediate_size=self.ffn_hidden_size,
            moe_intermediate_size=self.moe_ffn_hidden_size,
            shared_expert_intermediate_size=self.shared_expert_size,
            num_experts=self.num_experts,
            norm_topk_prob=not self.router_pre_softmax,
            decoder_sparse_step=1,
            mlp_only_layers=self.dense_layers,
            qkv_bias=self.qkv_bias,
            **moe,
        )
        if fmt == "qwen2_moe":
            return transformers.Qwen2MoeConfig(**qwen, **common)
        if fmt == "qwen3_moe":
            qwen3 = {k: v for k, v in qwen.items() if k not in ("shared_expert_intermediate_size", "qkv_bias")}
            return transformers.Qwen3MoeConfig(attention_bias=False, use_sliding_window=False, **qwen3, **common)
        from ders_megatron.convert.hf.configuration_ders_moe import DeRSMoEConfig

        if ders_matrices is None:
            raise ConversionError("--format ders needs the per-projection delta kinds (keymap.hf_delta_specs)")
        return DeRSMoEConfig(
            ders_kind=self.ders_kind,
            ders_matrices=ders_matrices,
            ders_scale=self.ders_scale,
            ders_quant_group_size=self.ders_quant_group_size,
            shared_expert_kind=self.shared_expert_kind,
            shared_expert_gate=self.shared_expert_gate,
            base_model_type=self._ders_base_model_type(),
            auto_map={
                "AutoConfig": "configuration_ders_moe.DeRSMoEConfig",
                "AutoModelForCausalLM": "modeling_ders_moe.DeRSMoEForCausalLM",
            },
            **qwen,
            **common,
        )

    def _ders_base_model_type(self) -> str:
        """The transformers family whose decoder the ``ders`` format builds."""
        if not self.qk_layernorm:
            return "qwen2_moe"
        return "olmoe" if self.qk_layernorm_width == "full" else "qwen3_moe"

    def _rope_parameters(self) -> dict:
        if self.rope_scaling_factor is None:
            return {"rope_type": "default", "rope_theta": self.rotary_base}
        return {"rope_type": "llama3", "rope_theta": self.rotary_base, "factor": self.rope_scaling_factor,
                **MEGATRON_LLAMA3_ROPE}

    def replace(self, **changes) -> "ModelDims":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- #
# HF config readers, one concern each.
# --------------------------------------------------------------------------- #
def _hf_qkv_bias(config) -> bool:
    family = config.model_type
    if family == "qwen2":
        return True  # Qwen2Attention: bias=True on q/k/v, none on o (modeling_qwen2.py:181-184)
    if family == "qwen2_moe":
        return bool(config.qkv_bias)  # modeling_qwen2_moe.py:222-225
    if family in QK_NORM_FORMATS + FULL_QK_NORM_FORMATS:
        _check(not config.attention_bias, f"{family} attention_bias=True also biases o_proj, which Megatron's "
               "--add-qkv-bias does not")
    if family == "llama":
        _check(not config.attention_bias,
               "Llama attention_bias=True also biases o_proj, which Megatron's --add-qkv-bias does not")
        _check(not config.mlp_bias, "Llama mlp_bias=True (--add-bias-linear) is not supported")
    return False  # Mistral, Mixtral: no attention bias


def _hf_rope(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return {"rotary_base": float(theta)}
    if kind == "llama3":
        given = {k: float(rope.get(k, -1)) for k in MEGATRON_LLAMA3_ROPE}
        _check(given == MEGATRON_LLAMA3_ROPE,
               f"llama3 RoPE scaling with {given}: Megatron's --use-rope-scaling fixes {MEGATRON_LLAMA3_ROPE}")
        return {"rotary_base": float(theta), "rope_scaling_factor": float(rope["factor"])}
    raise ConversionError(f"RoPE type {kind!r} is not supported (only default and llama3)")


def _hf_moe(config) -> dict:
    family = config.model_type
    if family == "mixtral":
        return dict(
            num_experts=config.num_local_experts,
            topk=config.num_experts_per_tok,
            moe_ffn_hidden_size=config.intermediate_size,
            moe_pattern=(1,) * config.num_hidden_layers,
            extra={"moe_aux_loss_coeff": config.router_aux_loss_coef},
        )
    if family in ("qwen2_moe", "qwen3_moe"):
        pattern = tuple(
            int(
                i not in config.mlp_only_layers
                and config.num_experts > 0
                and (i + 1) % config.decoder_sparse_step == 0
            )
            for i in range(config.num_hidden_layers)
        )  # Qwen2MoeDecoderLayer.__init__ (modeling_qwen2_moe.py:358), Qwen3MoeDecoderLayer (:310)
        common = dict(
            num_experts=config.num_experts,
            topk=config.num_experts_per_tok,
            moe_ffn_hidden_size=config.moe_intermediate_size,
            moe_pattern=pattern,
            # norm_topk_prob=False: softmax over all experts, top-k, no renormalization
            # = megatron's --moe-router-pre-softmax (transformer/moe/moe_utils.py:840-845).
            router_pre_softmax=not config.norm_topk_prob,
            extra={"moe_aux_loss_coeff": config.router_aux_loss_coef},
        )
        if family == "qwen3_moe":
            return common  # no shared expert (modeling_qwen3_moe.py Qwen3MoeSparseMoeBlock)
        shared = config.shared_expert_intermediate_size
        _check(shared > 0, "Qwen2-MoE with shared_expert_intermediate_size=0 is not supported")
        return dict(
            common,
            shared_expert_size=shared,
            shared_expert_gate=True,  # sigmoid(shared_expert_gate(x)) (modeling_qwen2_moe.py:347)
        )
    if family == "olmoe":
        return dict(
            num_experts=config.num_experts,
            topk=config.num_experts_per_tok,
            moe_ffn_hidden_size=config.intermediate_size,  # OlmoeExperts: intermediate_size per expert
            moe_pattern=(1,) * config.num_hidden_layers,  # OlmoeDecoderLayer: a MoE block in every layer
            # norm_topk_prob=False (OLMoE's default): softmax over all experts, top-k, no
            # renormalization (OlmoeTopKRouter) = --moe-router-pre-softmax (moe_utils.py:840-845).
            router_pre_softmax=not config.norm_topk_prob,
            extra={"moe_aux_loss_coeff": config.router_aux_loss_coef},
        )  # no shared expert (OlmoeSparseMoeBlock: gate and experts only)
    return {}


def _check_olmoe(config, dims: "ModelDims") -> None:
    """What OLMoE's attention does that megatron's does not: ``clip_qkv`` clamps q, k and v
    after the projection (OlmoeAttention.forward); and its q_norm spans ``hidden_size``, so
    a ``head_dim`` other than hidden / heads is not a working OLMoE."""
    _check(config.clip_qkv is None, f"olmoe clip_qkv={config.clip_qkv}: megatron's attention does not clamp "
           "q/k/v; only clip_qkv null converts")
    _check(dims.kv_channels * dims.num_attention_heads == dims.hidden_size,
           f"olmoe head_dim={dims.kv_channels} with hidden_size={dims.hidden_size} and "
           f"num_attention_heads={dims.num_attention_heads}: OLMoE's q_norm spans hidden_size, so head_dim must be "
           "hidden_size / num_attention_heads")


def _check_sliding_window(config) -> None:
    window = getattr(config, "sliding_window", None)
    if config.model_type in ("qwen2", "qwen3", "qwen3_moe"):
        _check(not config.use_sliding_window, f"{config.model_type} use_sliding_window=True (sliding-window "
               "attention) is not supported by Megatron's local attention")
        layer_types = set(getattr(config, "layer_types", None) or ())
        _check(layer_types <= {"full_attention"}, f"{config.model_type} layer_types {sorted(layer_types)}: "
               "sliding-window layers are not supported by Megatron's local attention")
        return
    if config.model_type in ("mistral", "mixtral") and window and window < config.max_position_embeddings:
        # Megatron's local attention is full causal: identical up to `window` tokens, wrong beyond.
        raise ConversionError(
            f"{config.model_type} sliding_window={window} < max_position_embeddings="
            f"{config.max_position_embeddings}: Megatron runs full causal attention; set sliding_window to null "
            f"in config.json to convert anyway (identical for sequences up to {window} tokens)"
        )
