"""Read a megatron-core torch_dist checkpoint one layer at a time, in megatron's
parameter names, whatever TP/EP/PP layout saved it.

:mod:`ders_megatron.io.checkpoint` reads whole keys; a layer-stacked key holds that
parameter for all layers (``decoder.layers.mlp.experts.experts.linear_fc1.weight``
is ``[L, E, 2F, H]`` for SequentialMLP experts, the model's whole expert volume).
Here a request is the slab of ONE layer, read through
``torch.distributed.checkpoint`` with a load planner that asks for that chunk
only (``create_read_items_for_chunk_list`` intersects it with the saved shards),
so memory stays at one layer's tensors. ``.metadata`` and the common state are read
through the allow-lists of :mod:`ders_megatron.io.safe_load`; tensors are
``weights_only`` in torch's reader already.

Parameter name -> checkpoint key (the rules megatron-core applies on save):

* ``decoder.layers.<i>.`` -> ``decoder.layers.`` plus index ``i`` on the leading
  axis when the block's layers are homogeneous (``transformer_block.py:761-790``),
  else kept as ``decoder.layers.<i>.`` (``--moe-layer-freq`` != 1,
  ``transformer_block.py:736-740``);
* ``input_layernorm.`` -> ``self_attention.linear_qkv.layer_norm_`` and
  ``pre_mlp_layernorm.`` -> ``mlp.linear_fc1.layer_norm_`` (the local spec's
  ``sharded_state_dict_keys_map``, ``models/gpt/gpt_layer_specs.py:459-461``; a
  TE model keeps ``pre_mlp_layernorm.`` in MoE layers, :mod:`ders_megatron.io.layout`);
* ``experts.local_experts.<e>.`` -> ``experts.experts.`` plus index ``e`` on the
  experts axis (``SequentialMLP.sharded_state_dict``, ``transformer/moe/experts.py:1388-1399``).
"""

from __future__ import annotations

import re

import torch
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from ders_megatron.io.checkpoint import CheckpointError, latest_dir, load_common
from ders_megatron.io.errors import failure_line
from ders_megatron.io.layout import other_layout_key
from ders_megatron.io.safe_load import SafeFileSystemReader, read_metadata, single_process_reads, storage_files

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_LOCAL_EXPERT = re.compile(r"(.*experts\.)local_experts\.(\d+)\.(.+)")
_NORM_RENAMES = (
    ("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
    ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"),
)


class _ChunkPlanner(DefaultLoadPlanner):
    """Loads ``state_dict[key]`` from the chunk of the saved tensor at ``offsets[key]``."""

    def __init__(self, offsets: dict[str, tuple[int, ...]]):
        super().__init__()
        self.offsets = offsets

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, dest in self.state_dict.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets[key]), sizes=dest.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item):
        dest = self.state_dict[read_item.dest_index.fqn]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item, tensor):
        """The resolved tensor is a view of the destination: nothing to copy back."""


class CheckpointReader:
    """The args and per-layer tensors of a megatron.training-layout checkpoint."""

    def __init__(self, root):
        self.root = root
        self.path = latest_dir(root)
        with single_process_reads():
            common = load_common(root)
        if common.get("args") is None:
            raise CheckpointError(f"{self.path} stores no 'args': cannot tell the model's dimensions")
        self.args = common["args"]
        self.checkpoint_metadata = read_metadata(self.path)
        self.metadata = {
            key: md
            for key, md in self.checkpoint_metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }

    def locate(self, name: str) -> tuple[str, int | None, int | None]:
        """(checkpoint key, index on its layer axis or None, index on its experts axis or None)."""
        match = _LAYER.fullmatch(name)
        if not match:
            if name in self.metadata:
                return name, None, None
            raise CheckpointError(f"{self.path} has no tensor {name}")
        layer, rest = int(match.group(1)), match.group(2)
        for old, new in _NORM_RENAMES:
            if rest.startswith(old):
                rest = new + rest[len(old):]
        expert = None
        if expert_match := _LOCAL_EXPERT.fullmatch(rest):
            expert = int(expert_match.group(2))
            rest = f"{expert_match.group(1)}experts.{expert_match.group(3)}"
        candidates = [(f"decoder.layers.{layer}.{rest}", None), (f"decoder.layers.{rest}", layer)]
        # A MoE layer's pre-MLP norm: the TE spec's own name (ders_megatron.io.layout).
        candidates += [(alias, i) for key, i in candidates if (alias := other_layout_key(key))]
        for key, layer_index in candidates:
            if key in self.metadata:
                return key, layer_index, expert
        tried = ", ".join(key for key, _ in candidates)
        raise CheckpointError(f"{self.path} has no tensor for {name} (looked for {tried})")

    def files_of(self, names) -> str:
        """Where the tensors ``names`` are stored (``KEY in DIR/FILE``), for error messages."""
        keys = dict.fromkeys(self.locate(name)[0] for name in names)
        return "; ".join(f"{key} in {', '.join(str(self.path / f) for f in storage_files(self.checkpoint_metadata, key))}"
                         for key in keys)

    def has(self, name: str) -> bool:
        try:
            self.locate(name)
        except CheckpointError:
            return False
        return True

    def read(self, names) -> dict[str, torch.Tensor]:
        """The tensors of ``names``, reading one slab per (key, layer) in as few passes as possible."""
        located = {name: self.locate(name) for name in dict.fromkeys(names)}
        slabs: dict[tuple[str, int | None], torch.Tensor] = {}
        pending = list(dict.fromkeys((key, layer) for key, layer, _ in located.values()))
        while pending:
            batch, seen = [], set()
            for slab in pending:
                if slab[0] not in seen:  # one chunk per key per DCP pass
                    batch.append(slab)
                    seen.add(slab[0])
            pending = [slab for slab in pending if slab not in batch]
            slabs.update(self._read_slabs(batch))
        out = {}
        for name, (key, layer, expert) in located.items():
            tensor = slabs[(key, layer)]
            out[name] = tensor if expert is None else tensor[expert]
        return out

    def _read_slabs(self, slabs) -> dict[tuple[str, int | None], torch.Tensor]:
        dests, offsets = {}, {}
        for key, layer in slabs:
            md = self.metadata[key]
            shape = list(md.size)
            start = [0] * len(shape)
            if layer is not None:
                shape[0], start[0] = 1, layer
            dests[key] = torch.empty(shape, dtype=md.properties.dtype)
            offsets[key] = tuple(start)
        with single_process_reads():
            reader = SafeFileSystemReader(str(self.path), self.checkpoint_metadata)  # no second unpickling
            try:
                dcp_load(dests, storage_reader=reader, planner=_ChunkPlanner(offsets), no_dist=True)
            except (Exception, CheckpointException) as err:  # DCP's is a BaseException; name the file
                files = sorted({f for key in dests for f in storage_files(self.checkpoint_metadata, key)})
                raise CheckpointError(f"could not read {sorted(dests)[:3]} from {self.path} ({', '.join(files)}): "
                                      f"{failure_line(err)} (a damaged checkpoint? re-copy it)") from err
        return {(key, layer): dests[key][0] if layer is not None else dests[key] for key, layer in slabs}
