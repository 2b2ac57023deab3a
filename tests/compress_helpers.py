"""Helpers shared by the upcycle / compress / analyze tests: tiny models built from
full Megatron args (what the tools read from checkpoints), layouts, logits."""

from __future__ import annotations

import contextlib
import copy
import io

VOCAB = 128
SEQ = 16


def tiny_args(extra: list[str] | None = None, **overrides):
    """Megatron's full, validated args Namespace for a tiny dense GPT (as a checkpoint holds).

    hidden 32, FFN 64 (SwiGLU), 2 layers, 4 heads, RMSNorm, RoPE, vocab 128, fp32.
    """
    from megatron.training.arguments import validate_args

    from ders_megatron.training.arguments import parse_ders_args

    argv = (
        "--cpu --num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 "
        f"--seq-length {SEQ} --max-position-embeddings {SEQ} --micro-batch-size 2 --global-batch-size 2 "
        "--swiglu --normalization RMSNorm --disable-bias-linear --position-embedding-type rope "
        f"--vocab-size {VOCAB} --tokenizer-type NullTokenizer --untie-embeddings-and-output-weights "
        "--attention-dropout 0 --hidden-dropout 0 --no-persist-layer-norm --init-method-std 0.05"
    ).split() + list(extra or [])
    with contextlib.redirect_stdout(io.StringIO()):
        args = parse_ders_args(argv, cuda_available=False)
        validate_args(args, {})
    args.padded_vocab_size = VOCAB
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def args_at(args, tp: int = 1, ep: int = 1, etp: int | None = None):
    """``args`` for building at a parallel layout (the model's sharding, not its shape)."""
    args = copy.copy(args)
    args.tensor_model_parallel_size = tp
    args.sequence_parallel = tp > 1
    args.expert_model_parallel_size = ep
    args.expert_tensor_parallel_size = etp if etp is not None else tp
    args.tensor_parallel_num_weight_shards = None  # re-derived from the sizes (model_parallel_config.py:28)
    args.expert_tensor_parallel_num_weight_shards = None
    return args


def build(args, layout: dict | None = None, ders="auto"):
    """The training script's model for ``args`` at ``layout`` (real tensors)."""
    from ders_megatron.io.streaming import build_model
    from ders_megatron.core.config import ders_config_from_args

    layout = layout or {}
    if ders == "auto":
        ders = ders_config_from_args(args)
    return build_model(args_at(args, **layout), ders, meta=False, use_te=False)


def batch(seed: int = 0, batch_size: int = 2, seq: int = SEQ):
    from ders_megatron.testing.models import tiny_batch

    return tiny_batch(batch_size=batch_size, seed=seed, seq=seq)


def full_logits(model, data):
    """Logits gathered over TP (vocab-parallel output layer), eval mode, no grad."""
    import torch
    from megatron.core import parallel_state
    from torch import distributed as dist

    model.eval()
    with torch.no_grad():
        logits = model(data["tokens"], data["position_ids"], None)
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(group.size())]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def save_dense(root, args, layout: dict | None = None, seed: int = 3):
    """Build the dense model of ``args`` at ``layout``, save it (release), return its logits."""
    from ders_megatron.io.checkpoint import save_model
    from ders_megatron.testing.distributed import model_parallel

    layout = layout or {}
    with model_parallel(**layout, seed=seed):
        model = build(args, layout, ders=None)
        save_model(model, root, args=args_at(args, **layout))
        return full_logits(model, batch())


def save_dense_with_biases(root, args, layout: dict | None = None, seed: int = 3):
    """:func:`save_dense` with non-zero biases (``args.add_bias_linear``): megatron initialises
    biases to zero, which would make copying them unobservable. Returns the logits."""
    import torch

    from ders_megatron.io.checkpoint import save_model
    from ders_megatron.testing.distributed import model_parallel

    layout = layout or {}
    with model_parallel(**layout, seed=seed):
        model = build(args, layout, ders=None)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        save_model(model, root, args=args_at(args, **layout))
        return full_logits(model, batch())


# --------------------------------------------------------------------------- #
# Real text and a tiny training loop
# --------------------------------------------------------------------------- #
KJV = __import__("pathlib").Path(__file__).parent / "data" / "kjv_genesis_1_8.txt"


def text_tokens():
    """Byte ids (all < 128: ASCII) of KJV Genesis 1-8 (public domain, Debian bible-kjv-text);
    a deterministic synthetic corpus if the file is missing. Returns (train, held-out)."""
    import torch

    if KJV.is_file():
        data = KJV.read_bytes()
    else:  # fallback: a Markov-ish word stream, deterministic
        gen = torch.Generator().manual_seed(0)
        words = [b"and", b"the", b"of", b"god", b"earth", b"light", b"water", b"day", b"said", b"was"]
        picks = torch.randint(0, len(words), (6000,), generator=gen).tolist()
        data = b" ".join(words[i] for i in picks)
    tokens = torch.tensor(list(data), dtype=torch.long)
    split = int(0.9 * tokens.numel())
    return tokens[:split], tokens[split:]


def train(model, tokens, steps: int, lr: float, seq: int, batch_size: int = 8, seed: int = 0) -> list[float]:
    """Plain Adam on random windows of ``tokens`` (world size 1, no megatron DDP needed)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, tokens.numel() - seq - 1, (batch_size,), generator=gen)
        rows = torch.stack([tokens[s : s + seq + 1] for s in starts.tolist()])
        positions = torch.arange(seq).expand(batch_size, seq)
        loss = model(rows[:, :-1], positions, None, labels=rows[:, 1:]).float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
