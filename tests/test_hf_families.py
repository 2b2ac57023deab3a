"""The Hugging Face families beyond Llama / Mixtral: what converts (Qwen3, Qwen3-MoE, with
per-head QK-norm; OLMoE, with QK-norm over all heads; logits and round trips are in
test_hf_import.py / test_hf_export.py, parametrized over ``TINY_FAMILIES``), what is refused
by name and why (DeepSeek's MLA, OLMoE's clip_qkv, sliding windows, contradictory embedding
ties), and ``--hf-dir`` given a repo id from the local Hugging Face cache."""

import json

import pytest
import torch

from ders_megatron.testing.hf import save_tiny_hf, tiny_hf_model

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning",
    "ignore:The argument order of load has been changed:UserWarning",
)


def _refused(tmp_path, source, match):
    """import_hf and the CLI refuse ``source`` (exit 2), naming ``match``; nothing written."""
    from ders_megatron.cli.convert_hf import main
    from ders_megatron.convert.hf.dims import ConversionError
    from ders_megatron.convert.hf.importer import import_hf

    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ConversionError, match=match):
        import_hf(source, tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        main(["import", "--hf-dir", str(source), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("config_name, kwargs, match", [
    ("DeepseekV3Config", dict(n_routed_experts=4, num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=8),
     "'deepseek_v3' is not converted: multi-head latent attention \\(MLA\\)"),
    ("DeepseekV2Config", dict(n_routed_experts=4, num_experts_per_tok=2), "'deepseek_v2' is not converted: "
     "multi-head latent attention"),
])
def test_families_megatron_cannot_build_here_are_refused_by_name(tmp_path, config_name, kwargs, match):
    import transformers

    config = getattr(transformers, config_name)(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2, **kwargs)
    config.save_pretrained(tmp_path / "hf")
    _refused(tmp_path, tmp_path / "hf", match)


def test_transformers_olmoe_norms_the_full_projection_not_each_head():
    """Why OLMoE needs --ders-qk-layernorm-width full: its q_norm spans num_heads * head_dim
    (megatron's --qk-layernorm: head_dim), so a per-head norm could not hold its weights."""
    qwen3 = tiny_hf_model("qwen3").model.layers[0].self_attn  # per head, as megatron
    assert qwen3.q_norm.weight.shape == qwen3.k_norm.weight.shape == (qwen3.head_dim,)
    from transformers import OlmoeConfig, OlmoeForCausalLM

    olmoe = OlmoeForCausalLM(OlmoeConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                         num_experts_per_tok=2))
    attention = olmoe.model.layers[0].self_attn
    assert attention.q_norm.weight.shape == (4 * attention.head_dim,)
    assert attention.k_norm.weight.shape == (2 * attention.head_dim,)


@pytest.mark.parametrize("family, overrides, match", [
    ("qwen3", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0), "use_sliding_window"),
    ("qwen3", dict(layer_types=["sliding_attention", "full_attention"], sliding_window=8), "sliding"),
    ("qwen3_moe", dict(use_sliding_window=True, sliding_window=8), "use_sliding_window"),
    ("qwen3", dict(attention_bias=True), "attention_bias=True also biases o_proj"),
    ("olmoe", dict(attention_bias=True), "olmoe attention_bias=True also biases o_proj"),
    ("olmoe", dict(clip_qkv=8.0), "olmoe clip_qkv=8.0: megatron's attention does not clamp"),
])
def test_unsupported_features_of_the_new_families_are_refused(tmp_path, family, overrides, match):
    save_tiny_hf(family, tmp_path / "hf", tokenizer=False, **overrides)
    _refused(tmp_path, tmp_path / "hf", match)


def test_embedding_tie_that_contradicts_the_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    untied = tmp_path / "untied"
    save_tiny_hf("llama", untied, tokenizer=False)  # tie_word_embeddings=False: has lm_head.weight
    state = load_file(untied / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, str(untied / "model.safetensors"), metadata={"format": "pt"})
    _refused(tmp_path, untied, "tie_word_embeddings=false but the weights have no lm_head.weight")

    tied = tmp_path / "tied"
    save_tiny_hf("qwen3", tied, tokenizer=False)  # tied: no lm_head.weight stored
    state = load_file(tied / "model.safetensors")
    state["lm_head.weight"] = torch.randn_like(state["model.embed_tokens.weight"])
    save_file(state, str(tied / "model.safetensors"), metadata={"format": "pt"})
    _refused(tmp_path, tied, "tie_word_embeddings=true but lm_head.weight differs")


def test_qk_layernorm_checkpoints_export_only_to_qk_norm_formats():
    from ders_megatron.convert.hf.dims import ConversionError, ModelDims

    base = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                kv_channels=16, vocab_size=100, padded_vocab_size=128)
    qk = ModelDims(**base, qk_layernorm=True)
    qk.check_format("qwen3")
    for fmt in ("llama", "mistral", "qwen2"):
        with pytest.raises(ConversionError, match=f"--format {fmt} has no per-head QK-norm"):
            qk.check_format(fmt)
    for fmt in ("qwen3", "olmoe"):
        with pytest.raises(ConversionError, match=f"--format {fmt} always normalizes queries and keys"):
            ModelDims(**base).check_format(fmt)
    moe = dict(num_experts=4, moe_ffn_hidden_size=32, moe_pattern=(1, 1), shared_expert_size=32)
    with pytest.raises(ConversionError, match="--format qwen3_moe has no shared expert"):
        ModelDims(**base, **moe, qk_layernorm=True).check_format("qwen3_moe")
    # OLMoE's QK-norm spans all heads: only olmoe and ders hold it, and per-head is not OLMoE's
    full = dict(base, hidden_size=64, kv_channels=16, num_experts=4, moe_ffn_hidden_size=32, moe_pattern=(1, 1),
                qk_layernorm=True)
    with pytest.raises(ConversionError, match="--format olmoe has no per-head QK-norm"):
        ModelDims(**full).check_format("olmoe")
    for fmt in ("qwen3_moe", "mixtral"):
        with pytest.raises(ConversionError, match=f"--format {fmt} has no QK-norm over all heads"):
            ModelDims(**full, qk_layernorm_width="full").check_format(fmt)
    ModelDims(**full, qk_layernorm_width="full").check_format("olmoe")
    for changes, match in [(dict(shared_expert_size=32), "has no shared expert"),
                           (dict(moe_pattern=(1, 0)), "has MoE in every layer"),
                           (dict(kv_channels=24), "needs --kv-channels \\(24\\) = --hidden-size / --num-attention-heads")]:
        with pytest.raises(ConversionError, match=f"--format olmoe {match}"):
            ModelDims(**{**full, **changes}, qk_layernorm_width="full").check_format("olmoe")


