"""Hugging Face -> megatron-core: Llama-family dense models, Mixtral / Qwen2-MoE /
Qwen3-MoE / OLMoE as megatron's own MoE (SequentialMLP experts), streamed tensor by tensor.

The target model is planned on the ``meta`` device (:func:`ders_megatron.io.streaming.plan_model`:
every key, chunk and dtype ``--load`` will ask for, no memory), and the checkpoint is
written by :class:`~ders_megatron.io.streaming.LazyCheckpointWriter` in plan order, i.e.
layer by layer: each megatron parameter is computed from its HF tensors through the one
key map (:mod:`ders_megatron.convert.hf.keymap`, :meth:`KeyMap.from_hf`) when the writer
reaches it, and dropped before the next. Memory: the HF tensors of one parameter, the
parameter, and one output file bucket (:func:`file_bytes_for`), whatever the model's
size (figures: docs/benchmarks.md, "Import, export and upcycling memory").

Dtype: the source's (bf16 stays bf16) unless ``dtype`` says otherwise; the checkpoint's
args say it (``--bf16``/``--fp16``, ``params_dtype``) so that upcycling and compression
keep it. Megatron's loader casts to the model's dtype on ``--load``.

Before anything is written the source is checked against its config.json from the
safetensors headers alone (:func:`check_source`): every tensor the key map needs exists
in the shard the index names, with the shape the config implies and a floating-point
dtype (the config's, unless ``dtype`` is given); tied embeddings agree. Each tensor is
checked finite as it is read; any failure leaves nothing behind (the output is written
into a temporary sibling, :func:`~ders_megatron.io.checkpoint.atomic_output_dir`).

torch_dist checkpoints are layout-free, so the result loads at any TP/EP/PP; only the
vocabulary padding depends on the target tensor-parallel size
(``--make-vocab-size-divisible-by`` times TP, as Megatron pads). Tokenizer files and
the source config.json are copied to ``<output>/hf/`` (``--tokenizer-model`` for
``--tokenizer-type HuggingFaceTokenizer``). The checkpoint's ``args`` are
megatron.training's full Namespace, as Megatron-LM saves it
(:func:`~ders_megatron.convert.hf.megatron_model.checkpoint_args`), so
``tools/upcycle.py`` and ``--use-checkpoint-args`` read an import like any checkpoint.

:func:`load_hf_weights` is the in-memory reference path (a 1-rank model filled through
the same key map), kept for the tests that hold the streamed writer to it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ders_megatron.convert.hf.dims import IMPORT_FAMILIES, REFUSED_FAMILIES, ConversionError, ModelDims
from ders_megatron.convert.hf.hf_files import HFSource, copy_tokenizer, resolve_hf_dir, warn_missing_tokenizer
from ders_megatron.convert.hf.keymap import KeyMap, KeyMapError, all_maps, check_embedding_tie
from ders_megatron.io.checkpoint import CheckpointError, atomic_output_dir

HF_ASSETS = "hf"  # <checkpoint root>/hf/: tokenizer, generation config, source config
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)  # what the key map converts
MIN_FILE_BYTES = 64 * 2**20  # output files are at least this big (fewer files for small layers)


def read_hf_config(source):
    """The transformers config of ``source``; unknown architectures are refused first."""
    from transformers import AutoConfig

    path = Path(source)
    if not (path / "config.json").is_file():
        raise ConversionError(f"{path} is not a Hugging Face model folder (no config.json)")
    try:
        raw = json.loads((path / "config.json").read_text())
    except ValueError as err:
        raise ConversionError(f"{path / 'config.json'} is not valid JSON ({err}); re-download it") from None
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


# --------------------------------------------------------------------------- #
# Checks before writing (headers only)
# --------------------------------------------------------------------------- #
def config_dtype(config) -> torch.dtype | None:
    """The dtype config.json declares (``dtype``, formerly ``torch_dtype``), if a float one."""
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = DTYPES.get(declared.removeprefix("torch."))
    return declared if isinstance(declared, torch.dtype) and declared.is_floating_point else None


def check_source(hf: HFSource, maps: list[KeyMap], declared: torch.dtype | None, cast: bool) -> torch.dtype:
    """Every HF tensor the key map reads: present, floating point, of the config's shape and
    (unless ``cast``, i.e. ``--dtype`` given) of one dtype, the config's. Returns that dtype."""
    seen: dict[torch.dtype, str] = {}
    for entry in maps:
        for name, shape in zip(entry.hf, entry.hf_shapes):
            info = hf.describe(name)
            if not (isinstance(info.dtype, torch.dtype) and info.dtype.is_floating_point):
                raise ConversionError(f"{info.file}: tensor {name} is {info.dtype}, but model weights are "
                                      "floating point; the file does not hold this model's weights")
            if info.dtype not in WEIGHT_DTYPES:  # float8: a quantized checkpoint, scales kept apart
                raise ConversionError(f"{info.file}: tensor {name} is {info.dtype}, a quantized checkpoint; "
                                      "dequantize it to bf16/fp16/fp32 first")
            if info.shape != tuple(shape):
                raise KeyMapError(f"{info.file}: tensor {name} has shape {info.shape}, config.json implies "
                                  f"{tuple(shape)}; the config and the weights are of different models")
            seen.setdefault(info.dtype, f"{name} in {info.file.name}")
    if cast:
        return next(iter(seen))
    if declared is not None and set(seen) - {declared}:
        other = next(d for d in seen if d != declared)
        raise ConversionError(f"config.json declares dtype {str(declared).removeprefix('torch.')} but tensor "
                              f"{seen[other]} is {str(other).removeprefix('torch.')}; pass --dtype to convert "
                              "every tensor to one dtype")
    if len(seen) > 1:
        raise ConversionError(f"the weights mix dtypes ({', '.join(f'{v}: {k}' for k, v in seen.items())}); "
                              "pass --dtype to convert every tensor to one dtype")
    return next(iter(seen))


