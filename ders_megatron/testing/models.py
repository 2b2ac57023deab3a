"""Tiny megatron-core GPT models and batches for tests and examples."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

VOCAB = 128
SEQ = 16


def tiny_config(**overrides) -> TransformerConfig:
    """A 2-layer MoE GPT config sized for fast CPU tests, parallel sizes from parallel_state."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    defaults = dict(
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=64,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        normalization="RMSNorm",
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
        sequence_parallel=tp > 1,
    )
    defaults.update(overrides)
    if defaults["num_moe_experts"] is None:  # the dense model: no MoE settings allowed
        defaults = {k: v for k, v in defaults.items() if not k.startswith("moe_")}
    return TransformerConfig(**defaults)


def build_gpt(config: TransformerConfig, ders=None, pre_process=None, post_process=None, vp_stage=None):
    """A megatron-core GPTModel whose MoE layers are vanilla (``ders=None``) or DeRS."""
    from ders_megatron.layers.specs import gpt_block_spec

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return GPTModel(
        config=config,
        transformer_layer_spec=gpt_block_spec(config, ders=ders, vp_stage=vp_stage),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=pre_process,
        post_process=post_process,
        position_embedding_type="rope",
        vp_stage=vp_stage,
    )


def tiny_batch(batch_size: int = 2, seed: int = 0, seq: int = SEQ):
    """Token ids, labels and position ids, identical on every rank for a seed."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch_size, seq + 1), generator=gen)
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(seq).unsqueeze(0).expand(batch_size, seq).contiguous(),
    }


def lm_loss(model, batch) -> torch.Tensor:
    """Mean token loss of a (single-stage) GPTModel on a batch."""
    per_token = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=None,
        labels=batch["labels"],
    )
    return per_token.float().mean()
