"""Hugging Face model folders: lazy tensor reads, sharded safetensors writes, tokenizer files."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ders_megatron.convert.hf.dims import ConversionError
from ders_megatron.io.errors import first_line

# What AutoTokenizer / GenerationConfig read from a model folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
SAFETENSORS_INDEX = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.I)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '10KiB' or a byte count -> bytes (HF's convention: GB = 10**9)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    unit = match and match.group(2).upper()
    if not match or unit not in _UNITS:
        raise ConversionError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB or a byte count")
    return int(float(match.group(1)) * _UNITS[unit])


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, by its own rules (``HF_HUB_CACHE``, else ``$HF_HOME/hub``,
    else ``~/.cache/huggingface/hub``), read at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home) / "hub"


def resolve_hf_dir(value) -> Path:
    """``--hf-dir``: a model folder, or a repo id (``ORG/NAME``) already in the local Hugging
    Face cache (``models--ORG--NAME/snapshots/<rev>``, the revision ``refs/main`` names, else
    the only snapshot). Nothing is downloaded: a repo id not in the cache is an error."""
    path = Path(value)
    if path.is_dir() or not _REPO_ID.match(str(value)):
        return path
    repo = hub_cache_dir() / f"models--{str(value).replace('/', '--')}"
    snapshots = sorted(p for p in (repo / "snapshots").glob("*") if (p / "config.json").is_file())
    ref = repo / "refs" / "main"
    if ref.is_file() and (repo / "snapshots" / ref.read_text().strip() / "config.json").is_file():
        return repo / "snapshots" / ref.read_text().strip()
    if len(snapshots) == 1:
        return snapshots[0]
    if snapshots:
        raise ConversionError(f"--hf-dir {value}: the cache holds {len(snapshots)} snapshots and no refs/main; "
                              f"pass the folder of one of them ({repo / 'snapshots'})")
    raise ConversionError(f"--hf-dir {value}: not a folder, and not in the local Hugging Face cache ({repo}); "
                          "nothing is downloaded: fetch it first (e.g. `hf download " f"{value}`) or pass a folder")


class HFSource:
    """Tensors of an HF model folder by name, read one at a time (safetensors, or
    ``pytorch_model*.bin`` loaded with ``weights_only=True``)."""

    # transformers 5 keeps experts fused in memory ([E, 2I, H] gate_up, [E, H, I] down) and
    # accepts such files; classic per-expert names are served from them (gate first, then up:
    # modeling_mixtral.py MixtralExperts.forward, chunk(2)).
    _EXPERT = re.compile(r"(model\.layers\.\d+\.)(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight")
    _FUSED_PART = {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None),
                   "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)}

    def __init__(self, path):
        self.path = Path(path)
        self._files: dict[str, Path] = {}
        self._bin: dict[str, torch.Tensor] | None = None
        self.read_keys: set[str] = set()  # stored keys that served a request
        files = sorted(self.path.glob("*.safetensors"))
        for file in files:
            with _readable(file):
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        self._files[key] = file
        if not files:
            bins = sorted(self.path.glob("pytorch_model*.bin"))
            if not bins:
                raise ConversionError(f"{self.path} holds no *.safetensors or pytorch_model*.bin weights")
            self._bin = {}
            for file in bins:
                self._bin.update(torch.load(file, map_location="cpu", weights_only=True))

    def keys(self) -> set[str]:
        return set(self._bin) if self._bin is not None else set(self._files)

    def _raw(self, key: str) -> torch.Tensor | None:
        if key not in (self._bin if self._bin is not None else self._files):
            return None
        self.read_keys.add(key)
        if self._bin is not None:
            return self._bin[key]
        with _readable(self._files[key], key):
            with safe_open(str(self._files[key]), framework="pt") as f:
                return f.get_tensor(key)

    def get(self, name: str) -> torch.Tensor:
        tensor = self._raw(name)
        if tensor is None and (match := self._EXPERT.fullmatch(name)):
            tensor = self._fused_expert(*match.groups())
        if tensor is None and ".block_sparse_moe.gate." in name:
            tensor = self._raw(name.replace(".block_sparse_moe.", ".mlp."))
        if tensor is None:
            raise ConversionError(f"{self.path} has no tensor {name}")
        return tensor

    def _fused_expert(self, layer_prefix: str, expert: str, part: str) -> torch.Tensor | None:
        fused, half = self._FUSED_PART.get(part, (None, None))
        tensor = fused and self._raw(f"{layer_prefix}mlp.experts.{fused}")
        if tensor is None:
            return None
        tensor = tensor[int(expert)]
        return tensor if half is None else torch.chunk(tensor, 2, dim=0)[half].contiguous()


@contextlib.contextmanager
def _readable(file: Path, key: str | None = None):
    """safetensors' errors for a cut or garbled file (``SafetensorError: Error while
    deserializing header``, an ``OSError`` for a too-short mmap) as one line naming the file."""
    try:
        yield
    except Exception as err:
        if not (type(err).__name__ == "SafetensorError" or isinstance(err, (OSError, EOFError))):
            raise
        what = f" (reading {key})" if key else ""
        raise ConversionError(f"{file} is truncated or damaged{what}: {first_line(err)}; re-download it") from err


def copy_tokenizer(source, dest) -> list[str]:
    """Copy the tokenizer (and generation config) files of ``source`` into ``dest``."""
    source, dest = Path(source), Path(dest)
    copied = []
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (source / name).is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, dest / name)
            copied.append(name)
    return copied


# Keys through which a config names code to import from the model folder or the Hub
# (transformers' dynamic modules: trust_remote_code=True would run it).
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")


def drop_remote_code(folder, names) -> list[str]:
    """Remove :data:`REMOTE_CODE_KEYS` from the JSON files ``names`` in ``folder`` (the
    tokenizer and generation configs an export copied from its source): an export runs
    only our own ``ders`` modeling files, never code the source pointed at. Returns
    ``file:key`` for each removal."""
    removed = []
    for name in names:
        path = Path(folder) / name
        if path.suffix != ".json" or not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConversionError(f"{path} is not readable JSON ({err}); fix or leave out that tokenizer file") from None
        found = [key for key in REMOTE_CODE_KEYS if isinstance(data, dict) and key in data]
        if found:
            for key in found:
                del data[key]
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            removed += [f"{name}:{key}" for key in found]
    return removed


def warn_missing_tokenizer(where: str, stacklevel: int = 3) -> None:
    """Warn (not fail): weights and config are still a usable model folder."""
    warnings.warn(
        f"no tokenizer files found ({where}): the output has weights and config but no tokenizer; "
        "pass --tokenizer DIR (a folder with tokenizer.json or tokenizer.model) to include one",
        stacklevel=stacklevel,
    )


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #
class ShardedSafetensorsWriter:
    """Writes tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards of at most
    ``max_shard_bytes`` each (one ``model.safetensors`` if it all fits), with
    transformers' ``model.safetensors.index.json``. Tensors are flushed to disk as
    each shard fills, so memory holds at most one shard."""

    def __init__(self, folder, max_shard_bytes: int):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous().clone()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        if self._pending or not self._shards:
            self._flush()
        if len(self._shards) == 1:
            final = self.folder / "model.safetensors"
            self._shards[0][0].rename(final)
            return [final]
        count, weight_map, paths = len(self._shards), {}, []
        for n, (path, names) in enumerate(self._shards, start=1):
            final = self.folder / f"model-{n:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            paths.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return paths
