"""The study's units of work, each through the project's own tools as functions.

* :func:`pretrain_dense`: Setting A's dense GPT, from scratch, saved as a Megatron
  checkpoint (``io.checkpoint.save_model``).
* :func:`upcycle`: ``convert.upcycle.upcycle_checkpoint`` (= ``tools/upcycle.py``).
* :func:`train_and_score`: a checkpoint trained on (``trainer.train``) and scored on the
  whole held-out split (``trainer.window_losses``).
* :func:`compression_sweep`: ``convert.compress.compress_checkpoint`` (=
  ``tools/compress.py``, dense base) per codec, each result scored; plus the base-only
  control (every routed expert reset to its upcycled start, i.e. every delta dropped).
* :func:`redundancy`: paper Fig. 1 in float64, from the trained and the upcycled
  checkpoints.

Every model is built from its checkpoint's args by ``gpt_from_args`` (the exporter's
builder) in this process, at world size 1.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from ders_megatron.core.config import DEFAULTS
from ders_megatron.pipeline.replicate.plan import Layout, TinyGPT, Variant
from ders_megatron.pipeline.replicate.trainer import Schedule, train, window_losses


# --------------------------------------------------------------------------- #
# Models and checkpoints
# --------------------------------------------------------------------------- #
def tiny_gpt_args(spec: TinyGPT, max_positions: int):
    """Megatron's validated args for Setting A's dense model (as convert_hf import writes)."""
    from ders_megatron.convert.hf.dims import ModelDims
    from ders_megatron.convert.hf.megatron_model import checkpoint_args

    heads = spec.num_attention_heads
    dims = ModelDims(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=heads, num_query_groups=heads, kv_channels=spec.hidden_size // heads,
        vocab_size=spec.vocab_size, padded_vocab_size=-(-spec.vocab_size // 128) * 128,
        max_position_embeddings=max_positions, tie_embeddings=True,
    )
    return checkpoint_args(dims)


def build(args, aux_loss_coeff: float | None = None):
    from ders_megatron.convert.hf.megatron_model import gpt_from_args

    overrides = {"moe_aux_loss_coeff": aux_loss_coeff} if getattr(args, "num_experts", None) and aux_loss_coeff else {}
    return gpt_from_args(args, **overrides)


def load(root: Path, aux_loss_coeff: float | None = None):
    """(model, args) of a checkpoint."""
    from ders_megatron.io.checkpoint import load_common, load_model

    args = load_common(root)["args"]
    model = build(args, aux_loss_coeff)
    load_model(model, root)
    return model, args


def save(model, args, root: Path) -> None:
    """The model's weights as a complete checkpoint directory (atomic)."""
    from ders_megatron.io.atomic import atomic_output_dir
    from ders_megatron.io.checkpoint import save_model

    with atomic_output_dir(root, force=True) as tmp:
        save_model(model, tmp, args)