def warn_unused(hf: HFSource, dims: ModelDims, keys_read: set[str]) -> None:
    ignorable = {"lm_head.weight"} if dims.tie_embeddings else set()  # a tied copy of the embedding
    unused = sorted(k for k in hf.keys() - keys_read - ignorable if not k.endswith("rotary_emb.inv_freq"))
    if unused:
        warnings.warn(f"{len(unused)} HF tensors were not used: {unused[:5]}", stacklevel=3)


# --------------------------------------------------------------------------- #
# The reference: a whole model in memory
# --------------------------------------------------------------------------- #
@torch.no_grad()
def load_hf_weights(model, source, dims: ModelDims, family: str) -> None:
    """Fill every parameter of a 1-rank GPTModel from the HF folder, through the key map
    (the in-memory reference of the streamed import)."""
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
    warn_unused(hf, dims, hf.read_keys)


# --------------------------------------------------------------------------- #
# Streamed
# --------------------------------------------------------------------------- #
class HFValues:
    """Megatron parameter name -> its full world-size-1 value, computed from the HF tensors
    of its key-map entry when asked (:class:`~ders_megatron.io.streaming.LazyCheckpointWriter`
    asks once per parameter, in plan order)."""

    def __init__(self, hf: HFSource, maps: list[KeyMap], dtype: torch.dtype, progress=None):
        self.hf = hf
        self.dtype = dtype
        self.by_name = {name: entry for entry in maps for name in entry.megatron}
        self.progress = progress
        self._layer = None

    @torch.no_grad()
    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.by_name:
            raise KeyMapError(f"no HF tensor maps to the megatron parameter {name} (key map and model disagree)")
        self._advance(name)
        entry = self.by_name[name]
        value = entry.from_hf({n: self.hf.get(n) for n in entry.hf})[name]
        return value.to(self.dtype)

    def origin(self, name: str) -> str:
        """Where ``name``'s value came from (the writer's NaN/Inf message)."""
        entry = self.by_name[name]
        return ", ".join(f"{n} in {self.hf.describe(n).file}" for n in entry.hf)

    def _advance(self, name: str) -> None:
        layer = name.split(".")[2] if name.startswith("decoder.layers.") else None
        if self.progress is not None and layer is not None and layer != self._layer:
            self._layer = layer
            self.progress.update(1)


