"""A megatron-core GPTModel from checkpoint args, so import, export and tests agree.

``gpt_from_args(args)`` builds the model a checkpoint's ``args`` describe
(:class:`~ders_megatron.convert.hf.dims.ModelDims` reads them), with this process's
parallel sizes (a single-process tool opens :func:`ders_megatron.io.session.single_rank_megatron`
first); :func:`greedy_generate` decodes through the model.

The training script builds its model from Megatron's full argument set; this is
the small subset the Llama-family conversions produce and need, on the local
(non-TE) backend, inference settings (no dropout, no fusions).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import warnings

import torch

from ders_megatron.convert.hf.dims import ModelDims
from ders_megatron.core.config import ders_config_from_args
from ders_megatron.layers.specs import gpt_block_spec
from ders_megatron.training.arguments import parse_ders_args


def transformer_config(dims: ModelDims, **overrides):
    """The TransformerConfig of ``dims`` with the current process's parallel sizes."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = parallel_state.get_tensor_model_parallel_world_size()
    settings = dict(
        num_layers=dims.num_layers,
        hidden_size=dims.hidden_size,
        ffn_hidden_size=dims.ffn_hidden_size,
        num_attention_heads=dims.num_attention_heads,
        num_query_groups=dims.num_query_groups,
        kv_channels=dims.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=dims.norm_epsilon,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=dims.qkv_bias,
        qk_layernorm=dims.qk_layernorm,
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
        sequence_parallel=tp > 1,
    )
    if dims.is_moe:
        settings.update(
            num_moe_experts=dims.num_experts,
            moe_router_topk=dims.topk,
            moe_ffn_hidden_size=dims.moe_ffn_hidden_size,
            moe_layer_freq=dims.moe_layer_freq,
            moe_shared_expert_intermediate_size=dims.shared_expert_size or None,
            moe_shared_expert_gate=dims.shared_expert_gate,
            moe_router_pre_softmax=dims.router_pre_softmax,
            moe_token_dispatcher_type="alltoall",
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=float(dims.extra.get("moe_aux_loss_coeff", 0.0) or 0.0),
            expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
            expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
        )
    settings.update(overrides)
    return TransformerConfig(**settings)


def ders_config(dims: ModelDims):
    """The DeRSConfig of ``dims`` (None for megatron's own experts). Tools build the
    drop-in path: the fused path keeps the same checkpoint keys."""
    return ders_config_from_args(dims.to_args())


def gpt_from_dims(dims: ModelDims, **config_overrides):
    """A GPTModel for ``dims`` on this process's pipeline stage."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(dims, **config_overrides)
    return GPTModel(
        config=config,
        transformer_layer_spec=gpt_block_spec(config, ders=ders_config(dims),
                                              qk_layernorm_width=dims.qk_layernorm_width),
        vocab_size=dims.padded_vocab_size,
        max_sequence_length=dims.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=dims.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=dims.rotary_base,
        rope_scaling=dims.rope_scaling_factor is not None,
        rope_scaling_factor=dims.rope_scaling_factor or 8.0,
    )


def gpt_from_args(args, **config_overrides):
    """A GPTModel as a checkpoint's ``args`` describe it."""
    return gpt_from_dims(ModelDims.from_args(args), **config_overrides)


