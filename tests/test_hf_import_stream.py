"""Streamed Hugging Face import (issue 18 item 1, issue 19 item 2): what it writes equals the
in-memory reference (:func:`~ders_megatron.convert.hf.importer.load_hf_weights`) in the
source's dtype, from sharded or single-file folders; bad input is one named line, exit 2,
nothing written. Peak memory: ``tests/test_convert_memory.py``."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ders_megatron.testing.hf import save_tiny_hf

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning",
    "ignore:The argument order of load has been changed:UserWarning",
)


# --------------------------------------------------------------------------- #
# Bodies for the rank pool
# --------------------------------------------------------------------------- #
def _streamed_and_reference(source, out, family, **kwargs):
    """(checkpoint tensors of the streamed import, the same keys from the in-memory
    reference model saved the old way, the checkpoint's args)."""
    from ders_megatron.convert.hf.dims import ModelDims
    from ders_megatron.convert.hf.importer import DTYPES, import_hf, load_hf_weights, read_hf_config
    from ders_megatron.convert.hf.megatron_model import gpt_from_dims
    from ders_megatron.io.checkpoint import load_common, load_full_tensors, save_model, tensor_shapes
    from ders_megatron.testing.distributed import model_parallel

    with model_parallel():
        import_hf(source, out, **kwargs)
        args = load_common(out)["args"]
        dims = ModelDims.from_hf_config(read_hf_config(source))
        dtype = DTYPES[kwargs["dtype"]] if kwargs.get("dtype") else args.params_dtype
        reference = gpt_from_dims(dims, params_dtype=dtype)
        load_hf_weights(reference, source, dims, family)
        save_model(reference, f"{out}-reference")
    keys = sorted(tensor_shapes(out))
    assert keys == sorted(tensor_shapes(f"{out}-reference"))
    got, want = load_full_tensors(out, keys), load_full_tensors(f"{out}-reference", keys)
    return {k: got[k] for k in keys}, {k: want[k] for k in keys}, args  # (load adds the common state)


def _bf16_folder(family: str, folder: Path, max_shard_size=None):
    model = save_tiny_hf(family, folder / "tmp")
    model.to(torch.bfloat16).save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((folder / "tmp" / name).read_bytes())
    return model


@pytest.mark.parametrize("family", ["qwen2", "qwen2_moe"])
def test_bf16_stays_bf16_and_equals_the_in_memory_import(dist1, tmp_path, family):
    """A bf16 folder, sharded with an index: the streamed checkpoint is bf16, bit-equal to the
    reference model of the same dtype filled in memory through the same key map."""
    source = tmp_path / "hf"
    _bf16_folder(family, source, max_shard_size="40KB")
    assert (source / "model.safetensors.index.json").is_file() and len(list(source.glob("*.safetensors"))) > 2
    got, want, args = dist1.run(_streamed_and_reference, str(source), str(tmp_path / "out"), family)[0]
    assert args.params_dtype == torch.bfloat16 and args.bf16  # upcycle / compress keep bf16
    for key in want:
        assert got[key].dtype == torch.bfloat16, key
        assert torch.equal(got[key], want[key]), key


def test_dtype_flag_converts(dist1, tmp_path):
    """--dtype float32 from a bf16 folder: every tensor upcast exactly (the reference is a
    float32 model filled from the bf16 tensors)."""
    source = tmp_path / "hf"
    _bf16_folder("llama", source)
    got, want, args = dist1.run(_streamed_and_reference, str(source), str(tmp_path / "out"), "llama",
                                dtype="float32")[0]
    assert args.params_dtype == torch.float32 and not args.bf16
    for key in want:
        assert got[key].dtype == torch.float32 and torch.equal(got[key], want[key]), key


# --------------------------------------------------------------------------- #
# Bad input: one line naming it, exit 2, nothing written
# --------------------------------------------------------------------------- #
def run_import(argv: list[str]):
    """``convert_hf import`` in this process: (exit status, stderr)."""
    from ders_megatron.cli.convert_hf import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = main(["import", *argv, "--no-progress"])
        except SystemExit as exit_:  # convert_hf exits through argparse
            code = exit_.code
    return code, err.getvalue()


def _edit_tensors(folder: Path, edit) -> Path:
    """Rewrite the folder's model.safetensors with ``edit(state)`` applied."""
    path = folder / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _set(key, value):
    def edit(state):
        state[key] = value(state[key]) if callable(value) else value
    return edit


QKV = "model.layers.1.self_attn.q_proj.weight"


def _nan(t):
    t = t.clone()
    t[3, 5] = float("nan")
    return t


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])


