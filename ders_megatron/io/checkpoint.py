"""Checkpoint layout shared by the training script and the tools.

It is megatron.training's (``training/checkpointing.py``), so ``--load`` reads
what our tools write and our tools read what Megatron-LM writes:

    <root>/latest_checkpointed_iteration.txt   "release" or an iteration number
    <root>/release/ or <root>/iter_0000123/      a dist_checkpointing (torch_dist) dir
        state: {"model": model.sharded_state_dict(), "args": Namespace,
                "checkpoint_version": 3.0, "iteration": int, ...}

Checkpoint keys are megatron's ``sharded_state_dict`` keys, not module names:
the layers of a block are stacked on a leading axis
(``decoder.layers.self_attention.linear_qkv.weight`` is ``[num_layers, ...]``),
norms fused into linears in the local spec are renamed
(``input_layernorm.`` -> ``self_attention.linear_qkv.layer_norm_``), and
``SequentialMLP`` experts get an experts axis (``mlp.experts.experts.linear_fc1.weight``
is ``[num_layers, E, ...]``). DeRS keys are listed in ``docs/design.md``.

Checkpoints are data: every read here goes through :mod:`ders_megatron.io.safe_load`
(``.metadata`` and the common state through allow-lists, and a checkpoint handed
to megatron's own loaders is checked first), so nothing in a file is executed;
``--trust-checkpoint`` (:func:`~ders_megatron.io.safe_load.trust_checkpoints`) opts out.

Tools that write a whole checkpoint use :func:`~ders_megatron.io.atomic.atomic_output_dir`
(re-exported here): they write into a temporary sibling directory and rename it at
the end, so a crash never leaves a directory that ``--load`` would take as complete,
and an existing output is only replaced with ``force``.
"""

from __future__ import annotations

from pathlib import Path

import torch

# atomic_output_dir and CheckpointError live below (io/atomic.py, io/errors.py); callers
# import them from here as before.
from ders_megatron.io.atomic import atomic_output_dir, write_text_atomic
from ders_megatron.io.errors import CheckpointError, NonFiniteError, failure_line
from ders_megatron.io.safe_load import common_state, read_metadata, storage_files, vet_checkpoint

TRACKER = "latest_checkpointed_iteration.txt"


def tracker_path(root) -> Path:
    return Path(root) / TRACKER


def iteration_dir(root, iteration: int | None) -> Path:
    """``release/`` for iteration None, else ``iter_0000123/`` (``checkpointing.py:195``)."""
    return Path(root) / ("release" if iteration is None else f"iter_{iteration:07d}")


