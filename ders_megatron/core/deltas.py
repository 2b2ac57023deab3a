"""DeRS delta kinds: light per-expert deltas over one shared base weight.

Every expert matrix is ``W_e = W_base + Δ_e`` (paper Eq. 2-4). This module holds
the Δ_e of all local experts for ONE matrix (fc1 or fc2) and knows nothing of
ranks: tensor parallelism asks for a ``rows``/``cols`` slice of Δ_e that matches
its base shard, expert parallelism decides which global experts to build
(:mod:`ders_megatron.layers.experts` does both).

Kinds (their config dataclasses, validated with errors that name the flag, are in
:mod:`ders_megatron.core.config`, which builds these modules):

* ``lowrank`` (DeRS-LM): Δ_e = s · B_e A_e, rank r, A random (LoRA's
  kaiming-uniform), B zero, so Δ_e = 0 at step 0; s = α / r if α is given.
* ``sparse`` (DeRS-SM): trainable values at a fixed random set of positions,
  density 1 - p; zero-initialised; positions derived from a seed plus
  (layer, expert, matrix), so checkpoints store the seed, not the indices.
  Applied by sparse kernels (:mod:`ders_megatron.core.sparse_product`) over a
  CSR index built once per device, never as a dense Δ (also ``magnitude``).
* ``dense``: a full Δ_e (vanilla upcycling written as base + delta); the
  reference every light kind is tested against.

Shapes: ``E`` local experts, ``O`` out features, ``I`` in features, ``T`` tokens,
``R`` rank, ``K`` kept values per matrix.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from torch import nn

from ders_megatron.core.sparse_product import SparseIndex, build_sparse_index, sparse_apply

def derive_seed(seed: int, layer: int, expert: int, matrix: str) -> int:
    """A stable 63-bit seed for one (layer, global expert, matrix): same on every rank."""
    digest = hashlib.sha256(f"{seed}/{layer}/{expert}/{matrix}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _as_slice(index: slice | None, size: int) -> tuple[int, int]:
    start, stop, step = (index or slice(None)).indices(size)
    if step != 1:
        raise ValueError("delta slices must be contiguous")
    return start, stop


# --------------------------------------------------------------------------- #
# Modules
# --------------------------------------------------------------------------- #
class ExpertDeltas(nn.Module):
    """Δ_e for the experts ``expert_ids`` (global indices) of one [O, I] matrix.

    The one delta API (as PEFT's LoRA layer): :meth:`delta_weight`,
    :meth:`apply_delta`, :meth:`merge`, :meth:`num_values`, :meth:`index_bytes`.
    """

    def __init__(self, config, expert_ids, out_features, in_features, *, seed, matrix, dtype):
        super().__init__()
        self.config = config
        self.expert_ids = list(expert_ids)
        self.out_features = out_features
        self.in_features = in_features
        self.matrix = matrix
        self.seed = seed
        self.dtype = dtype
        self.layer = 0

    @property
    def num_experts(self) -> int:
        return len(self.expert_ids)

    def expert_seed(self, local_expert: int) -> int:
        return derive_seed(self.seed, self.layer, self.expert_ids[local_expert], self.matrix)

    def set_layer_number(self, layer: int) -> None:
        """Positions and random init depend on the global layer: re-derive them."""
        self.layer = layer
        self.reset_parameters()

    def reset_parameters(self) -> None:
        raise NotImplementedError

    def delta_weight(self, expert: int, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """Δ_e[rows, cols] as a dense [O', I'] tensor, accumulated in fp32."""
        raise NotImplementedError

    def apply_delta(self, x: torch.Tensor, expert: int, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """x @ Δ_e[rows, cols]^T for x [T, I'] -> [T, O'], without materializing Δ where avoidable."""
        return x @ self.delta_weight(expert, rows, cols).to(x.dtype).t()

    @torch.no_grad()
    def merge(self, base: torch.Tensor, expert: int, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """W_base + Δ_e[rows, cols] in fp32, cast back to the base dtype; refuses non-finite
        results. ``base`` is the matching [O', I'] slice (e.g. this rank's TP shard)."""
        merged = base.float() + self.delta_weight(expert, rows, cols).float()
        if not torch.isfinite(merged).all():
            raise ValueError(f"merging the {self.matrix} delta of expert {self.expert_ids[expert]} gives non-finite values")
        return merged.to(base.dtype)

    def num_values(self) -> int:
        """Trainable/stored values (the paper's "added parameters" of this matrix)."""
        return sum(p.numel() for p in self.parameters())

    def index_bytes(self) -> int:
        """Bytes of fixed position metadata stored in a checkpoint (not parameters)."""
        return 0


class LowRankDeltas(ExpertDeltas):
    def __init__(self, config, expert_ids, out_features, in_features, *, seed, matrix, dtype):
        super().__init__(config, expert_ids, out_features, in_features, seed=seed, matrix=matrix, dtype=dtype)
        if config.rank > min(out_features, in_features):
            raise ValueError(
                f"--moe-ders-rank {config.rank} exceeds min(out, in) = "
                f"{min(out_features, in_features)} of the {matrix} matrix [{out_features}, {in_features}]"
            )
        self.scale = config.scale
        E, R = self.num_experts, config.rank
        self.lora_A = nn.Parameter(torch.empty(E, R, in_features, dtype=dtype))  # [E, R, I]
        self.lora_B = nn.Parameter(torch.empty(E, out_features, R, dtype=dtype))  # [E, O, R]
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # LoRA's init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(I), 1/sqrt(I)); B = 0.
        bound = 1.0 / math.sqrt(self.in_features)
        for e in range(self.num_experts):
            gen = _generator(self.expert_seed(e))
            a_RI = torch.rand(self.lora_A.shape[1:], generator=gen, dtype=torch.float32) * 2 * bound - bound
            self.lora_A[e].copy_(a_RI)
        self.lora_B.zero_()

    def delta_weight(self, expert, rows=None, cols=None):
        b_OR = self.lora_B[expert, rows or slice(None)].float()
        a_RI = self.lora_A[expert, :, cols or slice(None)].float()
        return self.scale * (b_OR @ a_RI)

    def apply_delta(self, x, expert, rows=None, cols=None):
        a_RI = self.lora_A[expert, :, cols or slice(None)]
        b_OR = self.lora_B[expert, rows or slice(None)]
        return (x @ a_RI.t()) @ b_OR.t() * self.scale  # [T, R] then [T, O']


class PositionDeltas(ExpertDeltas):
    """Values at K fixed positions per expert (``sparse``/``dare``, ``magnitude``), applied
    through :mod:`ders_megatron.core.sparse_product`: no dense [O, I] Δ in any product.

    The positions of each (expert, slice) become a :class:`SparseIndex` once, on the
    values' device (a model moved to another device rebuilds it there on its next
    call); :meth:`prepare_index` builds them ahead (``DeRSExperts`` does at layer-number
    set-up and the kinds do again after a load), so a training step does no host work,
    no host-to-device copy and no device sync for them. Subclasses give the sorted
    flat positions (:meth:`flat_positions`) and the key that changes with them
    (:meth:`positions_key`).
    """

    def __init__(self, config, expert_ids, out_features, in_features, *, seed, matrix, dtype):
        super().__init__(config, expert_ids, out_features, in_features, seed=seed, matrix=matrix, dtype=dtype)
        self.kept = config.kept(out_features, in_features)
        self.values = nn.Parameter(torch.zeros(self.num_experts, self.kept, dtype=dtype))  # [E, K]
        self._indexes: dict[tuple, SparseIndex] = {}  # (expert, slice bounds) -> index
        self._indexes_key: tuple | None = None  # positions_key() the cached indexes belong to
        self._prepared: dict[tuple, bool] = {}  # slice bounds (r0, r1, c0, c1) to rebuild eagerly -> with Δᵀ

    def flat_positions(self, expert: int) -> torch.Tensor:
        """Sorted flat positions [K] in [0, O·I) of one local expert (any device)."""
        raise NotImplementedError

    def positions_key(self) -> tuple:
        """Changes whenever the positions do (a cache key; no device sync)."""
        raise NotImplementedError

    def sparse_index(self, expert: int, rows=None, cols=None) -> SparseIndex:
        """The CSR index of expert ``expert``'s kept entries inside Δ_e[rows, cols]."""
        bounds = _as_slice(rows, self.out_features) + _as_slice(cols, self.in_features)
        positions_key = self.positions_key()
        if self._indexes_key != positions_key:  # positions changed: drop every stale index
            self._indexes.clear()
            self._indexes_key = positions_key
        key = (expert, bounds)
        index = self._indexes.get(key)
        device = self.values.device
        if index is None or index.device != device:
            flat = self.flat_positions(expert).to(device)
            index = build_sparse_index(flat, self.out_features, self.in_features, bounds[:2], bounds[2:])
            self._indexes[key] = index
        return index

    def prepare_index(self, rows=None, cols=None, *, transposed: bool = True) -> None:
        """Build the indexes of every local expert for this slice now (and after each load);
        ``transposed``: Δᵀ's side too (False where another index runs the transposed products:
        the SwiGLU kernel's stacked gate/up index; 8 bytes per kept value saved)."""
        bounds = _as_slice(rows, self.out_features) + _as_slice(cols, self.in_features)
        self._prepared[bounds] = self._prepared.get(bounds, False) or transposed  # any caller's need holds
        if self.values.is_meta:  # a shape-only model (built under torch.device("meta")): nothing to index
            return
        for e in range(self.num_experts):
            index = self.sparse_index(e, rows, cols)
            if transposed:
                index.transposed()

    def _rebuild_indexes(self) -> None:
        self._indexes.clear()
        for (r0, r1, c0, c1), transposed in list(self._prepared.items()):
            self.prepare_index(slice(r0, r1), slice(c0, c1), transposed=transposed)

    def positions(self, expert: int, rows=None, cols=None):
        """(row, col, value index) of the kept entries inside Δ_e[rows, cols], slice-relative;
        int64 copies (the index keeps int32), safe for callers' arithmetic such as row·I + col."""
        index = self.sparse_index(expert, rows, cols)
        value_index = index.value_index_K
        if value_index is None:
            value_index = torch.arange(index.nnz, device=index.device)
        return index.rows().long(), index.col_K.long(), value_index.long()

    def delta_weight(self, expert, rows=None, cols=None):
        index = self.sparse_index(expert, rows, cols)
        return index.dense(index.values(self.values[expert]))

    def apply_delta(self, x, expert, rows=None, cols=None):
        index = self.sparse_index(expert, rows, cols)
        return sparse_apply(x, index.values(self.values[expert]), index)

    def num_values(self) -> int:
        return self.values.numel()


class SparseDeltas(PositionDeltas):
    """DeRS-SM: positions re-derived from the seed; a checkpoint stores the seed, not them.

    The seed lives twice: the ``position_seed`` buffer (the checkpointed form, 8 bytes,
    format unchanged) and a Python int read from it once per load, so no call reads a
    device tensor back to the host.
    """

    def __init__(self, config, expert_ids, out_features, in_features, *, seed, matrix, dtype):
        super().__init__(config, expert_ids, out_features, in_features, seed=seed, matrix=matrix, dtype=dtype)
        self.register_buffer("position_seed", torch.tensor([seed], dtype=torch.int64))
        self.position_seed_value = int(seed)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.values.zero_()
        self._rebuild_indexes()

    def positions_key(self) -> tuple:
        return (self.position_seed_value, self.layer)

    def flat_positions(self, expert: int) -> torch.Tensor:
        expert_seed = derive_seed(self.position_seed_value, self.layer, self.expert_ids[expert], self.matrix)
        return sample_unique(self.out_features * self.in_features, self.kept, expert_seed)

    def index_bytes(self) -> int:
        return self.position_seed.numel() * 8

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.position_seed_value = int(self.position_seed.cpu()[0])  # once per load: positions follow it
        self._rebuild_indexes()


class DenseDeltas(ExpertDeltas):
    def __init__(self, config, expert_ids, out_features, in_features, *, seed, matrix, dtype):
        super().__init__(config, expert_ids, out_features, in_features, seed=seed, matrix=matrix, dtype=dtype)
        self.weight = nn.Parameter(torch.zeros(self.num_experts, out_features, in_features, dtype=dtype))  # [E, O, I]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.zero_()

    def delta_weight(self, expert, rows=None, cols=None):
        return self.weight[expert, rows or slice(None), cols or slice(None)].float()

    def apply_delta(self, x, expert, rows=None, cols=None):
        return x @ self.weight[expert, rows or slice(None), cols or slice(None)].to(x.dtype).t()


def sample_unique(n: int, k: int, seed: int) -> torch.Tensor:
    """k distinct integers from [0, n), uniformly, deterministic in ``seed``; sorted.

    Draws with replacement and keeps first appearances (duplicates are rare for
    k << n), topping up until k are found: O(k) memory instead of randperm's O(n).
    """
    if k > n:
        raise ValueError(f"cannot keep {k} positions of {n}")
    rng = np.random.default_rng(seed)
    if 2 * k > n:
        return torch.from_numpy(np.sort(rng.permutation(n)[:k])).long()
    picked = np.empty(0, dtype=np.int64)
    while picked.size < k:
        draw = np.concatenate([picked, rng.integers(0, n, size=2 * (k - picked.size) + 16)])
        _, first = np.unique(draw, return_index=True)
        picked = draw[np.sort(first)]
    return torch.from_numpy(np.sort(picked[:k])).long()


# =========================================================================== #
# Compressed delta kinds (DeRS compression of trained experts)
#
# Built by ders_megatron.convert.compress from trained deltas; the same API, so
# DeRSExperts runs them for inference and keeps training the float parts.
# Fixed parts (quantized codes, explicit indices) are parameters with
# requires_grad=False so DeRSExperts shards them over EP like the trainable
# ones (its sharded_state_dict replicates buffers); megatron's DDP and
# optimizer skip them (distributed_data_parallel.py:115, optimizer/__init__.py:330).
# =========================================================================== #
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [..., N] < 2**bits into uint8 [..., ceil(N*bits/8)], little-endian."""
    shift = torch.arange(bits, dtype=torch.int32, device=codes.device)
    stream = ((codes.to(torch.int32).unsqueeze(-1) >> shift) & 1).flatten(-2)  # [..., N*bits]
    pad = (-stream.shape[-1]) % 8
    stream = torch.nn.functional.pad(stream, (0, pad)).unflatten(-1, (-1, 8))
    return (stream << torch.arange(8, dtype=torch.int32, device=codes.device)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 codes [..., count]."""
    bit_of_byte = torch.arange(8, dtype=torch.int32, device=packed.device)  # on the codes' device (CUDA too)
    stream = ((packed.to(torch.int32).unsqueeze(-1) >> bit_of_byte) & 1).flatten(-2)
    stream = stream[..., : count * bits].unflatten(-1, (count, bits))
    return (stream << torch.arange(bits, dtype=torch.int32, device=packed.device)).sum(-1)


class QuantDeltas(ExpertDeltas):
    """Packed k-bit codes [E, O, ceil(I*k/8)] uint8 (fixed) + per-group float32 scales
    [E, O, I/G] (trainable) and, for k >= 2, offsets ``lo`` [E, O, I/G] (trainable)."""

    def __init__(self, config, expert_ids, out_features, in_features, *, seed, matrix, dtype):
        super().__init__(config, expert_ids, out_features, in_features, seed=seed, matrix=matrix, dtype=dtype)
        self.bits = config.bits
        self.group = config.group(in_features, matrix)
        E, groups = self.num_experts, in_features // self.group
        row_bytes = (in_features * self.bits + 7) // 8
        self.codes = nn.Parameter(torch.zeros(E, out_features, row_bytes, dtype=torch.uint8), requires_grad=False)
        self.scales = nn.Parameter(torch.zeros(E, out_features, groups, dtype=torch.float32))
        if self.bits > 1:
            self.offsets = nn.Parameter(torch.zeros(E, out_features, groups, dtype=torch.float32))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for param in self.parameters():
            param.zero_()

    def _apply(self, fn, recurse=True):
        """Moves and casts as ``nn.Module._apply``, except that the group scales and offsets
        stay fp32 under a cast to fp16/bf16.

        megatron's ``Float16Module`` casts the whole model with ``module.bfloat16()`` /
        ``.half()`` (``transformer/module.py:457-467``), which would round every scale to
        8 bits of mantissa: a k-bit code's step is only as fine as its scale. megatron keeps
        its own fp32 router state by casting it back (``moe/router.py:259-275``); keeping the
        cast from happening loses nothing. DDP and the optimizer take fp32 parameters beside
        bf16 ones (buffers per dtype), and :meth:`delta_weight` computes in fp32 anyway."""
        keep = {id(t) for p in self._fp32_parts() for t in (p, p.grad) if t is not None}

        def apply_keeping_fp32(t):
            out = fn(t)
            if id(t) in keep and out.dtype in (torch.float16, torch.bfloat16):
                return t.to(device=out.device)  # the move, without the cast
            return out

        return super()._apply(apply_keeping_fp32, recurse)

    def _fp32_parts(self) -> list[nn.Parameter]:
        return [self.scales] + ([self.offsets] if self.bits > 1 else [])

    def delta_weight(self, expert, rows=None, cols=None):
        rows = rows or slice(None)
        q_OI = unpack_bits(self.codes[expert, rows], self.bits, self.in_features).float()
        q_OGS = q_OI.unflatten(-1, (-1, self.group))  # [O', groups, G]
        scale = self.scales[expert, rows].float().unsqueeze(-1)
        if self.bits == 1:
            dense = (2.0 * q_OGS - 1.0) * scale  # sign * scale (BitDelta)
        else:
            dense = self.offsets[expert, rows].float().unsqueeze(-1) + q_OGS * scale
        return dense.flatten(-2)[:, cols or slice(None)]

    def num_values(self) -> int:
        """Stored scalars: one k-bit code per element plus the group scales/offsets."""
        codes = self.num_experts * self.out_features * self.in_features
        return codes + sum(p.numel() for p in self.parameters() if p.dtype.is_floating_point)


class IndexedSparseDeltas(PositionDeltas):
    """Values [E, K] (trainable) at sorted flat positions ``indices`` [E, K] (fixed, stored)."""

    def __init__(self, config, expert_ids, out_features, in_features, *, seed, matrix, dtype):
        super().__init__(config, expert_ids, out_features, in_features, seed=seed, matrix=matrix, dtype=dtype)
        index_dtype = torch.int32 if out_features * in_features <= 2**31 - 1 else torch.int64
        self.indices = nn.Parameter(
            torch.arange(self.kept, dtype=index_dtype, device=self.values.device).repeat(self.num_experts, 1), requires_grad=False
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.values.zero_()
        self.indices.copy_(torch.arange(self.kept, dtype=self.indices.dtype, device=self.indices.device).expand_as(self.indices))
        self._rebuild_indexes()

    def positions_key(self) -> tuple:
        # Every write to the indices (a load, a codec's encode) bumps the tensor's version.
        return (id(self.indices), self.indices._version)

    def flat_positions(self, expert: int) -> torch.Tensor:
        return self.indices[expert]

    def index_bytes(self) -> int:
        return self.indices.numel() * self.indices.element_size()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._rebuild_indexes()


_MODULES = {"lowrank": LowRankDeltas, "sparse": SparseDeltas, "dense": DenseDeltas, "quant": QuantDeltas,
            "magnitude": IndexedSparseDeltas}


def build_deltas(config, expert_ids, out_features: int, in_features: int, *, seed: int, matrix: str,
                 dtype=torch.float32) -> ExpertDeltas:
    """The delta module of ``config`` (a delta-kind config of :mod:`ders_megatron.core.config`;
    a per-matrix config picks ``matrix``'s) for the global experts ``expert_ids`` of one
    [out, in] matrix."""
    if config.kind == "mixed":
        config = config.for_matrix(matrix)
    return _MODULES[config.kind](config, expert_ids, out_features, in_features, seed=seed, matrix=matrix,
                                 dtype=dtype)


@torch.no_grad()
def merge_ffn(deltas, expert: int, fc1_weight: torch.Tensor, fc2_weight: torch.Tensor,
              slices: dict | None = None) -> dict[str, torch.Tensor]:
    """W_e = W_base + Δ_e for one FFN, keyed like megatron's MLP parameters: ``deltas`` maps
    matrix names (``fc1_gate``/``fc1_up``, or ``fc1``; ``fc2``) to delta modules; ``fc1_weight``
    [F·(2 if gated), H] is megatron's [gate; up] layout; ``slices``: matrix -> (rows, cols) of
    a tensor-parallel shard (None: whole matrices). fp32 merge with a finite check."""
    slices = slices or {}
    if "fc1_gate" in deltas:
        gate, up = torch.chunk(fc1_weight, 2, dim=0)
        fc1 = torch.cat([deltas["fc1_gate"].merge(gate, expert, *slices.get("fc1_gate", ())),
                         deltas["fc1_up"].merge(up, expert, *slices.get("fc1_up", ()))])
    else:
        fc1 = deltas["fc1"].merge(fc1_weight, expert, *slices.get("fc1", ()))
    fc2 = deltas["fc2"].merge(fc2_weight, expert, *slices.get("fc2", ()))
    return {"linear_fc1.weight": fc1, "linear_fc2.weight": fc2}
