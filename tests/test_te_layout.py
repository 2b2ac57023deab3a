"""Checkpoints for Transformer Engine models, tested without TE (issue 16, item 2).

What a TE model's checkpoint keys differ in is taken from megatron-core's own TE
spec functions (built through their spec provider class, which imports without
TE), not from ``ders_megatron.io.layout``'s rules; then every tool writes that
layout when the args record ``--transformer-impl transformer_engine`` and reads it
back: upcycle, compress, HF export and ``load_model`` give the same tensors and
logits as from the local layout.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch

from compress_helpers import batch, build, full_logits, save_dense, tiny_args

TE = "transformer_engine"


# --------------------------------------------------------------------------- #
# The expected TE key set, from megatron-core's spec definitions.
# --------------------------------------------------------------------------- #
@contextlib.contextmanager
def te_spec_functions():
    """megatron-core's gpt_layer_specs with its TE names bound as if TE were installed.

    Without TE the module sets ``TESpecProvider`` and ``TENorm`` to None
    (``models/gpt/gpt_layer_specs.py:54``); the provider class itself imports and
    returns TE's class names or placeholders, enough to read the spec's structure."""
    import megatron.core.models.gpt.gpt_layer_specs as specs
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    class TENormStandIn:  # the final norm's class in the TE block spec (gpt_layer_specs.py:709)
        pass

    saved = specs.TESpecProvider, specs.TENorm
    specs.TESpecProvider, specs.TENorm = TESpecProvider, TENormStandIn
    try:
        yield specs, TENormStandIn
    finally:
        specs.TESpecProvider, specs.TENorm = saved


def expected_te_layout(local_keys: set[str], local_objects: set[str], config) -> tuple[set[str], set[str]]:
    """(tensor keys, object keys) a TE model saves, from the local model's and the specs.

    Per layer kind: a norm that is its own module in the TE spec (not IdentityOp) is
    saved under its module name with TE's ``_extra_state``; the local spec saves every
    norm under its ``sharded_state_dict_keys_map`` name. Fused norms keep that name.
    """
    from megatron.core.transformer.identity_op import IdentityOp

    from ders_megatron.layers.specs import moe_layer_pattern

    with te_spec_functions() as (specs, te_norm):
        te = {kind: specs.get_gpt_layer_with_transformer_engine_submodules(num_experts=n)
              for kind, n in (("dense", None), ("moe", config.num_moe_experts))}
        block = specs.get_gpt_decoder_block_spec(config, use_transformer_engine=True, normalization="RMSNorm")
    local_map = specs.get_gpt_layer_local_submodules(num_experts=4).sharded_state_dict_keys_map
    assert block.layer_norm is te_norm  # the final norm is a TE norm
    pattern = moe_layer_pattern(config)
    stacked = not any(k.startswith("decoder.layers.0.") for k in local_keys)
    keys, objects = set(local_keys), set(local_objects)
    for layer, is_moe in enumerate(pattern):
        spec = te["moe" if is_moe else "dense"]
        where = "decoder.layers." if stacked else f"decoder.layers.{layer}."
        for norm in ("input_layernorm", "pre_mlp_layernorm"):
            if getattr(spec, norm) is IdentityOp:  # fused into the next TE linear: the local map's name
                continue
            local_prefix = where + local_map[f"{norm}."]
            for key in [k for k in keys if k.startswith(local_prefix)]:
                keys.remove(key)
                keys.add(where + f"{norm}." + key[len(local_prefix):])
            objects.add(where + f"{norm}._extra_state")
    objects.add("decoder.final_layernorm._extra_state")
    return keys, objects


def te_layout_matches_megatron_spec(moe_layer_freq):
    from ders_megatron.core.config import DeRSConfig, LowRankDeltaConfig
    from ders_megatron.io.layout import TE_IMPL, plan_in_layout
    from ders_megatron.io.streaming import build_model, plan_model
    from ders_megatron.testing.distributed import model_parallel

    args = tiny_args(["--num-experts", "4", "--moe-layer-freq", moe_layer_freq, "--moe-ders", "lowrank"])
    with model_parallel():
        plan = plan_model(build_model(args, DeRSConfig(delta=LowRankDeltaConfig(rank=2)), use_te=False))
        te_plan = plan_in_layout(plan, TE_IMPL)
        local_keys = {c.key for c in plan.chunks}
        want_keys, want_objects = expected_te_layout(local_keys, {o.key for o in plan.objects}, plan.config)
        got_objects = [(o.key, o.global_shape, o.global_offset) for o in te_plan.objects]
    assert {c.key for c in te_plan.chunks} == want_keys
    assert {key for key, _, _ in got_objects} == want_objects
    assert len(got_objects) == len(set(got_objects))  # one object per layer where the key is stacked
    return sorted(want_keys - local_keys), sorted({k for k, _, _ in got_objects} - {o.key for o in plan.objects})


@pytest.mark.parametrize("moe_layer_freq", ["1", "[0,1]"], ids=["all-moe-stacked", "mixed-per-layer"])
def test_te_layout_is_megatron_te_spec(dist1, moe_layer_freq):
    renamed, added = dist1.run(te_layout_matches_megatron_spec, moe_layer_freq)[0]
    assert renamed and all(".pre_mlp_layernorm." in key for key in renamed), renamed  # not vacuous
    assert "decoder.final_layernorm._extra_state" in added


# --------------------------------------------------------------------------- #
# Every tool, on both layouts.
# --------------------------------------------------------------------------- #
def checkpoint_content(root):
    """(tensor keys, object keys, impl recorded in args) of a checkpoint."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from ders_megatron.io.checkpoint import latest_dir, load_common, tensor_shapes
    from ders_megatron.io.safe_load import read_metadata

    objects = {k.split("/shard_")[0] for k, md in read_metadata(latest_dir(root)).state_dict_metadata.items()
               if isinstance(md, BytesStorageMetadata)}
    return set(tensor_shapes(root)), objects, load_common(root)["args"].transformer_impl


