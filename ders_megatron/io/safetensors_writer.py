"""One safetensors file written tensor by tensor, holding none of the tensors.

safetensors puts every tensor's offsets in the header, ahead of the data, and its
``save_file`` takes the whole dict at once: a writer of a 5 GB shard would hold 5 GB.
:class:`SafetensorsFileWriter` instead appends each tensor's bytes to a *spill* file
next to the output as soon as it is added (keeping only name, shape and the offset in
the spill) and, at :meth:`~SafetensorsFileWriter.close`, writes the header and then
copies the spilled bytes in the file's order, a chunk at a time
(:data:`CHUNK_BYTES`), through :func:`~ders_megatron.io.atomic.atomic_binary_file`.
Memory: one chunk, whatever the file's size. Disk: the spill and the file, until the
spill is removed at close (twice the file, transiently).

The bytes equal ``safetensors.torch.save_file``'s for the same tensors and metadata
(``tests/test_safetensors_writer.py`` compares them), as safetensors (0.8, Rust
``tensor.rs``: ``prepare`` and the header's ``Serialize``) writes a file:

* 8 bytes: the header's length, little-endian u64;
* the header: compact JSON, ``{"__metadata__": {...}, NAME: {"dtype": "F32", "shape":
  [...], "data_offsets": [BEGIN, END]}, ...}`` (no ``__metadata__`` without metadata),
  padded with spaces to a multiple of 8 bytes;
* the data: the tensors' bytes back to back in the header's order, which is by
  descending dtype (safetensors' ``Dtype`` enum order), then by name. That order and
  the dtype names are taken from safetensors itself (:func:`_safetensors_order`, a
  file of zero-element stand-ins), so they follow the installed version.

One difference: ``save_file`` writes the keys of a metadata dict of more than one key in
a random order (a Rust ``HashMap``); here they are written in the dict's order.
Tensors are written in this machine's byte order, as ``save_file`` does on the
little-endian machines it supports without a byte swap.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from ders_megatron.io.atomic import atomic_binary_file, temp_sibling

CHUNK_BYTES = 16 * 2**20  # the copy from the spill into the file, one chunk at a time
_HEADER_ALIGN = 8  # safetensors pads the header with spaces to a multiple of 8 bytes


@dataclass(frozen=True)
class _Spilled:
    """One added tensor: its dtype and shape, and where its bytes lie in the spill file."""

    dtype: torch.dtype
    shape: list[int]
    offset: int
    nbytes: int


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order, without a copy when it is a contiguous CPU tensor."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)  # [numel]
    return memoryview(flat.view(torch.uint8).numpy())  # [numel * element_size]


def _safetensors_order(dtypes: dict[str, torch.dtype]) -> list[tuple[str, str]]:
    """(name, safetensors dtype name) in the order safetensors writes these tensors: read
    off the header safetensors writes for zero-element stand-ins (the order depends on
    the dtypes and names only)."""
    stand_ins = {name: torch.empty(0, dtype=dtype) for name, dtype in dtypes.items()}
    raw = safetensors_bytes(stand_ins)
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    return [(name, info["dtype"]) for name, info in header.items() if name != "__metadata__"]


def safetensors_header(entries, metadata: dict[str, str] | None) -> bytes:
    """The length-prefixed, space-padded header for ``entries`` = (name, dtype name,
    shape, begin, end) in file order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata is not None else {}
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % _HEADER_ALIGN)
    return struct.pack("<Q", len(text)) + text


class SafetensorsFileWriter:
    """A safetensors file at ``path``, written tensor by tensor (:meth:`add`), complete at
    :meth:`close`; until then ``path`` is untouched (an existing file there is replaced
    at close). Used as a context manager, a failing block leaves nothing behind.
    The spill is a temporary sibling (``.NAME.tmp-HOST-PID-XXXXXXXX``), so the next
    atomic output into the same folder removes one a killed run left."""

    def __init__(self, path, metadata: dict[str, str] | None = None, chunk_bytes: int = CHUNK_BYTES):
        self.path = Path(path)
        self.metadata = metadata
        self.chunk_bytes = chunk_bytes
        self.nbytes = 0  # the tensors' bytes so far (the file's size less the header)
        self._spilled: dict[str, _Spilled] = {}  # name -> the tensor, in the order added
        self._spill_path = temp_sibling(self.path)
        self._spill = open(self._spill_path, "xb")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``'s bytes to the spill; nothing of it is kept in memory."""
        if name in self._spilled:
            raise ValueError(f"{self.path}: tensor {name!r} added twice")
        data = _raw_bytes(tensor)
        self._spill.write(data)
        self._spilled[name] = _Spilled(tensor.dtype, list(tensor.shape), self.nbytes, data.nbytes)
        self.nbytes += data.nbytes

    @property
    def names(self) -> list[str]:
        """The tensors added so far, in the order added."""
        return list(self._spilled)

    def close(self) -> Path:
        """Write ``path``: the header, then the spilled bytes in safetensors' order; remove the spill."""
        self._spill.close()
        try:
            entries, begin = [], 0
            for name, dtype in _safetensors_order({name: t.dtype for name, t in self._spilled.items()}):
                spilled = self._spilled[name]
                entries.append((name, dtype, spilled.shape, begin, begin + spilled.nbytes))
                begin += spilled.nbytes
            with open(self._spill_path, "rb", buffering=0) as spill, atomic_binary_file(self.path) as out:
                out.write(safetensors_header(entries, self.metadata))
                buffer = memoryview(bytearray(min(self.chunk_bytes, max(self.nbytes, 1))))
                for name, *_ in entries:
                    _copy_range(spill, out, self._spilled[name].offset, self._spilled[name].nbytes, buffer)
        finally:
            self._spill_path.unlink(missing_ok=True)
        return self.path

    def discard(self) -> None:
        """Drop what was added; ``path`` stays as it was."""
        self._spill.close()
        self._spill_path.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsFileWriter:
        return self

    def __exit__(self, kind, err, trace) -> None:
        if kind is None:
            self.close()
        else:
            self.discard()


def _copy_range(src, dst, offset: int, length: int, buffer: memoryview) -> None:
    """Copy ``length`` bytes at ``offset`` of ``src`` to ``dst``, a ``buffer`` at a time."""
    src.seek(offset)
    while length:
        count = src.readinto(buffer[:min(length, len(buffer))])
        if not count:
            raise OSError(f"{src.name}: ended {length} bytes early (the spill file was changed while writing)")
        dst.write(buffer[:count])
        length -= count
