"""Stream megatron checkpoints tensor by tensor: read slices, write a model lazily.

The offline tools (upcycle, compress) turn one checkpoint into another without
ever holding a whole model:

* **Reading** (:func:`read_slices`): any slice of any key of a torch_dist
  checkpoint, e.g. one layer of a layer-stacked key. Requests are
  ``ShardedTensor`` s without prepended axes (a leading size-1 axis instead), which
  megatron-core routes through DCP's resharding reader
  (``dist_checkpointing/strategies/torch.py:292``: only prepended or flattened
  tensors take the legacy path that needs a regular shard grid). The checkpoint is
  checked first (:func:`ders_megatron.io.safe_load.vet_checkpoint`): megatron's
  loader unpickles ``.metadata`` and the common state with no allow-list.
* **Planning** (:func:`plan_model`): the target model is built on the ``meta``
  device at world size 1 (no memory), and its ``sharded_state_dict`` says every
  key, chunk, dtype and ``ShardedObject`` that ``--load`` will ask for, whatever
  the spec (local or TE, DeRS or megatron experts, ``--moe-layer-freq``).
* **Writing** (:class:`LazyCheckpointWriter`): torch.distributed.checkpoint's
  save with a planner whose ``resolve_data`` computes each chunk when the writer
  reaches it, so peak memory is one parameter plus one output file bucket. The
  result is the layout megatron's ``dist_checkpointing.save`` writes (tensors by
  ``ShardedTensor.key``, objects by ``ShardedObject.unique_key``, the common state
  as the ``common_state`` object, ``metadata.json``), under ``release/`` with
  the tracker file, i.e. what ``megatron.training``'s ``--load`` reads.

Everything here runs in one process: :func:`single_rank_megatron` sets up a
1-rank gloo group and megatron's parallel state when none exists.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ders_megatron.io.checkpoint import CheckpointError, check_finite, latest_dir, tensor_shapes, write_tracker
from ders_megatron.io.errors import failure_line
from ders_megatron.io.model import build_gpt
from ders_megatron.io.safe_load import vet_checkpoint

# megatron.training's save content metadata (training/checkpointing.py:507-508), minus the
# process group and the distributed-optimizer keys (release checkpoints hold no optimizer).
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
DEFAULT_FILE_BYTES = 256 * 2**20

# Attributes of megatron args that describe a parallel layout: the meta model is
# built at world size 1, and checkpoints are layout-free.
_LAYOUT_ARGS = dict(
    tensor_model_parallel_size=1,
    pipeline_model_parallel_size=1,
    virtual_pipeline_model_parallel_size=None,
    expert_model_parallel_size=1,
    expert_tensor_parallel_size=1,
    context_parallel_size=1,
    sequence_parallel=False,
    num_layers_in_first_pipeline_stage=None,
    num_layers_in_last_pipeline_stage=None,
    pipeline_model_parallel_layout=None,
    account_for_embedding_in_pipeline_split=False,
    account_for_loss_in_pipeline_split=False,
    # validate_args resolved these from the saved layout (model_parallel_config.py:28-41);
    # None lets the config derive them from the sizes above again.
    tensor_parallel_num_weight_shards=None,
    expert_tensor_parallel_num_weight_shards=None,
)


# --------------------------------------------------------------------------- #
# Process setup and models from args
# --------------------------------------------------------------------------- #
def single_rank_args(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of Megatron args with every parallel size 1 (the layout-free view)."""
    args = copy.copy(args)
    for name, value in _LAYOUT_ARGS.items():
        setattr(args, name, value)
    return args


def check_full_args(args, root) -> None:
    """The tools build models with megatron.training's own config functions, which need
    the full Namespace Megatron-LM (and our tools) save."""
    needed = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "padded_vocab_size",
              "params_dtype", "transformer_impl")
    missing = [name for name in needed if not hasattr(args, name)]
    if missing:
        raise CheckpointError(
            f"{root}: the checkpoint's args lack {missing}; it must hold megatron.training's full "
            "argument Namespace (checkpoints saved by Megatron-LM, examples/pretrain_gpt_ders.py "
            "or these tools do)"
        )