def logits_of(root):
    from ders_megatron.io.checkpoint import load_common, load_model
    from ders_megatron.testing.distributed import model_parallel

    args = load_common(root)["args"]
    with model_parallel(seed=11):  # another seed: everything comes from the file
        model = build(args)
        load_model(model, root)
        return full_logits(model, batch())


def tools_on_both_layouts(workdir):
    """dense -> upcycle (vanilla and DeRS-LM) -> compress, and HF export, once per impl."""
    from ders_megatron.convert.compress.pipeline import CompressConfig, compress_checkpoint
    from ders_megatron.convert.hf.exporter import export_hf
    from ders_megatron.convert.upcycle import UpcycleConfig, upcycle_checkpoint
    from ders_megatron.io.checkpoint import load_full_tensors, tensor_shapes
    from ders_megatron.io.layout import other_layout_key

    args = tiny_args()
    save_dense(f"{workdir}/dense", args)
    out = {}
    for impl in ("local", TE):
        d = f"{workdir}/{impl}"
        upcycle_checkpoint(f"{workdir}/dense", f"{d}/moe", UpcycleConfig(kind="vanilla", num_experts=4),
                           transformer_impl=impl)
        upcycle_checkpoint(f"{workdir}/dense", f"{d}/ders", UpcycleConfig(kind="lowrank", num_experts=4, rank=2),
                           transformer_impl=impl)
        compress_checkpoint(f"{d}/moe", f"{d}/compressed", CompressConfig(codecs="svd:2", base="mean"))
        export_hf(f"{d}/ders", f"{d}/hf", fmt="ders")
        out[impl] = {name: checkpoint_content(f"{d}/{name}") for name in ("moe", "ders", "compressed")}
        out[impl]["logits"] = {name: logits_of(f"{d}/{name}") for name in ("moe", "ders", "compressed")}
    # The same tensors under each layout's names.
    for name in ("moe", "ders", "compressed"):
        local_keys = sorted(tensor_shapes(f"{workdir}/local/{name}"))
        te_keys = [k if k in out[TE][name][0] else other_layout_key(k) for k in local_keys]
        local = load_full_tensors(f"{workdir}/local/{name}", local_keys)
        te = load_full_tensors(f"{workdir}/{TE}/{name}", te_keys)
        for a, b in zip(local_keys, te_keys):
            assert torch.equal(local[a], te[b]), (name, a, b)
    hf = {impl: {p.name: p.read_bytes() for p in Path(workdir, impl, "hf").iterdir() if p.suffix == ".safetensors"}
          for impl in ("local", TE)}
    return out, hf