def plan_import(dims: ModelDims, dtype: torch.dtype):
    """The plan (keys, chunks, dtypes) of the model :func:`load_hf_weights` would fill, built
    on the meta device: the same spec and settings (:func:`gpt_from_dims`), so the same keys."""
    from ders_megatron.convert.hf.megatron_model import gpt_from_dims
    from ders_megatron.io.streaming import plan_model

    with torch.device("meta"):
        model = gpt_from_dims(dims, params_dtype=dtype, perform_initialization=False)
    return plan_model(model)


def file_bytes_for(plan) -> int:
    """Output files close at the size of the largest decoder layer (at least
    :data:`MIN_FILE_BYTES`): the writer holds a file's tensors until it closes
    (:mod:`ders_megatron.io.streaming`), so memory stays one layer's worth."""
    per_layer: dict[str, int] = {}
    for chunk in plan.chunks:
        parts = chunk.entry.split(".")
        layer = parts[2] if chunk.entry.startswith("decoder.layers.") else chunk.entry
        per_layer[layer] = per_layer.get(layer, 0) + chunk.nbytes
    return max([MIN_FILE_BYTES, *per_layer.values()])


def import_hf(
    source,
    output,
    *,
    make_vocab_size_divisible_by: int = 128,
    tensor_parallel_size: int = 1,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = False,
    assets_dir=None,
    transformer_impl: str | None = None,
) -> Path:
    """Convert the HF model folder ``source`` (or a repo id in the local HF cache) into a
    megatron checkpoint at ``output``. ``transformer_impl`` (default: this machine's,
    ``local`` without CUDA) is recorded in the args and decides the checkpoint's keys
    (:func:`ders_megatron.io.layout.plan_in_layout`).

    Returns the output root (tracker + ``release/`` + ``hf/``). Nothing is written
    unless the whole conversion succeeds. ``assets_dir``: where the args'
    ``--tokenizer-model`` points (default ``<output>/hf``), for a caller that moves the
    tokenizer files on with a derived checkpoint.
    """
    from ders_megatron.convert.hf.megatron_model import checkpoint_args
    from ders_megatron.io.layout import impl_of, plan_in_layout
    from ders_megatron.io.session import single_rank_megatron
    from ders_megatron.io.streaming import release_common, write_release

    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    source = resolve_hf_dir(source)
    config = read_hf_config(source)
    dims = ModelDims.from_hf_config(
        config, divisible_by=make_vocab_size_divisible_by, tensor_parallel_size=tensor_parallel_size
    )
    if Path(output).exists() and not force:
        raise CheckpointError(f"{output} exists; pass --force to overwrite it")
    hf = HFSource(source)
    maps = all_maps(dims, config.model_type)
    check_embedding_tie(dims, hf)
    source_dtype = check_source(hf, maps, config_dtype(config), cast=dtype is not None)
    out_dtype = DTYPES[dtype] if dtype else source_dtype
    with single_rank_megatron():
        with atomic_output_dir(output, force=force) as tmp, \
                tqdm(total=dims.num_layers, desc="import", unit="layer", disable=not progress) as bar:
            assets = Path(tmp) / HF_ASSETS
            copied = copy_tokenizer(source, assets)
            if not any(name != "generation_config.json" for name in copied):
                warn_missing_tokenizer(str(source))
            assets.mkdir(exist_ok=True)
            (assets / "config.json").write_text((Path(source) / "config.json").read_text())
            assets_at = Path(assets_dir).resolve() if assets_dir is not None else Path(output).resolve() / HF_ASSETS
            tokenizer_model = assets_at if len(copied) > 1 else None
            args = checkpoint_args(dims, tokenizer_model, transformer_impl, params_dtype=out_dtype)
            plan = plan_in_layout(plan_import(dims, out_dtype), impl_of(args))
            values = HFValues(hf, maps, out_dtype, progress=bar)
            write_release(tmp, plan, values, release_common(args), file_bytes=file_bytes_for(plan))
    warn_unused(hf, dims, hf.read_keys)
    return Path(output)