def build_model(args, ders=None, *, meta: bool = True, use_te: bool | None = None):
    """The GPTModel the training script builds for ``args`` (world-size-1 layout here),
    with the DeRS config passed in (compressed delta kinds come from the checkpoint's
    args). ``meta`` builds without memory: only shapes, dtypes and checkpoint keys."""
    args = copy.copy(args)
    args.use_cpu_initialization = True
    if meta:
        args.perform_initialization = False
    with torch.device("meta") if meta else contextlib.nullcontext():
        return build_gpt(args, ders=ders, use_te=use_te)


# --------------------------------------------------------------------------- #
# Reading slices
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class SliceRequest:
    """``key[prefix..., offsets : offsets + shape]``: ``prefix`` indexes leading axes (a
    layer of a stacked key, an expert), ``offsets``/``shape`` the rest."""

    key: str
    prefix: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    def sharded_tensor(self, global_shape, dtype, data: torch.Tensor | None = None):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        local = (1,) * len(self.prefix) + tuple(self.shape)
        if data is None:
            data = torch.empty(local, dtype=dtype)
        return ShardedTensor(
            key=self.key, data=data.view(local), dtype=dtype, local_shape=local,
            global_shape=tuple(global_shape), global_offset=tuple(self.prefix) + tuple(self.offsets),
            axis_fragmentations=None, replica_id=0, prepend_axis_num=0,
        )


def read_slices(root, requests: list[SliceRequest], shapes=None, out: list | None = None) -> list[torch.Tensor]:
    """Read each request (shape ``request.shape``) in one dist_checkpointing load.

    ``out`` may give tensors (or views) to read into; identical requests are read once.
    """
    from megatron.core import dist_checkpointing

    from ders_megatron.io.layout import resolve_key

    shapes = shapes if shapes is not None else tensor_shapes(root)
    requests = [replace(r, key=resolve_key(r.key, shapes)) for r in requests]  # either impl's layout
    unique: dict[SliceRequest, int] = {}
    sharded = {}
    for request in requests:
        if request in unique:
            continue
        if request.key not in shapes:
            raise CheckpointError(f"{root} has no tensor {request.key!r}")
        global_shape, dtype = shapes[request.key]
        unique[request] = len(unique)
        sharded[str(unique[request])] = request.sharded_tensor(global_shape, dtype)
    from torch.distributed.checkpoint.api import CheckpointException

    path = latest_dir(root)
    vet_checkpoint(path)
    try:
        loaded = dist_checkpointing.load(sharded, str(path), validate_access_integrity=False)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as err:  # DCP's is a BaseException; name the checkpoint
        raise CheckpointError(
            f"could not read {sorted({r.key for r in unique})[:3]} from {path}: {failure_line(err)} "
            "(a damaged checkpoint? re-copy it)"
        ) from err
    results = []
    for i, request in enumerate(requests):
        value = loaded[str(unique[request])].reshape(request.shape)
        if out is not None:
            out[i].copy_(value.view(out[i].shape))
            value = out[i]
        results.append(value)
    return results


class SliceCache:
    """The last few slices read (streaming reads the same dense layer for E experts)."""

    def __init__(self, root, size: int = 2, shapes=None):
        self.root = root
        self.size = size
        self.shapes = shapes if shapes is not None else tensor_shapes(root)
        self._cache: dict[SliceRequest, torch.Tensor] = {}

    def get(self, request: SliceRequest) -> torch.Tensor:
        if request not in self._cache:
            if len(self._cache) >= self.size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[request] = read_slices(self.root, [request], self.shapes)[0]
        return self._cache[request]


# --------------------------------------------------------------------------- #
# Planning a model's checkpoint
# --------------------------------------------------------------------------- #
@dataclass
class Chunk:
    """One chunk of the output: ``key[offsets : offsets + sizes]`` from parameter
    ``entry`` (its ``part``-th sharded tensor after factories)."""

    key: str
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    entry: str
    part: int

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.sizes:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class ModelPlan:
    """What a model's checkpoint holds: tensor chunks, objects, and the source of each chunk."""

    chunks: list[Chunk]
    objects: list  # ShardedObject
    entries: dict  # entry name -> ShardedTensor | ShardedTensorFactory (meta data)
    config: object = None  # the model's TransformerConfig

    def entry_tensors(self, name: str):
        """The ShardedTensors of one entry (a factory built on its meta data)."""
        return _built(self.entries[name])