def test_tools_write_and_read_the_te_layout(dist1, tmp_path):
    out, hf = dist1.run(tools_on_both_layouts, str(tmp_path))[0]
    for name in ("moe", "ders", "compressed"):
        local_keys, local_objects, local_impl = out["local"][name]
        te_keys, te_objects, te_impl = out[TE][name]
        assert (local_impl, te_impl) == ("local", TE), name  # the impl is recorded in the args
        moved = {k for k in local_keys if ".mlp.linear_fc1.layer_norm_" in k}
        assert moved and not moved & te_keys, name  # MoE layers' pre-MLP norm under TE's name...
        assert {k.replace("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm.") for k in moved} <= te_keys
        assert te_keys - local_keys == {k.replace("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm.")
                                        for k in moved}  # ...and nothing else differs
        assert te_objects - local_objects == {"decoder.layers.pre_mlp_layernorm._extra_state",
                                              "decoder.final_layernorm._extra_state"}, name
        # fp32 on one CPU, same tensors: the logits are bit-identical.
        assert torch.equal(out[TE]["logits"][name], out["local"]["logits"][name]), name
    assert hf["local"] and hf["local"] == hf[TE]  # HF export reads either layout to the same files


def missing_key_is_named(workdir):
    """A checkpoint lacking a tensor the model of its args needs: named before any output."""
    from ders_megatron.convert.compress.pipeline import CompressConfig, CompressError, compress_checkpoint
    from ders_megatron.convert.upcycle import UpcycleConfig, upcycle_checkpoint
    from ders_megatron.io.checkpoint import load_common, save_model
    from ders_megatron.testing.distributed import model_parallel

    args = tiny_args()
    save_dense(f"{workdir}/dense", args)
    upcycle_checkpoint(f"{workdir}/dense", f"{workdir}/moe", UpcycleConfig(kind="vanilla", num_experts=4),
                       transformer_impl=TE)
    # A model with tied embeddings saved under args that say untied: no output_layer.weight.
    moe_args = load_common(f"{workdir}/moe")["args"]
    tied = copy.copy(moe_args)
    tied.untie_embeddings_and_output_weights = False
    with model_parallel():
        save_model(build(tied), f"{workdir}/bad", args=moe_args)
    try:
        compress_checkpoint(f"{workdir}/bad", f"{workdir}/out", CompressConfig(codecs="svd:2", base="mean"))
    except CompressError as err:
        return str(err), Path(workdir, "out").exists()
    return "no error", None


def test_missing_tensor_is_named_before_any_work(dist1, tmp_path):
    message, wrote = dist1.run(missing_key_is_named, str(tmp_path))[0]
    assert "output_layer.weight" in message and "--transformer-impl transformer_engine" in message, message
    assert wrote is False


# --------------------------------------------------------------------------- #
# A TE-layout checkpoint saved by 2 ranks (TP=2, EP=2) feeds every tool.
# --------------------------------------------------------------------------- #
TWO_RANK_LAYOUTS = {"dense": dict(tp=2), "moe": dict(ep=2), "ders": dict(tp=2)}


def local_sources(workdir):
    """World size 1, local layout: dense -> upcycled vanilla MoE and DeRS-LM."""
    from ders_megatron.convert.upcycle import UpcycleConfig, upcycle_checkpoint

    save_dense(f"{workdir}/local/dense", tiny_args())
    upcycle_checkpoint(f"{workdir}/local/dense", f"{workdir}/local/moe", UpcycleConfig(kind="vanilla", num_experts=4))
    upcycle_checkpoint(f"{workdir}/local/dense", f"{workdir}/local/ders",
                       UpcycleConfig(kind="lowrank", num_experts=4, rank=2))


