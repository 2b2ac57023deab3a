"""Checkpoints are data: read a torch_dist checkpoint without running code from it.

Checkpoints travel between teams and are downloaded, and two parts of a torch_dist
checkpoint are pickles that the stock readers would execute:

* ``.metadata``: torch's ``FileSystemReader.read_metadata`` is ``pickle.load``
  (``torch/distributed/checkpoint/filesystem.py:934-938``);
* the byte objects inside the ``.distcp`` files (megatron's common state with the
  args; ``ShardedObject`` s such as the RNG and rerun state): torch's
  ``DefaultLoadPlanner.load_bytes`` is ``torch.load(weights_only=False)``
  (``torch/distributed/checkpoint/default_planner.py:383-393``). megatron-core reaches
  it in ``load_common_state_dict`` (``megatron/core/dist_checkpointing/serialization.py:228-237``:
  the ``weights_only=True`` of line 236 only runs when the planner left a ``BytesIO``,
  which the default planner never does) and through ``MCoreLoadPlanner``, a
  ``DefaultLoadPlanner`` (``dist_checkpointing/strategies/torch.py:493``).

Tensors are safe already: ``FileSystemReader.read_data`` loads them with
``weights_only=True`` (``filesystem.py:907-911``).

Here both pickles are read through allow-lists of what a checkpoint needs:
``.metadata`` through :class:`SafeUnpickler` (:data:`METADATA_GLOBALS`: torch's
checkpoint metadata classes, read off ``torch/distributed/checkpoint/metadata.py`` and
``planner.py`` and off real checkpoints), byte objects through ``torch.load(weights_only=True)``
with :func:`common_state_globals` (what megatron stores: its argument ``Namespace``
and the enums in it, the rerun state, numpy RNG state). Anything else is refused with
:class:`UnsafeCheckpointError`, naming the file and the global.

Our own reads use :class:`SafeFileSystemReader` and :class:`SafeLoadPlanner`
directly (:func:`read_metadata`, :func:`read_objects`, :func:`common_state`).
megatron's loaders cannot be given them: ``TorchDistLoadShardedStrategy.load``
builds its reader and planner inline (``strategies/torch.py:975-992``),
``dist_checkpointing.load`` reads the common state through ``load_common_state_dict``
whatever strategy it is passed (``serialization.py:151``), and megatron.training
builds its own strategy (``megatron/training/checkpointing.py:1575``) after reading
the common state (``checkpointing.py:1562``). So before a checkpoint directory is
handed to megatron, :func:`vet_checkpoint` reads every pickle in it (``.metadata``
and every byte object it lists) through the allow-lists. Bytes that pass name only
allow-listed globals, and unpickling the same bytes again in megatron's plain readers
builds the same harmless objects. The limit of that promise: a file replaced
between the check and megatron's read (someone writing into the checkpoint while
the job runs) is not covered.

``--trust-checkpoint`` opts out, loudly: inside :func:`trust_checkpoints` the
checks are skipped and the plain readers used.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import io
import os
import pickle
import signal
import sys
import warnings
from argparse import Namespace
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from ders_megatron.core.config import TRUST_FLAG
from ders_megatron.io.errors import CheckpointError, failure_line

METADATA_FILE = ".metadata"
LEGACY_COMMON_FILE = "common.pt"  # megatron's COMMON_STATE_FNAME (dist_checkpointing/strategies/common.py)

# "module.name" of every class and function a torch_dist .metadata pickle names, and torch's
# dtypes (torch.float32, ...: see _is_torch_dtype). Read off torch/distributed/checkpoint/metadata.py
# (Metadata and the classes of its fields), planner.py (the save plans megatron keeps in
# Metadata.all_local_plans) and filesystem.py (its storage_data), and checked against the
# .metadata of tests/data and of checkpoints megatron.training saves.
METADATA_GLOBALS = frozenset({
    "torch.Size",
    "torch.serialization._get_layout",  # torch.layout's reducer (TensorProperties.layout)
    "torch.distributed.checkpoint.metadata.Metadata",
    "torch.distributed.checkpoint.metadata.MetadataIndex",
    "torch.distributed.checkpoint.metadata.StorageMeta",
    "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
    "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
    "torch.distributed.checkpoint.metadata.ChunkStorageMetadata",
    "torch.distributed.checkpoint.metadata.TensorProperties",
    "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING",
    "torch.distributed.checkpoint.planner.SavePlan",
    "torch.distributed.checkpoint.planner.WriteItem",
    "torch.distributed.checkpoint.planner.WriteItemType",
    "torch.distributed.checkpoint.planner.TensorWriteData",
    "torch.distributed.checkpoint.planner.BytesIOWriteData",
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    "torch.distributed.checkpoint.filesystem._StoragePrefix",
    # StorageMeta.checkpoint_id of torch's FileSystemWriter is its Path (filesystem.py:800-812)
    "pathlib.PosixPath",
    "pathlib.PurePosixPath",
    # empty placeholders megatron keeps to read older checkpoints (strategies/torch.py:89-100)
    "megatron.core.dist_checkpointing.strategies.torch.MCoreMetadata",
    "megatron.core.dist_checkpointing.strategies.torch.MCoreSavePlan",
})


@functools.cache
def common_state_globals() -> list:
    """What megatron stores in the common state and its ``ShardedObject`` s, beyond what
    ``weights_only`` allows anyway (containers, tensors, torch dtypes): the args
    ``Namespace`` and the enums its parser and ``validate_args`` put into it
    (``training/arguments.py``: ``AttnBackend``, ``exit_signal``, the CUDA-graph scopes;
    ``ModelType`` from ``pretrain``), the rerun state machine's state
    (``core/rerun_state_machine.py:60-90``) and the numpy RNG state in ``rng_state``.
    Built on first use: importing this module imports no megatron."""
    import numpy
    from megatron.core.enums import ModelType
    from megatron.core.rerun_state_machine import RerunDiagnostic, RerunMode, RerunState
    from megatron.core.transformer.enums import AttnBackend, CudaGraphModule, InferenceCudaGraphScope

    reconstruct = numpy._core.multiarray._reconstruct
    return [
        Namespace, signal.Signals, ModelType, AttnBackend, CudaGraphModule, InferenceCudaGraphScope,
        RerunDiagnostic, RerunMode, RerunState,
        numpy.ndarray, numpy.dtype, reconstruct,
        (reconstruct, "numpy.core.multiarray._reconstruct"),  # the name numpy 1.x pickled it under
    ]

_TRUSTED = contextvars.ContextVar("ders_trust_checkpoints", default=False)


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds something that could run code when loaded; nothing was run."""