def _drop_shard(folder: Path) -> None:
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()


# name: (family, save_tiny_hf overrides, how the folder is damaged, what the message names)
BAD = {
    "sliding window": ("mistral", dict(sliding_window=16), None, "sliding_window=16"),
    "untied without lm_head": ("llama", dict(tie_word_embeddings=False),
                               lambda f: _edit_tensors(f, lambda s: s.pop("lm_head.weight")), "lm_head.weight"),
    "tied but lm_head differs": ("qwen2", {}, lambda f: _edit_tensors(
        f, lambda s: s.__setitem__("lm_head.weight", s["model.embed_tokens.weight"] + 1)), "tie_word_embeddings"),
    "missing shard": ("llama", {}, _drop_shard, "which is missing"),
    "shape against config.json": ("llama", {}, lambda f: _edit_config(f, intermediate_size=80), "config.json implies"),
    "dtype against config.json": ("llama", {}, lambda f: _edit_config(f, dtype="bfloat16"),
                                  "config.json declares dtype bfloat16"),
    "int32 weight": ("llama", {}, lambda f: _edit_tensors(f, _set(QKV, lambda t: (t * 100).to(torch.int32))),
                     f"tensor {QKV} is torch.int32"),
    "bool weight": ("mixtral", {}, lambda f: _edit_tensors(
        f, _set("model.layers.0.block_sparse_moe.gate.weight", lambda t: t > 0)), "model.layers.0.block_sparse_moe.gate.weight is torch.bool"),
    "float8 weight": ("llama", {}, lambda f: _edit_tensors(f, _set(QKV, lambda t: t.to(torch.float8_e4m3fn))),
                      "a quantized checkpoint"),
    "NaN weight": ("llama", {}, lambda f: _edit_tensors(f, _set(QKV, _nan)), f"tensor {QKV} holds NaN or Inf"),
    "truncated safetensors": ("llama", {}, _truncate, "model.safetensors is truncated"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_one_named_line_and_writes_nothing(dist1, tmp_path, name):
    family, overrides, damage, named = BAD[name]
    source = tmp_path / "hf"
    model = save_tiny_hf(family, source, **overrides)
    if name == "missing shard":
        model.save_pretrained(source, max_shard_size="40KB")
        (source / "model.safetensors").unlink()
    if damage is not None:
        damage(source)
    out = tmp_path / "out"
    code, stderr = dist1.run(run_import, ["--hf-dir", str(source), "--output", str(out)])[0]
    assert code == 2, stderr[-2000:]
    assert named in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert [line for line in stderr.splitlines() if "error" in line] == [stderr.strip().splitlines()[-1]], stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no output, no temporary left


def test_mixed_dtypes_need_the_dtype_flag(dist1, tmp_path):
    """One fp32 tensor in a bf16 folder is named; --dtype converts all to one dtype."""
    source = tmp_path / "hf"
    _bf16_folder("llama", source)
    _edit_tensors(source, _set(QKV, lambda t: t.float()))
    code, stderr = dist1.run(run_import, ["--hf-dir", str(source), "--output", str(tmp_path / "a")])[0]
    assert code == 2 and f"tensor {QKV} in model.safetensors is float32" in stderr, stderr
    code, stderr = dist1.run(run_import, ["--hf-dir", str(source), "--output", str(tmp_path / "b"),
                                          "--dtype", "bfloat16"])[0]
    assert code == 0, stderr


def _import(source, out):
    from ders_megatron.convert.hf.importer import import_hf
    from ders_megatron.testing.distributed import model_parallel

    with model_parallel():
        import_hf(source, out)


def _load(out, ids, layout):
    from ders_megatron.testing.hf import checkpoint_logits

    return checkpoint_logits(out, ids, layout=layout)


def test_bf16_moe_import_loads_at_tp2_ep2_into_float32(dist1, dist2, tmp_path):
    """The bf16 checkpoint loads into a float32 model at TP=2, EP=2 (megatron's loader casts):
    logits are HF's on the same bf16-rounded weights in float32."""
    from ders_megatron.testing.hf import hf_logits, tokens

    source, out = tmp_path / "hf", tmp_path / "out"
    model = _bf16_folder("qwen2_moe", source)  # now bf16 (Module.to is in place)
    ids = tokens()
    dist1.run(_import, str(source), str(out))
    got = dist2.run(_load, str(out), ids, dict(tp=2, ep=2, etp=1))
    reference = hf_logits(model.float(), ids)
    # float32 on both sides from the same weights: as tests/test_hf_import.py (MoE sums reordered, TP split).
    for logits in got:
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
