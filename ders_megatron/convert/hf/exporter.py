"""megatron-core checkpoint -> Hugging Face folder, streamed layer by layer.

Formats (``--format``):

* ``mixtral`` / ``qwen2_moe``: plain transformers architectures, experts written
  with the classic per-expert keys; DeRS experts are synthesized as
  W_base + Δ_e (through :mod:`ders_megatron.core.deltas` itself). Qwen2-MoE expresses
  dense layers in between (``mlp_only_layers``) and the shared expert.
* ``ders``: the compact form, base + light deltas as stored (``model_type
  ders_moe``), loadable through the Auto classes once ``ders_megatron.convert.hf`` is
  imported, or with ``trust_remote_code=True`` from the modeling files copied
  into the output.
* ``llama`` / ``qwen2``: dense checkpoints (e.g. an import, after training).

Files are data both ways: the tokenizer and generation configs copied from the source
lose any ``auto_map`` / ``custom_pipelines`` (code the source pointed at,
:func:`~ders_megatron.convert.hf.hf_files.drop_remote_code`); config.json is written
here and names only our own ``ders`` modeling files (``--format ders``).

Router semantics: megatron's TopKRouter with softmax scoring takes the top-k
logits and softmaxes them (``transformer/moe/moe_utils.py:846-852``), which
equals softmax over all experts, top-k, renormalized (Mixtral,
``modeling_mixtral.py`` MixtralTopKRouter; Qwen2-MoE ``norm_topk_prob=True``):
exp(l_i) / Σ_topk exp(l_j) either way, and softmax is monotonic so the top-k
sets agree. ``--moe-router-pre-softmax`` (no renormalization) is Qwen2-MoE's
``norm_topk_prob=False``; anything else is refused (:mod:`ders_megatron.convert.hf.dims`).

Memory: one layer's megatron tensors (read as per-layer chunks,
:mod:`ders_megatron.io.reader`) and the HF tensors made from them, whatever
``--max-shard-size`` is: each HF tensor is spilled to disk as it is made and a shard
is written from the spill when it is full (:mod:`ders_megatron.io.safetensors_writer`;
disk: the open shard's spill besides the output, until the shard is written).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ders_megatron.io.checkpoint import CheckpointError, atomic_output_dir, check_finite
from ders_megatron.convert.hf.dims import EXPORT_FORMATS, ConversionError, ModelDims
from ders_megatron.convert.hf.hf_files import (
    TOKENIZER_FILES,
    ShardedSafetensorsWriter,
    copy_tokenizer,
    drop_remote_code,
    parse_size,
    warn_missing_tokenizer,
)
from ders_megatron.convert.hf.importer import HF_ASSETS
from ders_megatron.convert.hf.keymap import global_maps, hf_delta_specs, layer_maps
from ders_megatron.io.reader import CheckpointReader

REMOTE_CODE_FILES = ("configuration_ders_moe.py", "modeling_ders_moe.py")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _tokenizer_dir(checkpoint, tokenizer, args) -> Path | None:
    """``tokenizer`` if given, else ``<checkpoint>/hf/`` from our import, else the run's
    ``--tokenizer-model`` folder (HuggingFaceTokenizer), whichever holds a tokenizer."""
    candidates = [Path(tokenizer)] if tokenizer else [Path(checkpoint) / HF_ASSETS]
    if not tokenizer and getattr(args, "tokenizer_model", None):
        candidates.append(Path(args.tokenizer_model))
    for folder in candidates:
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    warn_missing_tokenizer(str(candidates[0]), stacklevel=4)  # point at export_hf's caller
    return None


def _token_ids(folder: Path | None) -> dict:
    """bos/eos/pad token ids from the folder's generation or model config."""
    ids = {}
    for name in ("config.json", "generation_config.json"):  # the generation config wins
        path = folder / name if folder else None
        if path and path.is_file():
            raw = json.loads(path.read_text())
            ids.update({k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if raw.get(k) is not None})
    return ids