def refusal(source, what: str, part: str | None = None) -> str:
    """The one message for a refused global: the file (and the object in it), the
    global, the way out."""
    where = f"checkpoint {source}" + (f": {part}" if part else "")
    return (f"{where} holds {what}, which a checkpoint never needs; refusing to load it "
            f"(pass {TRUST_FLAG} if you trust this file)")


# --------------------------------------------------------------------------- #
# --trust-checkpoint
# --------------------------------------------------------------------------- #
@contextlib.contextmanager
def trust_checkpoints(trusted: bool = True):
    """Within the block (when ``trusted``), checkpoints are read with the plain,
    unchecked readers: the tools' ``--trust-checkpoint``, with a loud warning. A
    scope, not a setting: nothing outside the block is affected."""
    if trusted and not _TRUSTED.get():  # once per scope, not again in nested ones
        warn_trusted()
    token = _TRUSTED.set(bool(trusted) or _TRUSTED.get())
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def checkpoints_trusted() -> bool:
    return _TRUSTED.get()


def _rank() -> int:
    """This process's rank: the process group's, else torchrun's ``RANK`` (training parses
    its flags before the group exists), else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def warn_trusted() -> None:
    """The loud line ``--trust-checkpoint`` costs, on rank 0 only (one line per job, not
    one per rank)."""
    if _rank() != 0:
        return
    print(f"WARNING: {TRUST_FLAG}: checkpoints are read without the allow-list; a checkpoint "
          "can run any code on this machine while it loads. Use it only for files you made "
          "or whose source you trust.", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- #
# The two allow-lists
# --------------------------------------------------------------------------- #
def _is_torch_dtype(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`METADATA_GLOBALS` and torch dtypes.

    Every way a pickle reaches code (``GLOBAL``/``STACK_GLOBAL``, hence ``REDUCE``,
    ``NEWOBJ``, ``BUILD`` on a class it named) goes through ``find_class``; persistent
    ids are refused by ``pickle.Unpickler`` itself when ``persistent_load`` is not set.
    """

    def __init__(self, file, source):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if f"{module}.{name}" in METADATA_GLOBALS or _is_torch_dtype(module, name):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(refusal(self.source, f"{module}.{name}"))


