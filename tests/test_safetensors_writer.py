"""The streamed safetensors writer (ders_megatron/io/safetensors_writer.py, issue 18):
its file is byte for byte what safetensors.torch.save_file writes for the same tensors,
so an export through it hashes as before (tests/test_golden_outputs.py), and it leaves
nothing behind but the finished file."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from ders_megatron.convert.hf.hf_files import ShardedSafetensorsWriter
from ders_megatron.io.safetensors_writer import SafetensorsFileWriter


def _mixed_tensors() -> dict[str, torch.Tensor]:
    """Every dtype width safetensors orders by, names out of order, a scalar, an empty
    tensor, a non-contiguous one (written as its contiguous copy)."""
    gen = torch.Generator().manual_seed(0)
    return {
        "model.layers.1.mlp.w": torch.randn(5, 7, generator=gen).to(torch.bfloat16),
        "a.bias": torch.randn(3, generator=gen),
        "z.index": torch.randint(0, 1000, (4,), generator=gen),
        "scale": torch.tensor(2.5, dtype=torch.float16),
        "empty": torch.empty(0, 3),
        "mask": torch.rand(6, generator=gen) > 0.5,
        "q.int8": torch.randint(-100, 100, (3, 3), dtype=torch.int8, generator=gen),
        "q.uint8": torch.randint(0, 255, (2, 5), dtype=torch.uint8, generator=gen),
        "wide": torch.randn(2, 2, dtype=torch.float64, generator=gen),
        "fp8": torch.randn(9, generator=gen).to(torch.float8_e4m3fn),
        "count": torch.randint(0, 9, (2,), dtype=torch.int32, generator=gen),
        "half": torch.randn(3, 1, generator=gen).to(torch.float16),
        "transposed": torch.randn(4, 6, generator=gen).t(),
    }


@pytest.mark.parametrize("metadata", [{"format": "pt"}, None])
@pytest.mark.parametrize("chunk_bytes", [3, 2**20])  # 3: every tensor spans several chunks
def test_file_equals_save_file(tmp_path, metadata, chunk_bytes):
    tensors = _mixed_tensors()
    save_file({name: t.contiguous() for name, t in tensors.items()}, tmp_path / "reference.safetensors",
              metadata=metadata)
    with SafetensorsFileWriter(tmp_path / "streamed.safetensors", metadata=metadata, chunk_bytes=chunk_bytes) as w:
        for name, tensor in tensors.items():
            w.add(name, tensor)
        assert not (tmp_path / "streamed.safetensors").exists()  # complete at close, not before
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference.safetensors", "streamed.safetensors"]


def test_no_tensors_equals_save_file(tmp_path):
    save_file({}, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    with SafetensorsFileWriter(tmp_path / "streamed.safetensors", metadata={"format": "pt"}):
        pass
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="stop"):
        with SafetensorsFileWriter(tmp_path / "out.safetensors") as w:
            w.add("a", torch.ones(3))
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_duplicate_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'a' added twice"):
        with SafetensorsFileWriter(tmp_path / "out.safetensors") as w:
            w.add("a", torch.ones(3))
            w.add("a", torch.ones(3))
    assert list(tmp_path.iterdir()) == []


def test_sharded_writer_splits_at_the_limit(tmp_path):
    """Shards as before (a tensor that would overflow the open shard starts the next),
    each file save_file's bytes, no spill left (the memory it saves:
    tests/test_convert_memory.py)."""
    tensors = {f"t{i}": torch.full((4,), float(i)) for i in range(5)}  # 16 bytes each
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=40)  # two tensors a shard
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    paths = writer.finish()
    assert [p.name for p in paths] == [f"model-0000{n}-of-00003.safetensors" for n in (1, 2, 3)]
    for path, names in zip(paths, (["t0", "t1"], ["t2", "t3"], ["t4"])):
        save_file({n: tensors[n] for n in names}, tmp_path / "reference", metadata={"format": "pt"})
        assert path.read_bytes() == (tmp_path / "reference").read_bytes()
        assert list(load_file(path)) == names
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [p.name for p in paths] + ["model.safetensors.index.json", "reference"])
