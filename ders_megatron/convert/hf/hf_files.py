"""Hugging Face model folders: lazy tensor reads, sharded safetensors writes, tokenizer files."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ders_megatron.convert.hf.dims import ConversionError
from ders_megatron.io.errors import first_line
from ders_megatron.io.safetensors_writer import SafetensorsFileWriter

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


# safetensors header dtype names -> torch dtypes (the float ones a weight may have, and the
# others so that a wrong file is named by what it holds).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_FINITE_BLOCK = 1 << 24  # elements per isfinite pass: bounds the check's bool temporary at 16 MiB


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's shape and dtype as its file's header says, before any data is read."""

    shape: tuple[int, ...]
    dtype: torch.dtype | str  # the header's name where torch has no such dtype
    file: Path


def _open_safetensors(file: Path):
    """``safe_open`` with a damaged file named: safetensors checks that the header covers the
    file exactly, so a cut download fails here (``SafetensorError: Error while deserializing
    header``, or an ``OSError`` for a too-short mmap) as one line naming the file."""
    try:
        return safe_open(str(file), framework="pt")
    except Exception as err:
        raise _damaged(file, err) from err


def _damaged(file: Path, err: Exception, key: str | None = None) -> Exception:
    """The one-line error for a cut or garbled safetensors file (other errors as they are)."""
    if not (type(err).__name__ == "SafetensorError" or isinstance(err, (OSError, EOFError))):
        return err
    what = f" (reading {key})" if key else ""
    return ConversionError(f"{file} is truncated or damaged{what}: {first_line(err)}; re-download it")


def check_finite(tensor: torch.Tensor, name: str, file) -> None:
    """Refuse a tensor holding NaN or Inf, in blocks (no full-size bool temporary)."""
    if not tensor.is_floating_point():
        return
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), _FINITE_BLOCK):
        block = flat[start:start + _FINITE_BLOCK]
        if not bool(torch.isfinite(block).all()):
            bad = start + int((~torch.isfinite(block)).nonzero()[0, 0])
            raise ConversionError(f"{file}: tensor {name} holds NaN or Inf (first at flat index {bad}); "
                                  "the weights are damaged, re-download or re-save them")