def load_object(stream, source, part: str):
    """``torch.load(weights_only=True)`` of one byte object, with :func:`common_state_globals`."""
    with torch.serialization.safe_globals(common_state_globals()):
        try:
            return torch.load(stream, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            stream.seek(0)
            names = torch.serialization.get_unsafe_globals_in_checkpoint(stream)
            what = ", ".join(names) if names else str(err).strip().splitlines()[0]
            raise UnsafeCheckpointError(refusal(source, what, part)) from None


def load_file(path, what: str = "checkpoint file"):
    """``torch.load`` of a whole file (a DeepSpeed or legacy megatron checkpoint file) with
    ``weights_only=True`` and :func:`common_state_globals`; anything else refused naming
    the file and the global. The plain ``torch.load`` inside :func:`trust_checkpoints`."""
    path = Path(path)
    if checkpoints_trusted():
        return torch.load(path, map_location="cpu", weights_only=False)
    with open(path, "rb") as stream:
        try:
            return load_object(stream, path, None)
        except CheckpointError:
            raise
        except (EOFError, RuntimeError) as err:  # a cut zip archive: "failed finding central directory"
            raise CheckpointError(f"{what} {path} is truncated or damaged ({failure_line(err)}); re-copy it") from err


class SafeFileSystemReader(FileSystemReader):
    """torch's ``FileSystemReader`` whose ``read_metadata`` uses :class:`SafeUnpickler`
    (``filesystem.py:934-945`` with the unpickler swapped), or returns ``metadata``
    already read that way (one read of ``.metadata`` per load)."""

    def __init__(self, path, metadata: Metadata | None = None):
        super().__init__(path)
        self.known_metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self.known_metadata is not None:
            return self.known_metadata
        if kwargs.get("rank") is not None:
            # torch falls back to a rank's own metadata file when .metadata fails to read
            # (state_dict_loader.py:243-250); a checkpoint we read has its .metadata.
            raise CheckpointError(f"checkpoint {self.path}: no readable {METADATA_FILE}")
        path = self._get_metadata_path(None)
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = SafeUnpickler(stream, path).load()
            except CheckpointError:
                raise
            except Exception as err:  # a cut or garbled pickle: EOFError, UnpicklingError, ...
                raise CheckpointError(f"checkpoint {path} is truncated or damaged ({failure_line(err)}); "
                                      "re-copy it") from err
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"checkpoint {path}: holds a {type(metadata).__name__}, not checkpoint metadata")
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` whose byte objects go through :func:`load_object`
    (``default_planner.py:383-393`` with ``weights_only=True``). For flat state dicts
    (``{key: io.BytesIO()}`` and tensors), as every read here is."""

    def __init__(self, source):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.source = source

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        key = read_item.dest_index.fqn
        stored = self.metadata.storage_data[read_item.storage_index]
        self.state_dict[key] = load_object(value, Path(self.source) / stored.relative_path, f"object {key!r}")


# --------------------------------------------------------------------------- #
# Reads
# --------------------------------------------------------------------------- #
@contextlib.contextmanager
def single_process_reads():
    """torch.distributed.checkpoint warns on every read without a process group; a
    single-process read is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def read_metadata(path) -> Metadata:
    """The ``.metadata`` of one checkpoint directory (``release/``, ``iter_*/``), through
    :class:`SafeUnpickler` (the plain ``pickle.load`` inside :func:`trust_checkpoints`)."""
    path = Path(path)
    if not (path / METADATA_FILE).is_file():
        raise CheckpointError(f"checkpoint {path} has no {METADATA_FILE}: not a torch_dist checkpoint, "
                              "or an incomplete copy; re-copy it")
    if checkpoints_trusted():
        metadata = FileSystemReader(str(path)).read_metadata()
    else:
        metadata = SafeFileSystemReader(str(path)).read_metadata()
    check_storage(path, metadata)
    return metadata


def check_storage(path, metadata: Metadata) -> None:
    """Every file ``.metadata`` lists is there and long enough for what it holds: a
    truncated or half-copied checkpoint is named here, before any read trips on it."""
    path = Path(path)
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        relative = getattr(info, "relative_path", None)
        if relative is not None:
            needed[relative] = max(needed.get(relative, 0), info.offset + info.length)
    for relative, size in sorted(needed.items()):
        file = path / relative
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} lacks {relative}, which its {METADATA_FILE} lists: "
                                  "an incomplete copy; re-copy it")
        actual = file.stat().st_size
        if actual < size:
            raise CheckpointError(f"checkpoint file {file} is truncated ({actual} bytes, its {METADATA_FILE} "
                                  f"places data up to byte {size}); re-copy it")


def storage_files(metadata: Metadata, key: str) -> list[str]:
    """The files (relative to the checkpoint directory) holding chunks of ``key``."""
    return sorted({info.relative_path for index, info in (metadata.storage_data or {}).items()
                   if index.fqn == key and hasattr(info, "relative_path")})


def object_keys(metadata: Metadata) -> list[str]:
    """Keys of the byte objects (common state, ``ShardedObject`` s) a checkpoint holds."""
    return [key for key, md in metadata.state_dict_metadata.items() if isinstance(md, BytesStorageMetadata)]


def read_objects(path, keys=None, metadata: Metadata | None = None) -> dict:
    """Byte objects of checkpoint directory ``path`` by key (all of them by default),
    each through :func:`load_object`."""
    metadata = metadata if metadata is not None else read_metadata(path)
    keys = object_keys(metadata) if keys is None else list(keys)
    missing = [key for key in keys if key not in metadata.state_dict_metadata]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no object {missing[0]!r}: an incomplete or foreign checkpoint")
    state = {key: io.BytesIO() for key in keys}
    if not state:
        return state
    reader = SafeFileSystemReader(str(path), metadata)
    try:
        with single_process_reads():
            dcp_load(state, storage_reader=reader, planner=SafeLoadPlanner(path), no_dist=True)
    except CheckpointException as err:  # a BaseException wrapping what the planner raised
        raise _first_checkpoint_error(err, path) from None
    return state


def _first_checkpoint_error(err: CheckpointException, path) -> CheckpointError:
    for exc, _ in err.failures.values():
        if isinstance(exc, CheckpointError):
            return exc
    return CheckpointError(f"checkpoint {path}: could not read its objects ({failure_line(err)}); "
                           "a damaged copy? re-copy it")


def common_state(path) -> dict:
    """megatron's common state (args, iteration, ...) of checkpoint directory ``path``:
    ``load_common_state_dict`` (``serialization.py:206-237``) with the allow-lists; the
    plain one inside :func:`trust_checkpoints`."""
    path = Path(path)
    if checkpoints_trusted():
        from megatron.core.dist_checkpointing import load_common_state_dict

        return load_common_state_dict(str(path))
    legacy = path / LEGACY_COMMON_FILE
    if legacy.is_file():  # megatron's older layout (strategies/common.py:32-48)
        return load_object(io.BytesIO(legacy.read_bytes()), legacy, "the common state")
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    key = ShardedObject("common_state", None, (1,), (0,)).unique_key  # serialization.py:227
    return read_objects(path, [key])[key][0]


def vet_legacy_checkpoint(path) -> None:
    """megatron's legacy ``--ckpt-format torch`` directory ``path`` (``mp_rank_*/*.pt``):
    every global its pickles name must be one ``torch.load(weights_only=True)`` allows
    with :func:`common_state_globals`, else :class:`UnsafeCheckpointError` names the
    file and the globals. megatron 0.19.2 loads these files with torch's default
    ``weights_only=True`` and its own allow-list (``training/checkpointing.py:1739``,
    ``core/safe_globals.py``), but answers a refusal with ``sys.exit()``, status 0
    (``checkpointing.py:1740-1743``); this names it first. A static scan of the pickle
    (``torch.serialization.get_unsafe_globals_in_checkpoint``): no tensor is read.
    Nothing to do inside :func:`trust_checkpoints`."""
    if checkpoints_trusted():
        return
    files = sorted(Path(path).glob("mp_rank_*/*.pt"))
    with torch.serialization.safe_globals(common_state_globals()):
        for file in files:
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
            except (RuntimeError, ValueError, EOFError) as err:  # not a whole torch.save zip
                raise CheckpointError(f"checkpoint {file} is truncated or damaged ({failure_line(err)}); "
                                      "re-copy it") from err
            if unsafe:
                raise UnsafeCheckpointError(refusal(file, ", ".join(sorted(unsafe))))


def vet_checkpoint(path) -> None:
    """Read every pickle of checkpoint directory ``path`` through the allow-lists before
    it is handed to megatron's own loaders (module docstring: why a check first).
    Raises :class:`UnsafeCheckpointError`; nothing to do inside :func:`trust_checkpoints`.

    Streaming tools load slice after slice from one checkpoint: a directory whose files
    are unchanged (same names, sizes, modification times, inodes) is checked once.
    """
    if checkpoints_trusted():
        return
    path = Path(path)
    _vet_once(str(path.resolve()), _files_signature(path))


def _files_signature(path: Path) -> tuple:
    stats = ((entry.name, entry.stat()) for entry in sorted(path.iterdir()) if entry.is_file())
    return tuple((name, st.st_size, st.st_mtime_ns, st.st_ino) for name, st in stats)


@functools.lru_cache(maxsize=64)
def _vet_once(path: str, signature: tuple) -> None:
    """The check itself; cached by (directory, its files' signature), so only passes are kept."""
    read_objects(path, metadata=read_metadata(path))
    legacy = Path(path) / LEGACY_COMMON_FILE
    if legacy.is_file():
        load_object(io.BytesIO(legacy.read_bytes()), legacy, "the common state")