class ZeroDeltaReader:
    """A reader whose DeRS deltas all read as zeros: the upcycled base, every expert = W_base
    (what a PEFT adapter is applied to, :mod:`ders_megatron.convert.hf.peft_adapter`)."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader

    def files_of(self, names):
        return self.reader.files_of(names)

    def read(self, names) -> dict:
        tensors = self.reader.read(names)
        return {n: torch.zeros_like(t) if ".deltas." in n and t.is_floating_point() else t for n, t in tensors.items()}


def _write(maps, reader, writer: ShardedSafetensorsWriter, dtype) -> None:
    """Each HF tensor of ``maps``, in the output dtype, checked for NaN/Inf as it is
    written (a source's bad value, or a value the dtype cannot hold: fp16 overflows
    at 65504), naming the megatron tensors and files it came from."""
    tensors = reader.read([name for entry in maps for name in entry.megatron])
    for entry in maps:
        for source in entry.megatron:  # first the sources: a merge (W_base + delta) would hide which
            check_finite(tensors[source], source, lambda: f"in {reader.files_of([source])}")
        for name, tensor in entry.to_hf(tensors).items():
            value = tensor.to(dtype) if tensor.is_floating_point() else tensor
            cast = "" if tensor.dtype == value.dtype else f", {tensor.dtype} written as {value.dtype}"
            check_finite(value, name, lambda: f"from {reader.files_of(entry.megatron)}{cast}")
            writer.add(name, value)


def export_hf(
    checkpoint,
    output,
    *,
    fmt: str,
    tokenizer=None,
    max_shard_size: str | int = "5GB",
    dtype: str | None = None,
    force: bool = False,
    progress: bool = True,
    zero_deltas: bool = False,
) -> Path:
    """Write the megatron checkpoint at ``checkpoint`` as an HF folder ``output`` in ``fmt``
    (``zero_deltas``: the upcycled base, every DeRS delta read as zero)."""
    if fmt not in EXPORT_FORMATS:
        raise ConversionError(f"unknown --format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    reader = CheckpointReader(checkpoint)
    dims = ModelDims.from_args(reader.args)
    dims.check_format(fmt)
    if zero_deltas and fmt == "ders":
        raise ConversionError("zero deltas in --format ders would be the base with empty deltas; use an MoE format")
    if Path(output).exists() and not force:
        raise CheckpointError(f"{output} exists; pass --force to overwrite it")
    out_dtype = DTYPES[dtype] if dtype else reader.metadata["embedding.word_embeddings.weight"].properties.dtype
    source = _tokenizer_dir(checkpoint, tokenizer, reader.args)
    token_ids = _token_ids(source)
    config = dims.hf_config(fmt, token_ids, dtype=str(out_dtype).removeprefix("torch."),
                            ders_matrices=hf_delta_specs(dims) if fmt == "ders" else None)
    if zero_deltas:
        reader = ZeroDeltaReader(reader)
    with atomic_output_dir(output, force=force) as tmp:
        writer = ShardedSafetensorsWriter(tmp, shard_bytes)
        _write(global_maps(dims), reader, writer, out_dtype)
        for i in tqdm(range(dims.num_layers), desc=f"export {fmt}", unit="layer", disable=not progress):
            _write(layer_maps(dims, fmt, i), reader, writer, out_dtype)
        writer.finish()
        config.save_pretrained(tmp)
        copied = copy_tokenizer(source, tmp) if source else []
        dropped = drop_remote_code(tmp, copied)
        if dropped:
            warnings.warn(f"left out the source's custom-code references {', '.join(dropped)}: an export "
                          "carries no code but our own ders modeling files", stacklevel=2)
        if "generation_config.json" not in copied:
            from transformers import GenerationConfig

            GenerationConfig(**token_ids).save_pretrained(tmp)
        if fmt == "ders":
            for name in REMOTE_CODE_FILES:
                shutil.copy2(Path(__file__).with_name(name), Path(tmp) / name)
    return Path(output)
