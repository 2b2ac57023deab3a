"""Test support for the HF conversions: tiny random HF models and tokenizer built
offline, and megatron bodies (picklable, top level) for the gloo rank pools."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 100  # deliberately not a multiple of 128: exercises Megatron's vocabulary padding
WORDS = [f"w{i}" for i in range(VOCAB - 4)]

TINY_DENSE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention: 2 query heads per group
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
TINY_FAMILIES = {
    "llama": dict(rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
    "mistral": dict(sliding_window=None, head_dim=24),  # head_dim != hidden / heads
    "qwen2": dict(tie_word_embeddings=True),  # q/k/v bias
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=80,
        mlp_only_layers=[1],  # a dense layer after a MoE layer
        norm_topk_prob=False,
    ),
    "qwen3": dict(head_dim=24, tie_word_embeddings=True),  # per-head QK-norm, head_dim != hidden / heads
    "qwen3_moe": dict(  # QK-norm, fine-grained experts, no shared expert
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        mlp_only_layers=[0],  # a dense layer before a MoE layer
        norm_topk_prob=True,
    ),
    "olmoe": dict(  # QK-norm over all heads at once, no shared expert, MoE in every layer
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,  # OLMoE's default: no top-k renormalization
    ),
}


def tiny_tokenizer():
    """A word-level fast tokenizer over ``WORDS`` (built offline, no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@torch.no_grad()
def tiny_hf_model(family: str, seed: int = 0, **overrides):
    """A tiny random HF model of ``family``; norms and biases randomized too, so every
    tensor of the key map matters to the logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        family, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        **{**TINY_DENSE, **TINY_FAMILIES[family], **overrides},
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    for name, param in model.named_parameters():
        if "norm" in name:
            param.normal_(1.0, 0.1)
        elif name.endswith("bias"):
            param.normal_(0.0, 0.1)
        elif ".gate.weight" in name or "shared_expert_gate" in name:
            param.normal_(0.0, 0.5)  # decisive routing: top-k far from ties
    return model


def save_tiny_hf(family: str, folder, tokenizer: bool = True, **overrides):
    """Save a tiny HF model (and tokenizer) to ``folder``; returns the model."""
    model = tiny_hf_model(family, **overrides)
    model.save_pretrained(folder)
    if tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return model


def hf_logits(folder_or_model, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = folder_or_model
    if isinstance(folder_or_model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(folder_or_model, attn_implementation="eager", **kwargs)
    with torch.no_grad():
        return model.eval()(tokens).logits


def tokens(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- #
# Megatron bodies for the rank pools
# --------------------------------------------------------------------------- #
def checkpoint_logits(root, token_ids: torch.Tensor, layout: dict | None = None) -> torch.Tensor:
    """Load a checkpoint into a model built from its args at ``layout``; full logits."""
    from megatron.core import parallel_state

    from ders_megatron.io.checkpoint import load_common, load_model
    from ders_megatron.convert.hf.megatron_model import gpt_from_args, megatron_logits
    from ders_megatron.testing.distributed import model_parallel

    args = load_common(root)["args"]
    with model_parallel(**(layout or {})):
        model = gpt_from_args(args)
        load_model(model, root)
        logits = megatron_logits(model, token_ids)
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

            logits = gather_from_tensor_model_parallel_region(logits)
    return logits[..., : args.vocab_size]


def import_then_logits(source, output, token_ids, **import_kwargs) -> torch.Tensor:
    from ders_megatron.convert.hf.importer import import_hf
    from ders_megatron.testing.distributed import model_parallel

    with model_parallel():
        import_hf(source, output, **import_kwargs)
    return checkpoint_logits(output, token_ids)


@torch.no_grad()
def perturb(model, seed: int = 1, scale: float = 0.05) -> None:
    """Non-zero deltas (LoRA B starts at zero; random quantized codes), norms, biases, a decisive router."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dtype == torch.uint8:  # packed quantized codes: any bytes are valid
            param.copy_(torch.randint(0, 256, param.shape, generator=gen, dtype=torch.uint8))
        elif not param.is_floating_point():  # explicit sparse indices keep their valid init
            continue
        elif ".deltas." in name or name.endswith("bias"):
            param.copy_(torch.randn(param.shape, generator=gen) * scale)
        elif "norm" in name:
            param.copy_(1 + torch.randn(param.shape, generator=gen) * 0.1)
        elif ".router." in name or "gate_weight" in name:
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def save_megatron(root, args, token_ids, layout: dict | None = None, seed: int = 1) -> torch.Tensor:
    """Build the model ``args`` describe, perturb it, save it at ``layout``; return the
    logits of the unsharded (world size 1) model, the reference every export must match.

    The sharded model gets the reference's weights sliced by rank, so the checkpoint
    is what a (TP, EP) run would have written for the same model.
    """
    from ders_megatron.io.checkpoint import save_model
    from ders_megatron.convert.hf.megatron_model import gpt_from_args, megatron_logits
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.sharding import full_tensors, load_full_tensors

    with model_parallel():
        model = gpt_from_args(args)
        perturb(model, seed)
        reference = megatron_logits(model, token_ids)[..., : args.vocab_size]
        weights = full_tensors(model)
    with model_parallel(**(layout or {})):
        model = gpt_from_args(args)
        load_full_tensors(model, weights)
        save_model(model, root, args=args)
    return reference
