"""The megatron.training checkpoint layout our tools share with the training script."""

import pytest
import torch

from ders_megatron.io.checkpoint import (
    CheckpointError,
    atomic_output_dir,
    latest_dir,
    load_common,
    load_full_tensors,
    tensor_shapes,
)


def save_tiny_gpt(root):
    import argparse

    from ders_megatron.io.checkpoint import save_model
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.testing.models import build_gpt, tiny_config
    from ders_megatron.testing.sharding import full_tensors

    with model_parallel(tp=2, seed=3):
        model = build_gpt(tiny_config())
        save_model(model, root, args=argparse.Namespace(hidden_size=32), iteration=5)
        return full_tensors(model)


def test_save_at_tp2_then_read_whole_tensors_in_one_process(dist2, tmp_path):
    full = dist2.run(save_tiny_gpt, str(tmp_path))[0]
    assert latest_dir(tmp_path).name == "iter_0000005"
    assert load_common(tmp_path)["args"].hidden_size == 32
    shapes = tensor_shapes(tmp_path)
    # megatron stacks the layers of a block on a leading axis in checkpoint keys.
    key = "decoder.layers.self_attention.linear_qkv.weight"
    assert tuple(shapes[key][0]) == (2, *full["decoder.layers.1.self_attention.linear_qkv.weight"].shape)
    loaded = load_full_tensors(tmp_path, [key, "embedding.word_embeddings.weight"])
    for layer in range(2):
        assert torch.equal(loaded[key][layer], full[f"decoder.layers.{layer}.self_attention.linear_qkv.weight"])
    with pytest.raises(CheckpointError, match="has no tensors"):
        load_full_tensors(tmp_path, ["no.such.key"])


def test_missing_and_truncated_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        latest_dir(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no latest_checkpointed_iteration.txt"):
        latest_dir(tmp_path)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7")
    (tmp_path / "iter_0000007").mkdir()
    with pytest.raises(CheckpointError, match="incomplete"):
        latest_dir(tmp_path)


def test_atomic_output_dir_leaves_nothing_on_failure_and_needs_force(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(out) as tmp:
        (tmp / "done").write_text("1")
    with pytest.raises(CheckpointError, match="--force"):
        with atomic_output_dir(out):
            pass
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