def latest_dir(root) -> Path:
    """The directory the tracker points to; clear errors for what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    tracker = tracker_path(root)
    if not tracker.is_file():
        raise CheckpointError(
            f"{root} has no {TRACKER}: not a Megatron checkpoint, or its save never finished"
        )
    text = tracker.read_text().strip()
    if text == "release":
        path = iteration_dir(root, None)
    elif text.isdigit():
        path = iteration_dir(root, int(text))
    else:
        raise CheckpointError(f"{tracker} holds {text!r}, expected 'release' or an iteration")
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{path} is incomplete (no metadata.json): a truncated checkpoint?")
    return path


def write_tracker(root, iteration: int | None) -> None:
    """Atomically point the tracker at ``iteration`` (rename over the old file)."""
    write_text_atomic(tracker_path(root), "release" if iteration is None else str(iteration))


def _barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def save_model(model_chunks, root, args=None, iteration: int | None = None) -> Path:
    """Save model weights in megatron.training's layout (no optimizer state), keyed as
    the ``--transformer-impl`` that ``args`` records loads them (:mod:`ders_megatron.io.layout`).

    Collective: every rank calls it with its own shards.
    """
    from megatron.core import dist_checkpointing, parallel_state

    from ders_megatron.io.layout import LOCAL_IMPL, impl_of, sharded_state_dict_in_layout

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    path = iteration_dir(root, iteration)
    if _rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    _barrier()
    metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    state = {"checkpoint_version": 3.0, "iteration": iteration or 0}
    if args is not None:
        state["args"] = args
    impl = impl_of(args) if args is not None else LOCAL_IMPL
    for i, chunk in enumerate(chunks):
        state["model" if len(chunks) == 1 else f"model{i}"] = sharded_state_dict_in_layout(
            chunk.sharded_state_dict(metadata=metadata), chunk.config, impl
        )
    dist_checkpointing.save(state, str(path))
    _barrier()
    if _rank() == 0:
        write_tracker(root, iteration)
    _barrier()
    return path


def load_model(model_chunks, root, strict: bool = True) -> dict:
    """Load model weights saved at any TP/EP/PP layout, by either ``--transformer-impl``'s
    spec, into this layout's chunks (tensors requested under the checkpoint's names)."""
    from megatron.core import dist_checkpointing, parallel_state
    from torch.distributed.checkpoint.api import CheckpointException

    from ders_megatron.io.layout import sharded_state_dict_for_checkpoint

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    path = latest_dir(root)
    vet_checkpoint(path)
    keys = tensor_shapes(root)
    metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    request = {
        ("model" if len(chunks) == 1 else f"model{i}"): sharded_state_dict_for_checkpoint(
            chunk.sharded_state_dict(metadata=metadata), keys
        )
        for i, chunk in enumerate(chunks)
    }
    try:
        loaded = dist_checkpointing.load(request, str(path))
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as err:  # DCP's is a BaseException; name the checkpoint
        raise CheckpointError(f"could not read the model from {path}: {failure_line(err)} "
                              "(a damaged checkpoint? re-copy it)") from err
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"], strict=strict)
    return loaded


def load_common(root) -> dict:
    """The non-tensor state (args, iteration, checkpoint_version) of the latest checkpoint,
    read through the allow-list (:func:`ders_megatron.io.safe_load.common_state`)."""
    return common_state(latest_dir(root))


def stored_args(root):
    """The args the latest checkpoint under ``root`` was saved with; None where ``root``
    holds no complete torch_dist checkpoint (a fresh run's ``--load``; an incomplete
    or garbled one is left to the training script's resume check to name) or its
    state has no args."""
    if not tracker_path(root).is_file():
        return None
    try:
        path = latest_dir(root)
    except CheckpointError:
        return None
    if not (path / "metadata.json").is_file():  # dist_checkpointing writes it last
        return None
    return load_common(root).get("args")


def tensor_shapes(root) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Global shape and dtype of every tensor key, read from the metadata only.

    megatron's ``load_tensors_metadata`` takes metadata already read
    (``dist_checkpointing/strategies/torch.py:1008``): ours, through the allow-list.
    """
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    ensure_process_group()
    path = latest_dir(root)
    meta = TorchDistLoadShardedStrategy().load_tensors_metadata(path, metadata=read_metadata(path))
    return {key: (sh.global_shape, sh.dtype) for key, sh in meta.items()}


def describe_source(root, keys) -> str:
    """``KEY in DIR/FILE.distcp``: where the tensors ``keys`` of the checkpoint under ``root``
    are stored, for error messages (a NaN traced to its file)."""
    path = latest_dir(root)
    metadata = read_metadata(path)
    keys = [keys] if isinstance(keys, str) else list(keys)
    return "; ".join(f"{key} in {', '.join(str(path / f) for f in storage_files(metadata, key)) or path}"
                     for key in keys)


def ensure_process_group() -> None:
    """dist_checkpointing needs a process group; single-process tools get a 1-rank one."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def load_full_tensors(root, keys: list[str]) -> dict[str, torch.Tensor]:
    """Whole (unsharded) tensors for a few keys: streaming tools read key by key.

    A layer-stacked key comes whole (all layers of that one parameter): a
    partial read of one layer trips torch.distributed.checkpoint's shard
    metadata check in a single process, so a key is the unit of streaming.

    Works in a single process (a 1-rank gloo group is created if none exists).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    ensure_process_group()
    shapes = tensor_shapes(root)
    missing = [k for k in keys if k not in shapes]
    if missing:
        raise CheckpointError(f"{root} has no tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
    request = {
        key: ShardedTensor.from_rank_offsets(key, torch.empty(shapes[key][0], dtype=shapes[key][1]), replica_id=0)
        for key in keys
    }
    path = latest_dir(root)
    vet_checkpoint(path)
    return dist_checkpointing.load(request, str(path))


_FINITE_BLOCK = 1 << 24  # elements checked at a time: a bool mask of 16 MiB, whatever the tensor


def check_finite(tensor: torch.Tensor, name: str, origin=None) -> None:
    """Raise :class:`NonFiniteError` naming ``name`` and where its values came from
    (``origin``: a string, or a callable asked only on failure) if a floating-point
    ``tensor`` holds NaN or Inf. Streamed in blocks, so a large tensor costs one pass
    and a small mask; integer tensors are always finite."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return
    flat = tensor.detach().reshape(-1)
    for block in flat.split(_FINITE_BLOCK):
        if not bool(torch.isfinite(block).all()):
            nan, inf = int(torch.isnan(flat).sum()), int(torch.isinf(flat).sum())
            where = origin() if callable(origin) else origin
            raise NonFiniteError(
                f"{name} holds {nan} NaN and {inf} Inf of {flat.numel()} values"
                f"{f' ({where})' if where else ''}; nothing written: fix or replace that source"
            )


__all__ = [  # atomic_output_dir and CheckpointError are re-exported
    "TRACKER", "CheckpointError", "atomic_output_dir", "check_finite", "describe_source", "ensure_process_group", "iteration_dir",
    "latest_dir", "load_common", "load_full_tensors", "load_model", "save_model", "stored_args", "tensor_shapes",
    "tracker_path", "write_tracker",
]