def _built(obj) -> list:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if isinstance(obj, ShardedTensorFactory):
        return list(nested_values(obj.build()))
    return [obj]


def plan_model(model, metadata: dict | None = None) -> ModelPlan:
    """Chunks and objects of ``model.sharded_state_dict()`` (a world-size-1 model)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    metadata = dict(CONTENT_METADATA, **(metadata or {}))
    chunks, objects, entries, seen = [], [], {}, set()
    for name, obj in model.sharded_state_dict(metadata=metadata).items():
        if isinstance(obj, ShardedObject):
            objects.append(obj)
            continue
        if not isinstance(obj, (ShardedTensor, ShardedTensorFactory)):
            raise TypeError(f"{name}: unexpected {type(obj).__name__} in the sharded state dict")
        entries[name] = obj
        for part, st in enumerate(_built(obj)):
            where = (st.key, tuple(st.global_offset))
            if where in seen:  # the same tensor reached twice (tied weights)
                continue
            seen.add(where)
            chunks.append(
                Chunk(
                    key=st.key, global_shape=tuple(st.global_shape), dtype=st.dtype,
                    offsets=tuple(st.global_offset),
                    sizes=(1,) * st.prepend_axis_num + tuple(st.local_shape),
                    entry=name, part=part,
                )
            )
    return ModelPlan(chunks, objects, entries, model.config)


def layer_of(st) -> int | None:
    """0-based global layer of a decoder ShardedTensor (stacked or per-layer key)."""
    key = st.key
    if not key.startswith("decoder.layers."):
        return None
    head = key[len("decoder.layers."):].split(".", 1)[0]
    if head.isdigit():
        return int(head)
    return st.global_offset[0]


def layer_suffix(key: str) -> str:
    """``mlp.linear_fc1.weight`` of ``decoder.layers[.N].mlp.linear_fc1.weight``."""
    rest = key[len("decoder.layers."):]
    head, _, tail = rest.partition(".")
    return tail if head.isdigit() else rest


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #
def _filesystem_writer_class():
    from torch.distributed.checkpoint import FileSystemWriter

    class _BucketedWriter(FileSystemWriter):
        """Files of at most ``file_bytes`` each, written in plan order.

        torch's writer keeps every tensor of a file alive until the file is
        closed (``filesystem.py:451``, for its safetensors mode), so one file per
        rank would hold the whole model; buckets bound that to ``file_bytes``.
        """

        def __init__(self, path, file_bytes: int, sizes: dict):
            super().__init__(path, single_file_per_rank=False, sync_files=True, thread_count=1)
            self._file_bytes = file_bytes
            self._sizes = sizes

        def write_data(self, plan, planner):
            import queue

            buckets, current, current_bytes = [], [], 0
            for item in plan.items:
                size = self._sizes.get((item.index.fqn, tuple(item.index.offset or ())), 0)
                if current and current_bytes + size > self._file_bytes:
                    buckets.append(current)
                    current, current_bytes = [], 0
                current.append(item)
                current_bytes += size
            if current:
                buckets.append(current)
            file_queue: queue.Queue = queue.Queue()
            for i, bucket in enumerate(buckets):
                name = f"{plan.storage_data.prefix}{i}.distcp"
                file_queue.put((self.fs.concat_path(self.path, name), name, bucket))
            return self._write_data(planner, file_queue)

    return _BucketedWriter


def _planner_class():
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import SavePlan

    class _LazyPlanner(DefaultSavePlanner):
        """Write items given up front; data computed in ``resolve_data`` when written."""

        def __init__(self, items, resolve):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self._items = items
            self._resolve = resolve

        def create_local_plan(self):
            self.plan = SavePlan(self._items)
            return self.plan

        def resolve_data(self, write_item):
            return self._resolve(write_item)

    return _LazyPlanner


class LazyCheckpointWriter:
    """Write a megatron torch_dist checkpoint directory from a :class:`ModelPlan`.

    ``values(entry) -> tensor`` returns the full world-size-1 value of one
    parameter; it is called once per entry, in plan order (chunks of an entry
    are consecutive), so only the current entry is held. Each value is checked for
    NaN/Inf as it is written (:func:`~ders_megatron.io.checkpoint.check_finite`; an
    optional ``values.origin(entry)`` says where a bad one came from).
    """

    def __init__(self, plan: ModelPlan, values: Callable[[str], torch.Tensor], file_bytes: int = DEFAULT_FILE_BYTES):
        self.plan = plan
        self.values = values
        self.file_bytes = file_bytes
        self._current: tuple[str, list] | None = None
        self.bytes_written = 0

    def _chunk_data(self, chunk: Chunk) -> torch.Tensor:
        if self._current is None or self._current[0] != chunk.entry:
            self._current = None  # drop the previous entry before computing the next
            value = self.values(chunk.entry)
            entry = self.plan.entries[chunk.entry]
            expected = tuple(entry.data.shape)
            if tuple(value.shape) != expected:
                raise ValueError(f"{chunk.entry}: computed shape {tuple(value.shape)}, model has {expected}")
            value = value.to(entry.data.dtype)
            check_finite(value, chunk.key, lambda: self._origin(chunk.entry))
            self._current = (chunk.entry, _built(replace(entry, data=value)))
        data = self._current[1][chunk.part].data
        self.bytes_written += chunk.nbytes
        return data.reshape(chunk.sizes).contiguous()

    def _origin(self, entry: str) -> str:
        """Where an entry's values came from, for an error message: ``values.origin(entry)``
        where the values object can say (the source checkpoint's key and file)."""
        origin = getattr(self.values, "origin", None)
        try:
            return origin(entry) if origin is not None else ""
        except Exception:  # only ever called to word an error; never hide that error
            return ""

    def write(self, directory, common: dict) -> None:
        """Write tensors, objects and the common state into ``directory`` (created)."""
        from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
        from megatron.core.dist_checkpointing.mapping import ShardedObject
        from torch.distributed.checkpoint import save
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        items, by_index, sizes = [], {}, {}
        for chunk in self.plan.chunks:
            index = MetadataIndex(chunk.key, torch.Size(chunk.offsets))
            items.append(
                WriteItem(
                    index=index, type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size(chunk.offsets), sizes=torch.Size(chunk.sizes)),
                        properties=TensorProperties(dtype=chunk.dtype),
                        size=torch.Size(chunk.global_shape),
                    ),
                )
            )
            by_index[(chunk.key, chunk.offsets)] = chunk
            sizes[(chunk.key, chunk.offsets)] = chunk.nbytes
        common_obj = ShardedObject("common_state", dict(common), (1,), (0,), replica_id=0)
        blobs = {obj.unique_key: obj.data for obj in self.plan.objects}
        blobs[common_obj.unique_key] = common_obj.data
        for unique_key in blobs:
            items.append(WriteItem(index=MetadataIndex(unique_key), type=WriteItemType.BYTE_IO))

        def resolve(item):
            if item.type == WriteItemType.BYTE_IO:
                buffer = io.BytesIO()
                # megatron packs each rank's objects of a key as a list (strategies/torch.py:319)
                torch.save([blobs[item.index.fqn]], buffer)
                buffer.seek(0)
                return buffer
            return self._chunk_data(by_index[(item.index.fqn, tuple(item.index.offset))])

        writer = _filesystem_writer_class()(directory, self.file_bytes, sizes)
        try:
            save({}, storage_writer=writer, planner=_planner_class()(items, resolve), no_dist=True)
        except CheckpointException as err:  # a BaseException wrapping what resolve or the writer raised
            for exc, _ in err.failures.values():
                if isinstance(exc, (CheckpointError, ValueError, OSError)):
                    raise exc from None
            raise RuntimeError(failure_line(err)) from err  # err kept: what a full disk looks like to torch
        self._current = None
        save_config(CheckpointingConfig("torch_dist", 1), str(directory))


def write_release(root, plan: ModelPlan, values, common: dict, file_bytes: int = DEFAULT_FILE_BYTES) -> int:
    """``root/release`` + tracker, as megatron.training lays out a release checkpoint.
    Returns the tensor bytes written."""
    writer = LazyCheckpointWriter(plan, values, file_bytes)
    writer.write(Path(root) / "release", common)
    write_tracker(root, None)
    return writer.bytes_written


def release_common(args) -> dict:
    """The common state megatron.training saves, for a release checkpoint of ``args``."""
    return {
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": 0,
        "num_floating_point_operations_so_far": 0,
        "content_metadata": dict(CONTENT_METADATA),
    }