def parameter_counts(model) -> dict:
    params = list(model.parameters())
    return {"params": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


def freeze_base(model) -> int:
    """Paper Table 5: the shared base of every DeRS expert layer is not trained. Returns
    how many parameters were frozen."""
    from ders_megatron.layers.experts import DeRSExperts

    frozen = 0
    for module in model.modules():
        if isinstance(module, DeRSExperts):
            for param in list(module.linear_fc1.parameters()) + list(module.linear_fc2.parameters()):
                param.requires_grad_(False)
                frozen += param.numel()
    if not frozen:
        raise ValueError("freeze_base: the model has no DeRS expert layer")
    return frozen


# --------------------------------------------------------------------------- #
# Steps
# --------------------------------------------------------------------------- #
def pretrain_dense(spec: TinyGPT, tokens_N, schedule: Schedule, seed: int, out: Path, progress=None) -> dict:
    args = tiny_gpt_args(spec, schedule.seq_length)
    torch.manual_seed(seed)  # the initial weights (use_cpu_initialization draws from the default generator)
    model = build(args)
    result = train(model, tokens_N, schedule, seed, progress)
    save(model, args, out)
    return {**result, **parameter_counts(model)}


def upcycle(dense_root: Path, out: Path, layout: Layout, variant: Variant, seed: int) -> dict:
    from ders_megatron.convert.upcycle import UpcycleConfig, upcycle_checkpoint

    shared = "none" if not layout.shared_expert else ("full" if variant.kind == "vanilla" else "ders")
    cfg = UpcycleConfig(
        kind=variant.kind, num_experts=layout.num_experts, topk=layout.topk, moe_layer_freq=layout.moe_layer_freq,
        rank=variant.rank or 4, drop_rate=variant.drop_rate or 0.99, seed=seed, shared_expert=shared,
        renormalize_topk=layout.topk > 1, freeze_base=variant.freeze_base,
    )
    return upcycle_checkpoint(dense_root, out, cfg, force=True)


def train_and_score(start: Path, tokens_N, heldout_N, schedule: Schedule, seed: int, *, frozen: bool,
                    save_to: Path | None, losses_to: Path, progress=None) -> dict:
    """Train the checkpoint at ``start``; held-out window losses to ``losses_to`` (.pt)."""
    model, args = load(start, schedule.aux_loss_coeff)
    counts_start = parameter_counts(model)
    if frozen:
        freeze_base(model)
    result = train(model, tokens_N, schedule, seed, progress)
    losses_W = window_losses(model, heldout_N, schedule.seq_length)
    _save_tensor(losses_W, losses_to)
    if save_to is not None:
        save(model, args, save_to)
    return {**result, "params": counts_start["params"], "trainable": parameter_counts(model)["trainable"],
            "heldout_loss": float(losses_W.mean()), "windows": len(losses_W)}


def quant_group_size(root: Path, largest: int = DEFAULTS["quant_group_size"]) -> int:
    """The quantization group: the largest power of two <= ``largest`` (the default, 128) that
    divides every expert matrix's input features (hidden and FFN widths): 128 for Setting A
    (128 / 512), 64 for SmolLM2 (576 / 1536), which 128 does not divide."""
    from ders_megatron.io.checkpoint import stored_args

    args = stored_args(root)
    widths = [args.hidden_size, getattr(args, "moe_ffn_hidden_size", None) or args.ffn_hidden_size]
    group = largest
    while group > 1 and any(w % group for w in widths):
        group //= 2
    return group


def compression_sweep(trained: Path, dense: Path, upcycled: Path, codecs, heldout_N, seq_length: int,
                      scratch: Path, out: Path, seed: int) -> dict:
    """Held-out window losses of each compressed model and of the base-only control."""
    from ders_megatron.convert.compress.pipeline import CompressConfig, compress_checkpoint
    from ders_megatron.pipeline.evaluate import checkpoint_size

    results = {"none": {**checkpoint_size(trained), "file": None}}
    group_size = quant_group_size(trained)
    for codec in codecs:
        target = scratch / codec.replace(":", "-")
        # The base is known here (this study upcycled the model from ``dense``): no guard against a
        # wrong --dense; how far the experts moved is what the redundancy step reports.
        cfg = CompressConfig(codecs=codec, base="dense", dense_root=str(dense), seed=seed, shared_expert="full",
                             max_delta_norm=math.inf, group_size=group_size)
        compress_checkpoint(trained, target, cfg, force=True)
        model, _ = load(target)
        results[codec] = _score(model, heldout_N, seq_length, out / f"{codec.replace(':', '-')}.pt")
        results[codec].update(checkpoint_size(target))
        shutil.rmtree(target)
    model = base_only(trained, upcycled)
    results["base-only"] = _score(model, heldout_N, seq_length, out / "base-only.pt")
    return results


def base_only(trained: Path, upcycled: Path):
    """The trained MoE with every routed expert reset to its upcycled start (W_e = base)."""
    start, _ = load(upcycled)
    model, _ = load(trained)
    initial = dict(start.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mlp.experts." in name:
                param.copy_(initial[name])
    return model


def _score(model, heldout_N, seq_length: int, path: Path) -> dict:
    losses_W = window_losses(model, heldout_N, seq_length)
    _save_tensor(losses_W, path)
    return {"heldout_loss": float(losses_W.mean()), "file": str(path)}


def _save_tensor(tensor, path: Path) -> None:
    from ders_megatron.pipeline.replicate.data import save_atomic

    save_atomic(lambda tmp: torch.save(tensor, tmp), path)


# --------------------------------------------------------------------------- #
# Redundancy (paper Fig. 1)
# --------------------------------------------------------------------------- #
EXPERT_MATRICES = {"fc1": "mlp.experts.experts.linear_fc1.weight", "fc2": "mlp.experts.experts.linear_fc2.weight"}


def redundancy(trained: Path, upcycled: Path) -> dict:
    """Per MoE layer and matrix, in float64: cos(W_e, W_start) (W_start: the dense FFN the
    expert was copied from), ‖Δ_e‖/‖W_start‖ and cos(Δ_i, Δ_j) of every expert pair."""
    from ders_megatron.convert.compress.pipeline import LayerSource
    from ders_megatron.convert.analyze import moe_layers

    now, then = LayerSource(trained), LayerSource(upcycled)
    table: dict = {"layers": moe_layers(now.shapes), "matrices": {}}
    for layer in table["layers"]:
        for matrix, suffix in EXPERT_MATRICES.items():
            w_EX = now.read(layer, suffix).double().flatten(1)  # [experts, rows * cols]
            w0_EX = then.read(layer, suffix).double().flatten(1)
            delta_EX = w_EX - w0_EX
            unit_EX = delta_EX / delta_EX.norm(dim=1, keepdim=True).clamp_min(1e-300)
            table["matrices"].setdefault(matrix, []).append({
                "cos_to_start": torch.nn.functional.cosine_similarity(w_EX, w0_EX, dim=1).tolist(),
                "relative_delta": (delta_EX.norm(dim=1) / w0_EX.norm(dim=1)).tolist(),
                "delta_cos": (unit_EX @ unit_EX.T).tolist(),
            })
    return table