def megatron_argv(dims: ModelDims, tokenizer_model=None) -> list[str]:
    """The pretraining flags that describe ``dims`` (Megatron's and ``--moe-ders*``)."""
    flags = (
        f"--num-layers {dims.num_layers} --hidden-size {dims.hidden_size} "
        f"--ffn-hidden-size {dims.ffn_hidden_size} --num-attention-heads {dims.num_attention_heads} "
        f"--kv-channels {dims.kv_channels} --max-position-embeddings {dims.max_position_embeddings} "
        f"--seq-length {min(dims.max_position_embeddings, 4096)} --micro-batch-size 1 "
        f"--position-embedding-type rope --rotary-base {int(dims.rotary_base)} --normalization RMSNorm "
        f"--norm-epsilon {dims.norm_epsilon!r} --swiglu --disable-bias-linear "
        f"--vocab-size {dims.vocab_size} --attention-dropout 0 --hidden-dropout 0"
    ).split()
    flags += ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer_model)] if (
        tokenizer_model) else ["--tokenizer-type", "NullTokenizer"]
    if dims.num_query_groups != dims.num_attention_heads:
        flags += ["--group-query-attention", "--num-query-groups", str(dims.num_query_groups)]
    if dims.rope_scaling_factor is not None:
        flags += ["--use-rope-scaling", "--rope-scaling-factor", repr(dims.rope_scaling_factor)]
    flags += ["--add-qkv-bias"] if dims.qkv_bias else []
    flags += ["--qk-layernorm"] if dims.qk_layernorm else []
    flags += ["--ders-qk-layernorm-width", dims.qk_layernorm_width] if dims.qk_layernorm_width != "head" else []
    flags += [] if dims.tie_embeddings else ["--untie-embeddings-and-output-weights"]
    if dims.is_moe:
        flags += (
            f"--num-experts {dims.num_experts} --moe-router-topk {dims.topk} "
            f"--moe-ffn-hidden-size {dims.moe_ffn_hidden_size} --moe-token-dispatcher-type alltoall "
            f"--moe-router-load-balancing-type aux_loss "
            f"--moe-aux-loss-coeff {float(dims.extra.get('moe_aux_loss_coeff') or 0.0)!r}"
        ).split()
        flags += ["--moe-layer-freq", str(dims.moe_layer_freq).replace(" ", "")]
        if dims.shared_expert_size:
            flags += ["--moe-shared-expert-intermediate-size", str(dims.shared_expert_size)]
            flags += ["--moe-shared-expert-gate"] if dims.shared_expert_gate else []
        flags += ["--moe-router-pre-softmax"] if dims.router_pre_softmax else []
    if dims.is_ders and dims.ders_kind != "codec":
        flags += ["--moe-ders", dims.ders_kind, "--moe-ders-seed", str(dims.ders_seed)]
        if dims.ders_kind == "lowrank":
            flags += ["--moe-ders-rank", str(dims.ders_rank)]
            flags += ["--moe-ders-alpha", repr(dims.ders_alpha)] if dims.ders_alpha is not None else []
        if dims.ders_kind == "sparse":
            flags += ["--moe-ders-drop-rate", repr(dims.ders_drop_rate)]
        flags += ["--moe-ders-shared-expert", dims.shared_expert_kind] if dims.shared_expert_size else []
    return flags


PRECISION_FLAGS = {torch.float32: [], torch.bfloat16: ["--bf16"], torch.float16: ["--fp16"]}


def checkpoint_args(dims: ModelDims, tokenizer_model=None, transformer_impl: str | None = None,
                    params_dtype=torch.float32) -> argparse.Namespace:
    """megatron.training's full, validated argument Namespace for ``dims``, as Megatron-LM
    saves it in checkpoints (what ``--use-checkpoint-args``, tools/upcycle.py and
    tools/compress.py read), with the converters' own fields on top (:meth:`ModelDims.to_args`).
    ``params_dtype`` is the weights' dtype, said as Megatron-LM says it (``--bf16``/``--fp16``,
    which ``validate_args`` turns into ``params_dtype``), so the tools keep it.

    Parsed with this machine's runtime (``--cpu`` without CUDA): it only decides
    settings such as ``transformer_impl``, not the model. ``transformer_impl`` overrides
    it: the checkpoint is keyed for the impl its args record (``io.checkpoint.save_model``).
    """
    from megatron.training.arguments import validate_args

    argv = megatron_argv(dims, tokenizer_model) + PRECISION_FLAGS[params_dtype]
    argv += [] if torch.cuda.is_available() else ["--cpu"]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        # validate_args prints every argument, and asks for a rank a converter may not have.
        warnings.filterwarnings("ignore", message="Could not determine rank")
        args = parse_ders_args(argv)
        validate_args(args, {})
    for name, value in vars(dims.to_args()).items():
        setattr(args, name, value)
    if transformer_impl is not None:
        args.transformer_impl = transformer_impl
    # A new run for --load: megatron.training reads these from checkpoint args
    # (training/checkpointing.py load_checkpoint, "consumed_train_samples").
    args.consumed_train_samples = args.skipped_train_samples = args.consumed_valid_samples = 0
    return args


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Logits [B, S, V] of a single-stage GPTModel for token ids [B, S] (padding rows cut)."""
    model.eval()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    logits = model(input_ids=tokens, position_ids=positions, attention_mask=None)
    return logits[..., :vocab_size] if vocab_size else logits


@torch.no_grad()
def greedy_generate(model, tokens: list[int], max_new_tokens: int, vocab_size: int, eos_token_id=None) -> list[int]:
    """Greedy decoding through a GPTModel (no KV cache: the whole prefix each step).

    ``vocab_size`` is the tokenizer's: Megatron's padded embedding rows have logits too
    and must never be chosen.
    """
    out = list(tokens)
    for _ in range(max_new_tokens):
        logits = megatron_logits(model, torch.tensor([out]), vocab_size)
        token = int(logits[0, -1].argmax())
        out.append(token)
        if eos_token_id is not None and token == eos_token_id:
            break
    return out[len(tokens):]
