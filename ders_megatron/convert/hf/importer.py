"""Hugging Face -> megatron-core: Llama-family dense models, Mixtral / Qwen2-MoE as
megatron's own MoE (SequentialMLP experts).

The weights go through the one key map (:mod:`ders_megatron.convert.hf.keymap`) into a
1-rank GPTModel built from the same args the checkpoint stores, which is then
saved in megatron.training's layout. torch_dist checkpoints are layout-free, so
the result loads at any TP/EP/PP; only the vocabulary padding depends on the
target tensor-parallel size (``--make-vocab-size-divisible-by`` times TP, as
Megatron pads). Tokenizer files and the source config.json are copied to
``<output>/hf/`` (``--tokenizer-model`` for ``--tokenizer-type HuggingFaceTokenizer``).
The checkpoint's ``args`` are megatron.training's full Namespace, as Megatron-LM
saves it (:func:`~ders_megatron.convert.hf.megatron_model.checkpoint_args`), so
``tools/upcycle.py`` and ``--use-checkpoint-args`` read an import like any checkpoint.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ders_megatron.io.checkpoint import CheckpointError, atomic_output_dir, save_model
from ders_megatron.convert.hf.dims import IMPORT_FAMILIES, REFUSED_FAMILIES, ConversionError, ModelDims
from ders_megatron.convert.hf.hf_files import HFSource, copy_tokenizer, resolve_hf_dir, warn_missing_tokenizer
from ders_megatron.convert.hf.keymap import KeyMapError, all_maps, check_embedding_tie

HF_ASSETS = "hf"  # <checkpoint root>/hf/: tokenizer, generation config, source config


def read_hf_config(source):
    """The transformers config of ``source``; unknown architectures are refused first."""
    from transformers import AutoConfig

    path = Path(source)
    if not (path / "config.json").is_file():
        raise ConversionError(f"{path} is not a Hugging Face model folder (no config.json)")
    raw = json.loads((path / "config.json").read_text())
    model_type = raw.get("model_type")
    if model_type in REFUSED_FAMILIES:
        raise ConversionError(f"model_type {model_type!r} is not converted: {REFUSED_FAMILIES[model_type]}")
    if model_type not in IMPORT_FAMILIES:
        archs = ", ".join(raw.get("architectures") or []) or "no architectures listed"
        raise ConversionError(
            f"unsupported Hugging Face architecture: model_type {model_type!r} ({archs}); "
            f"import supports {', '.join(IMPORT_FAMILIES)}"
        )
    return AutoConfig.from_pretrained(path)


@torch.no_grad()
def load_hf_weights(model, source, dims: ModelDims, family: str) -> None:
    """Fill every parameter of a 1-rank GPTModel from the HF folder, through the key map."""
    hf = HFSource(source)
    check_embedding_tie(dims, hf)
    targets = {n: t for n, t in model.state_dict(keep_vars=True).items() if not n.endswith("_extra_state")}
    filled = set()
    for entry in all_maps(dims, family):
        for name, tensor in entry.from_hf({n: hf.get(n) for n in entry.hf}).items():
            if name not in targets:
                raise KeyMapError(f"the megatron model has no parameter {name} (key map and model disagree)")
            targets[name].copy_(tensor)
            filled.add(name)
    missing = sorted(set(targets) - filled)
    if missing:
        raise KeyMapError(f"no HF tensor maps to {missing[:5]}{'...' if len(missing) > 5 else ''}")
    ignorable = {"lm_head.weight"} if dims.tie_embeddings else set()  # a tied copy of the embedding
    unused = sorted(k for k in hf.keys() - hf.read_keys - ignorable if not k.endswith("rotary_emb.inv_freq"))
    if unused:
        warnings.warn(f"{len(unused)} HF tensors were not used: {unused[:5]}", stacklevel=2)


def import_hf(
    source,
    output,
    *,
    make_vocab_size_divisible_by: int = 128,
    tensor_parallel_size: int = 1,
    force: bool = False,
    transformer_impl: str | None = None,
) -> Path:
    """Convert the HF model folder ``source`` (or a repo id in the local HF cache) into a
    megatron checkpoint at ``output``.

    Returns the output root (tracker + ``release/`` + ``hf/``). Nothing is written
    unless the whole conversion succeeds. ``transformer_impl`` (default: this machine's,
    ``local`` without CUDA) is recorded in the args and decides the checkpoint's keys.
    """
    from ders_megatron.convert.hf.megatron_model import checkpoint_args, gpt_from_dims
    from ders_megatron.io.session import single_rank_megatron

    source = resolve_hf_dir(source)
    config = read_hf_config(source)
    dims = ModelDims.from_hf_config(
        config, divisible_by=make_vocab_size_divisible_by, tensor_parallel_size=tensor_parallel_size
    )
    if Path(output).exists() and not force:
        raise CheckpointError(f"{output} exists; pass --force to overwrite it")
    with single_rank_megatron():
        model = gpt_from_dims(dims)
        load_hf_weights(model, source, dims, config.model_type)
        with atomic_output_dir(output, force=force) as tmp:
            assets = Path(tmp) / HF_ASSETS
            copied = copy_tokenizer(source, assets)
            if not any(name != "generation_config.json" for name in copied):
                warn_missing_tokenizer(str(source))
            assets.mkdir(exist_ok=True)
            (assets / "config.json").write_text((Path(source) / "config.json").read_text())
            tokenizer_model = (Path(output).resolve() / HF_ASSETS) if len(copied) > 1 else None
            save_model(model, tmp, args=checkpoint_args(dims, tokenizer_model, transformer_impl))
    return Path(output)