def _build_gpt_qk_norms(args):
    from ders_megatron.io.model import build_gpt
    from ders_megatron.testing.distributed import model_parallel

    with model_parallel():
        model = build_gpt(args, ders=None, use_te=False)
        attention = model.decoder.layers[0].self_attention
        return type(attention.q_layernorm).__name__, tuple(attention.k_layernorm.weight.shape)


@pytest.mark.parametrize("width, kv_channels, built", [
    ("head", 24, ("RMSNorm", (24,))),  # per head: [head_dim]
    ("full", 16, ("FullWidthQKNorm", (2 * 16,))),  # OLMoE: k_norm over both key heads
])
def test_training_builder_builds_the_qk_norm(dist1, width, kv_channels, built):
    """--qk-layernorm (and --ders-qk-layernorm-width, through the checkpoint args the
    converters write) reaches the layer spec of the one model builder (training, upcycle,
    compress): without it megatron's attention keeps the spec's IdentityOp silently."""
    from ders_megatron.convert.hf.dims import ModelDims
    from ders_megatron.convert.hf.megatron_model import checkpoint_args

    args = checkpoint_args(ModelDims(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                                     num_query_groups=2, kv_channels=kv_channels, vocab_size=100,
                                     padded_vocab_size=128, qk_layernorm=True, qk_layernorm_width=width))
    assert args.qk_layernorm and args.ders_qk_layernorm_width == width
    assert dist1.run(_build_gpt_qk_norms, args)[0] == built


def test_hf_dir_takes_a_repo_id_from_the_local_cache(tmp_path, monkeypatch):
    from ders_megatron.convert.hf.dims import ConversionError
    from ders_megatron.convert.hf.hf_files import resolve_hf_dir

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    repo = cache / "models--tiny-org--tiny-qwen3"
    for rev in ("aaa111", "bbb222"):
        (repo / "snapshots" / rev).mkdir(parents=True)
        (repo / "snapshots" / rev / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    with pytest.raises(ConversionError, match="2 snapshots and no refs/main"):
        resolve_hf_dir("tiny-org/tiny-qwen3")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("bbb222\n")
    assert resolve_hf_dir("tiny-org/tiny-qwen3") == repo / "snapshots" / "bbb222"
    with pytest.raises(ConversionError, match="not in the local Hugging Face cache .*nothing is downloaded"):
        resolve_hf_dir("tiny-org/absent")
    assert resolve_hf_dir(tmp_path) == tmp_path  # a folder is a folder


def test_import_by_repo_id_reads_the_cached_snapshot(tmp_path, monkeypatch):
    """The CLI path: config and weights come from the snapshot folder (refused here at the
    config, before any weight is read or anything written: proof of where it looked)."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    snapshot = cache / "models--org--deepseek" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    _refused(tmp_path, "org/deepseek", "'deepseek_v3' is not converted")


def _import(source, out):
    from ders_megatron.convert.hf.importer import import_hf
    from ders_megatron.testing.distributed import model_parallel

    with model_parallel():
        import_hf(source, out, make_vocab_size_divisible_by=32, tensor_parallel_size=2)


def _logits_at_tp2(root, ids):
    from ders_megatron.testing.hf import checkpoint_logits

    return checkpoint_logits(root, ids, layout=dict(tp=2))


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_qk_norm_runs_at_tp2_with_sequence_parallelism(dist1, dist2, tmp_path, family):
    """QK-norm under TP=2 + SP (MoE with TP needs SP): per head (Qwen3-MoE), each rank
    normalizes its own heads with the replicated per-head weight; over all heads (OLMoE),
    each rank holds half the heads and the sum of squares is all-reduced over TP. The
    logits are the HF model's."""
    from ders_megatron.testing.hf import hf_logits, tokens

    model = save_tiny_hf(family, tmp_path / "hf")
    dist1.run(_import, str(tmp_path / "hf"), str(tmp_path / "megatron"))
    ids = tokens()
    # TP splits the attention/MLP sums over 2 ranks: ulps of O(1) logits (as test_hf_import).
    for logits in dist2.run(_logits_at_tp2, str(tmp_path / "megatron"), ids):
        torch.testing.assert_close(logits, hf_logits(model, ids), atol=1e-5, rtol=1e-5)