def load_bin(file: Path) -> dict[str, torch.Tensor]:
    """A ``pytorch_model*.bin`` as data (``weights_only=True``), memory-mapped (``mmap=True``):
    its tensors are views of the file, read from disk only when a conversion touches them and
    dropped by the OS under pressure, so a .bin source streams like safetensors. A file in
    torch's legacy (pre-zip) format cannot be mapped and is loaded whole, with a warning."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise ConversionError(f"{file} is not a loadable PyTorch weights file ({first_line(err)}); "
                                  "re-download it") from None
    warnings.warn(f"{file} is in torch's legacy format, which cannot be memory-mapped: loading it whole "
                  "(convert the folder to safetensors to stream it)")
    return torch.load(file, map_location="cpu", weights_only=True)


class HFSource:
    """Tensors of an HF model folder by name, read one at a time and checked finite
    (safetensors, sharded with ``model.safetensors.index.json`` or not; or
    ``pytorch_model*.bin``, memory-mapped: :func:`load_bin`)."""

    # transformers 5 keeps experts fused in memory ([E, 2I, H] gate_up, [E, H, I] down) and
    # accepts such files; classic per-expert names are served from them (gate first, then up:
    # modeling_mixtral.py MixtralExperts.forward, chunk(2)).
    _EXPERT = re.compile(r"(model\.layers\.\d+\.)(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight")
    _FUSED_PART = {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None),
                   "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)}

    def __init__(self, path):
        self.path = Path(path)
        self._files: dict[str, Path] = {}
        self._info: dict[str, TensorInfo] = {}
        self._bin: dict[str, torch.Tensor] | None = None
        self._weight_map: dict[str, str] = {}  # the index's, when the folder has one
        self.read_keys: set[str] = set()  # stored keys that served a request
        files = self._safetensors_files()
        for file in files:
            with _open_safetensors(file) as f:
                for key in f.keys():
                    part = f.get_slice(key)
                    dtype = SAFETENSORS_DTYPES.get(part.get_dtype(), part.get_dtype())
                    self._files[key] = file
                    self._info[key] = TensorInfo(tuple(part.get_shape()), dtype, file)
        if not files:
            bins = sorted(self.path.glob("pytorch_model*.bin"))
            if not bins:
                raise ConversionError(f"{self.path} holds no *.safetensors or pytorch_model*.bin weights")
            self._bin = {}
            for file in bins:
                loaded = load_bin(file)
                self._bin.update(loaded)
                self._info.update({k: TensorInfo(tuple(t.shape), t.dtype, file) for k, t in loaded.items()})
        self._check_index()

    def _safetensors_files(self) -> list[Path]:
        """The shards the index names (each must exist), or every ``*.safetensors`` here."""
        index = self.path / SAFETENSORS_INDEX
        if not index.is_file():
            return sorted(self.path.glob("*.safetensors"))
        try:
            self._weight_map = dict(json.loads(index.read_text())["weight_map"])
        except (ValueError, KeyError, TypeError) as err:
            raise ConversionError(f"{index} is not a safetensors index ({err}); re-download it") from None
        shards = sorted(set(self._weight_map.values()))
        missing = [name for name in shards if not (self.path / name).is_file()]
        if missing:
            count = sum(1 for v in self._weight_map.values() if v == missing[0])
            raise ConversionError(f"{index} maps {count} tensors to {missing[0]}, which is missing from "
                                  f"{self.path}{f' (and {len(missing) - 1} more shards)' if len(missing) > 1 else ''}"
                                  "; re-download it")
        return [self.path / name for name in shards]

    def _check_index(self) -> None:
        """Every tensor the index lists is in the shard it names."""
        for key, name in self._weight_map.items():
            if self._files.get(key) != self.path / name:
                raise ConversionError(f"{self.path / SAFETENSORS_INDEX} puts {key} in {name}, which does not "
                                      "hold it; re-download the shards")

    def keys(self) -> set[str]:
        return set(self._info)

    def _raw(self, key: str, expert: int | None = None) -> torch.Tensor:
        """Stored tensor ``key`` (only its ``expert``-th entry of the leading axis if given)."""
        self.read_keys.add(key)
        if self._bin is not None:
            tensor = self._bin[key] if expert is None else self._bin[key][expert]
        else:
            with _open_safetensors(self._files[key]) as f:
                try:
                    tensor = f.get_tensor(key) if expert is None else f.get_slice(key)[expert]
                except Exception as err:
                    raise _damaged(self._files[key], err, key) from err
        check_finite(tensor, key if expert is None else f"{key}[{expert}]", self._info[key].file)
        return tensor

    def _resolve(self, name: str) -> tuple[str, int | None, int | None] | None:
        """(stored key, expert index, gate/up half) serving ``name``, or None."""
        if name in self._info:
            return name, None, None
        if match := self._EXPERT.fullmatch(name):
            layer_prefix, expert, part = match.groups()
            fused, half = self._FUSED_PART.get(part, (None, None))
            key = f"{layer_prefix}mlp.experts.{fused}"
            if fused and key in self._info:
                return key, int(expert), half
        if ".block_sparse_moe.gate." in name and (key := name.replace(".block_sparse_moe.", ".mlp.")) in self._info:
            return key, None, None
        return None

    def _missing(self, name: str) -> ConversionError:
        where = f"{SAFETENSORS_INDEX} does not list it" if self._weight_map else "no weight file holds it"
        return ConversionError(f"{self.path} has no tensor {name} ({where})")

    def describe(self, name: str) -> TensorInfo:
        """Shape, dtype and file of ``name`` from the headers (no data read)."""
        found = self._resolve(name)
        if found is None:
            raise self._missing(name)
        key, expert, half = found
        info = self._info[key]
        shape = info.shape if expert is None else info.shape[1:]
        if half is not None:
            shape = (shape[0] // 2, *shape[1:])
        return TensorInfo(tuple(shape), info.dtype, info.file)

    def get(self, name: str) -> torch.Tensor:
        found = self._resolve(name)
        if found is None:
            raise self._missing(name)
        key, expert, half = found
        tensor = self._raw(key, expert)
        return tensor if half is None else torch.chunk(tensor, 2, dim=0)[half].contiguous()

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the stored tensor ``name`` (only those rows are read)."""
        if self._bin is not None:
            return self._bin[name][start:stop]
        with _open_safetensors(self._files[name]) as f:
            return f.get_slice(name)[start:stop]


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
    transformers' ``model.safetensors.index.json``. Each tensor goes to disk as it is
    added (:class:`~ders_megatron.io.safetensors_writer.SafetensorsFileWriter` spills it
    and writes the shard when it is full), so memory holds no shard whatever
    ``max_shard_bytes`` is; the bytes are ``save_file``'s, as before."""

    def __init__(self, folder, max_shard_bytes: int):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._open: SafetensorsFileWriter | None = None
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._open is not None and self._open.nbytes + size > self.max_shard_bytes:
            self._close_shard()
        if self._open is None:
            self._open_shard()
        self._open.add(name, tensor)
        self.total_bytes += size

    def _open_shard(self) -> None:
        path = self.folder / f"shard-{len(self._shards):05d}.tmp"
        self._open = SafetensorsFileWriter(path, metadata={"format": "pt"})

    def _close_shard(self) -> None:
        names = self._open.names
        self._shards.append((self._open.close(), names))
        self._open = None

    def finish(self) -> list[Path]:
        if self._open is None and not self._shards:
            self._open_shard()  # nothing added: one shard of no tensors, as save_file({}) writes
        if self._open is not None:
            self._close_shard()
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