def resave_as_te_by_two_ranks(workdir):
    """Each local checkpoint loaded at a 2-rank layout and saved by both ranks, keyed for TE."""
    from ders_megatron.io.checkpoint import load_common, load_model, save_model
    from ders_megatron.testing.distributed import model_parallel
    from compress_helpers import args_at

    for name, layout in TWO_RANK_LAYOUTS.items():
        args = load_common(f"{workdir}/local/{name}")["args"]
        te_args = copy.copy(args)
        te_args.transformer_impl = TE
        with model_parallel(**layout):
            model = build(args, layout)
            load_model(model, f"{workdir}/local/{name}")
            save_model(model, f"{workdir}/te2/{name}", args=args_at(te_args, **layout))


def tools_read_two_rank_te(workdir):
    """Every tool on the 2-rank TE checkpoints gives what it gives on the local ones."""
    from ders_megatron.convert.compress.pipeline import CompressConfig, compress_checkpoint
    from ders_megatron.convert.hf.exporter import export_hf
    from ders_megatron.convert.upcycle import UpcycleConfig, upcycle_checkpoint
    from ders_megatron.io.checkpoint import load_full_tensors, tensor_shapes
    from ders_megatron.io.layout import other_layout_key

    def same_tensors(local_root, te_root):
        local_keys = sorted(tensor_shapes(local_root))
        te_names = set(tensor_shapes(te_root))
        te_keys = [k if k in te_names else other_layout_key(k) for k in local_keys]
        assert len(te_names) == len(te_keys), (local_root, te_root)
        local, te = load_full_tensors(local_root, local_keys), load_full_tensors(te_root, te_keys)
        for a, b in zip(local_keys, te_keys):
            assert torch.equal(local[a], te[b]), (te_root, a, b)

    from ders_megatron.io.checkpoint import load_common

    impls = {}
    for name, layout in TWO_RANK_LAYOUTS.items():
        keys, objects, impls[name] = checkpoint_content(f"{workdir}/te2/{name}")
        args = load_common(f"{workdir}/te2/{name}")["args"]
        saved_at = dict(tp=args.tensor_model_parallel_size, ep=args.expert_model_parallel_size)
        assert saved_at == {"tp": 1, "ep": 1, **layout}, (name, saved_at)
        assert "decoder.final_layernorm._extra_state" in objects, name  # TE's norm objects...
        assert name == "dense" or any(".pre_mlp_layernorm." in k for k in keys), name  # ...and MoE norm name
        same_tensors(f"{workdir}/local/{name}", f"{workdir}/te2/{name}")
        # fp32 on one CPU, same tensors: the logits are bit-identical.
        assert torch.equal(logits_of(f"{workdir}/te2/{name}"), logits_of(f"{workdir}/local/{name}")), name
    upcycle_checkpoint(f"{workdir}/te2/dense", f"{workdir}/out/moe", UpcycleConfig(kind="vanilla", num_experts=4),
                       transformer_impl="local")
    same_tensors(f"{workdir}/local/moe", f"{workdir}/out/moe")
    for src in ("local", "te2"):
        compress_checkpoint(f"{workdir}/{src}/moe", f"{workdir}/out/{src}-compressed",
                            CompressConfig(codecs="svd:2", base="mean"))
        export_hf(f"{workdir}/{src}/ders", f"{workdir}/out/{src}-hf", fmt="ders")
    same_tensors(f"{workdir}/out/local-compressed", f"{workdir}/out/te2-compressed")
    hf = [{p.name: p.read_bytes() for p in Path(workdir, "out", f"{src}-hf").iterdir() if p.suffix == ".safetensors"}
          for src in ("local", "te2")]
    assert hf[0] and hf[0] == hf[1]
    return impls


def test_te_layout_saved_by_two_ranks_feeds_every_tool(dist1, dist2, tmp_path):
    """Issue 16 item 2 at 2 ranks: a TE-keyed checkpoint written collectively at TP=2 (dense,
    DeRS) and EP=2 (vanilla MoE) holds the local checkpoint's tensors under TE's names, loads
    to the same logits, and upcycle / compress / HF export read it to the same outputs."""
    dist1.run(local_sources, str(tmp_path))
    dist2.run(resave_as_te_by_two_ranks, str(tmp_path))
    assert dist1.run(tools_read_two_rank_te, str(tmp_path))[0] == {name: TE for name in TWO_RANK_LAYOUTS}
