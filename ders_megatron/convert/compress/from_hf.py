"""Compression straight from a Hugging Face MoE folder (issue 18 item 3).

``tools/compress.py --load HF_DIR`` takes a Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE
folder (any MoE family the importer reads) as it takes a vanilla megatron MoE checkpoint. Three streamed
passes, each holding about one layer (docs/benchmarks.md): the streamed import
(:func:`~ders_megatron.convert.hf.importer.import_hf`) into a temporary checkpoint
beside the output, :func:`~ders_megatron.convert.compress.pipeline.compress_checkpoint`
from it, and, with ``hf_output``, the export of the result in the compact ``ders``
format (:func:`~ders_megatron.convert.hf.exporter.export_hf`), the source's tokenizer
included. The DeRS checkpoint gets the source's tokenizer in ``<save>/hf/`` (its args'
``--tokenizer-model``), as an import does. The temporary checkpoint (the model's size
on disk) is removed at the end, whatever happens; each output appears only complete,
and ``--save`` only once the ``ders`` export (if asked) has succeeded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ders_megatron.convert.compress.pipeline import CompressConfig, CompressError, compress_checkpoint
from ders_megatron.convert.hf.exporter import export_hf
from ders_megatron.convert.hf.importer import HF_ASSETS, import_hf
from ders_megatron.io.checkpoint import TRACKER


def is_hf_folder(path) -> bool:
    """A Hugging Face model folder (config.json) rather than a megatron checkpoint (tracker)."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / TRACKER).exists()


def _check_outputs(outputs, force: bool) -> None:
    for flag, path in outputs:
        if path is not None and Path(path).exists() and not force:
            raise CompressError(f"{flag} {path} exists; pass --force to overwrite it")


def _move_into_place(built: Path, final: Path) -> None:
    """``built`` becomes ``final`` (an existing one, allowed by --force, replaced after)."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(built, final)
    shutil.rmtree(old, ignore_errors=True)


def compress_hf(hf_dir, out_root, cfg: CompressConfig, *, hf_output=None, force: bool = False,
                file_bytes: int | None = None, progress: bool = False) -> dict:
    """Compress the HF MoE folder ``hf_dir`` into a DeRS checkpoint at ``out_root`` and/or
    a ``ders`` HF folder at ``hf_output`` (at least one); returns the compression report."""
    if out_root is None and hf_output is None:
        raise CompressError("give --save (a DeRS megatron checkpoint), --hf-output (a ders HF folder), or both")
    _check_outputs((("--save", out_root), ("--hf-output", hf_output)), force)
    final = Path(out_root).resolve() if out_root is not None else None
    parent = final.parent if final is not None else Path(hf_output).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".ders-compress-hf-", dir=parent))
    try:
        assets = final / HF_ASSETS if final is not None else None
        imported = import_hf(hf_dir, work / "imported", progress=progress, assets_dir=assets)
        compressed = work / "compressed"
        report = compress_checkpoint(imported, compressed, cfg, file_bytes=file_bytes)
        if (imported / HF_ASSETS).is_dir():
            shutil.copytree(imported / HF_ASSETS, compressed / HF_ASSETS)
        if hf_output is not None:
            export_hf(compressed, hf_output, fmt="ders", force=force, progress=progress)
        if final is not None:
            _move_into_place(compressed, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report
