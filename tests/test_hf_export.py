"""megatron-core -> Hugging Face export: every format and delta kind gives the
Megatron model's logits in plain transformers, from single-rank and TP=2/EP=2
checkpoints; HF -> Megatron -> HF is the identity; the compact DeRS format is as
small as the parameter accounting says and loads without ders-megatron.
"""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from ders_megatron.convert.hf.dims import ModelDims
from ders_megatron.convert.hf.dims import MOE_FAMILIES
from ders_megatron.testing.hf import TINY_FAMILIES, VOCAB, save_tiny_hf, tiny_tokenizer, tokens

# float32 both sides. The HF model runs the same products as megatron's (DeRS:
# base GEMM plus delta term per expert; synthesized formats: W_base + Δ_e merged in
# fp32 by ders_megatron.core.deltas.merge) in another summation order: measured
# <= 3e-7 on logits of magnitude ~1 (9e-7 for synthesized 4-bit quantized experts). 1e-5 keeps margin for other BLAS builds and
# fails on any real error (a wrong sparse position or layer number: >= 1e-3).
ATOL, RTOL = 1e-5, 1e-5

# Single-process checkpoint reads in these tests (megatron's load_common and
# whole-key reads) make torch.distributed.checkpoint say so on every call.
pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning",
    "ignore:The argument order of load has been changed:UserWarning",
)

BASE = dict(
    num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
    kv_channels=16, vocab_size=VOCAB, padded_vocab_size=128, max_position_embeddings=64,
    num_experts=4, topk=2, moe_ffn_hidden_size=96, moe_pattern=(1, 1),
)
SHARED_MIXED = dict(shared_expert_size=96, moe_pattern=(1, 0))  # shared expert, a dense layer after
CASES = {
    # name: (ModelDims overrides, export formats)
    "vanilla": (dict(), ["mixtral"]),
    "vanilla-shared-gate": (dict(SHARED_MIXED, shared_expert_gate=True, qkv_bias=True), ["qwen2_moe"]),
    "lowrank": (dict(ders_kind="lowrank", ders_rank=2, ders_alpha=4.0), ["mixtral", "ders"]),
    "sparse-shared-gate": (dict(SHARED_MIXED, ders_kind="sparse", ders_drop_rate=0.9, shared_expert_gate=True,
                                tie_embeddings=True), ["qwen2_moe", "ders"]),
    # no shared-expert gate: Qwen2-MoE gets a zero gate and a doubled down_proj
    "dense-shared-presoftmax": (dict(SHARED_MIXED, ders_kind="dense", router_pre_softmax=True),
                                ["qwen2_moe", "ders"]),
    "sparse-extended-shared": (dict(SHARED_MIXED, ders_kind="sparse", ders_drop_rate=0.95,
                                    ders_shared_expert=True, shared_expert_gate=True), ["qwen2_moe", "ders"]),
    "lowrank-extended-shared": (dict(shared_expert_size=96, ders_kind="lowrank", ders_rank=3,
                                     ders_shared_expert=True), ["qwen2_moe", "ders"]),
}
# per-head QK-norm (Qwen3): Qwen3-MoE, and the compact format on Qwen3-MoE's decoder
CASES.update({
    "vanilla-qk-norm-presoftmax": (dict(qk_layernorm=True, moe_pattern=(0, 1), router_pre_softmax=True),
                                   ["qwen3_moe"]),
    "lowrank-qk-norm-shared": (dict(SHARED_MIXED, qk_layernorm=True, ders_kind="lowrank", ders_rank=2,
                                    shared_expert_gate=True), ["ders"]),
    "sparse-qk-norm": (dict(qk_layernorm=True, ders_kind="sparse", ders_drop_rate=0.9), ["qwen3_moe", "ders"]),
})
# QK-norm over all heads (OLMoE): OLMoE itself, and the compact format on OLMoE's decoder
FULL_QK = dict(qk_layernorm=True, qk_layernorm_width="full")
CASES.update({
    "vanilla-full-qk-norm-presoftmax": (dict(FULL_QK, router_pre_softmax=True), ["olmoe"]),
    "lowrank-full-qk-norm": (dict(FULL_QK, ders_kind="lowrank", ders_rank=2), ["olmoe", "ders"]),
})
# compressed delta kinds (tools/compress.py)
CASES.update({
    # 4-bit group-wise codes on gate/up, magnitude-sparse (explicit indices) on down
    "codec-quant4-magnitude": (dict(ders_kind="codec", ders_codecs="fc1:quant:4,fc2:magnitude:0.9",
                                    ders_quant_group_size=32), ["mixtral", "ders"]),
    # BitDelta (1 bit) on gate/up, SVD rank 3 on down, extended shared expert
    "codec-bitdelta-svd-shared": (dict(ders_kind="codec", ders_codecs="fc1:quant:1,fc2:svd:3",
                                       ders_quant_group_size=16, shared_expert_size=96,
                                       ders_shared_expert=True, shared_expert_gate=True),
                                  ["qwen2_moe", "ders"]),
})


def dims_of(case: str) -> ModelDims:
    return ModelDims(**{**BASE, **CASES[case][0]})


def save_checkpoint(pool, root, case, layout=None):
    """Save the case's perturbed model at ``layout``; the world-size-1 reference logits."""
    from ders_megatron.testing.hf import save_megatron

    return pool.run(save_megatron, str(root), full_args(dims_of(case)), tokens(), layout)[0]


def full_args(dims: ModelDims):
    """The args Megatron-LM would save for ``dims`` (the full Namespace)."""
    from ders_megatron.convert.hf.megatron_model import checkpoint_args

    return checkpoint_args(dims)


def load_hf(folder, **kwargs):
    import ders_megatron.convert.hf  # noqa: F401  registers ders_moe with the Auto classes
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager", output_loading_info=True, **kwargs
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    return model.eval()


def export(checkpoint, out, fmt, **kwargs):
    """export_hf without a progress bar; these checkpoints have no tokenizer (a warning)."""
    from ders_megatron.convert.hf import export_hf

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no tokenizer files")
        return export_hf(checkpoint, out, fmt=fmt, progress=False, **kwargs)


def check_export(checkpoint, out, fmt, reference, **export_kwargs):
    export(checkpoint, out, fmt, **export_kwargs)
    model = load_hf(out)
    ids = tokens()
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, reference, atol=ATOL, rtol=RTOL)
    generated = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7) and generated[0, 4] == logits[0, 3].argmax()
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_matches_megatron_logits(dist1, tmp_path, case):
    reference = save_checkpoint(dist1, tmp_path / "ckpt", case)
    for fmt in CASES[case][1]:
        model = check_export(tmp_path / "ckpt", tmp_path / fmt, fmt, reference)
        expected = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                    "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM", "ders": "DeRSMoEForCausalLM"}
        assert type(model).__name__ == expected[fmt]
        if fmt == "ders":  # the family's own decoder: Qwen3-MoE's / OLMoE's for QK-norm, with its q_norm
            dims = dims_of(case)
            family = ("Olmoe" if dims.qk_layernorm_width == "full" else "Qwen3Moe") if dims.qk_layernorm else "Qwen2Moe"
            assert type(model.model).__name__ == f"{family}Model"
            assert hasattr(model.model.layers[0].self_attn, "q_norm") == dims.qk_layernorm


@pytest.mark.parametrize("case", ["vanilla", "lowrank", "sparse-extended-shared"])
def test_export_from_tp2_ep2_checkpoint(dist2, tmp_path, case):
    """Saved by 2 ranks at TP=2, EP=2 (expert-TP 1): the export reads per-layer chunks
    of a checkpoint no single rank wrote whole."""
    reference = save_checkpoint(dist2, tmp_path / "ckpt", case, layout=dict(tp=2, ep=2, etp=1))
    for fmt in CASES[case][1]:
        check_export(tmp_path / "ckpt", tmp_path / fmt, fmt, reference)


def test_sharded_output_with_index(dist1, tmp_path):
    reference = save_checkpoint(dist1, tmp_path / "ckpt", "lowrank")
    check_export(tmp_path / "ckpt", tmp_path / "out", "mixtral", reference, max_shard_size="40KB",
                 dtype="float32")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((tmp_path / "out" / s).stat().st_size < 40_000 + 20_000 for s in shards)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in index["weight_map"]


def test_reader_streams_one_layer_chunk_at_a_time(dist1, tmp_path, monkeypatch):
    """Layer-stacked keys ([L, E, ...] for SequentialMLP experts) are read one layer's
    chunk at a time, and the chunks equal the whole-key reads."""
    from ders_megatron.io.checkpoint import load_full_tensors
    from ders_megatron.io import reader as reader_module

    save_checkpoint(dist1, tmp_path / "ckpt", "vanilla")
    reads = []
    real_load = reader_module.dcp_load
    monkeypatch.setattr(reader_module, "dcp_load", lambda dests, **kw: (reads.append(
        {k: tuple(t.shape) for k, t in dests.items()}), real_load(dests, **kw))[1])
    reader = reader_module.CheckpointReader(tmp_path / "ckpt")
    names = [f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc1.weight" for e in range(4)]
    got = reader.read(names + ["decoder.layers.1.input_layernorm.weight"])
    key = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    assert reads == [{key: (1, 4, 192, 64), "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (1, 64)}]
    whole = load_full_tensors(tmp_path / "ckpt", [key])[key]  # [L, E, 2F, H]
    for e, name in enumerate(names):
        assert torch.equal(got[name], whole[1, e])


# --------------------------------------------------------------------------- #
# Round trip: HF -> Megatron (vanilla MoE) -> HF gives identical tensors.
# --------------------------------------------------------------------------- #
def _import(source, out):
    from ders_megatron.convert.hf.importer import import_hf
    from ders_megatron.testing.distributed import model_parallel

    with model_parallel():
        import_hf(source, out)


def _tensors(folder):
    from ders_megatron.convert.hf.hf_files import HFSource

    source = HFSource(folder)
    return {key: source.get(key) for key in source.keys()}


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_hf_megatron_hf_round_trip_is_identity(dist1, tmp_path, family):
    """Every family: HF -> Megatron -> HF in the same format gives the same tensors, bit for
    bit, and the same config fields."""
    from ders_megatron.convert.hf import export_hf

    save_tiny_hf(family, tmp_path / "hf")
    dist1.run(_import, str(tmp_path / "hf"), str(tmp_path / "megatron"))
    export_hf(tmp_path / "megatron", tmp_path / "back", fmt=family, progress=False)
    before, after = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert before.keys() == after.keys()
    if family in MOE_FAMILIES:
        assert any(".experts.3." in key for key in after)  # the classic per-expert keys
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor), key
    config = lambda folder: json.loads((folder / "config.json").read_text())  # noqa: E731
    a, b = config(tmp_path / "hf"), config(tmp_path / "back")
    for field in ("model_type", "architectures", "num_hidden_layers", "num_key_value_heads",
                  "rope_parameters", "rms_norm_eps", "intermediate_size", "moe_intermediate_size",
                  "num_experts_per_tok", "norm_topk_prob", "mlp_only_layers", "tie_word_embeddings",
                  "bos_token_id", "eos_token_id"):
        assert a.get(field) == b.get(field), field
    head_dim = lambda c: c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]  # noqa: E731
    assert head_dim(a) == head_dim(b)  # written explicitly on export
    # The tokenizer travelled HF -> megatron/hf/ -> export.
    assert (tmp_path / "back" / "tokenizer.json").is_file()


# --------------------------------------------------------------------------- #
# The compact DeRS format: size and loading without ders-megatron.
# --------------------------------------------------------------------------- #
DERS_LM = dict(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, num_query_groups=2,
               kv_channels=32, vocab_size=256, padded_vocab_size=256, num_experts=8, topk=2,
               moe_ffn_hidden_size=256, moe_pattern=(1, 1), ders_kind="lowrank", ders_rank=4)


def dense_param_count(d: ModelDims) -> int:
    """Parameters of the dense model the DeRS-LM model was upcycled from (as exported)."""
    H, F = d.hidden_size, d.ffn_hidden_size
    attention = H * (d.num_attention_heads + 2 * d.num_query_groups) * d.kv_channels
    attention += d.num_attention_heads * d.kv_channels * H
    layer = 2 * H + attention + 3 * F * H
    embeddings = d.vocab_size * H * (1 if d.tie_embeddings else 2)
    return embeddings + d.num_layers * layer + H


def _save_ders_lm(root, args, ids):
    from ders_megatron.testing.hf import save_megatron

    return save_megatron(root, args, ids)


REMOTE_LOAD = """
import sys
sys.modules["ders_megatron"] = None  # ders-megatron must not be needed
try:
    import ders_megatron  # noqa: F401
    raise SystemExit("ders_megatron is importable")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM
folder, ids_path, out_path = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager")
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
ids = torch.load(ids_path)
with torch.no_grad():
    torch.save(model(ids).logits, out_path)
model.generate(ids[:1, :4], max_new_tokens=2, do_sample=False)
"""


def test_compact_ders_size_matches_accounting_and_loads_without_package(dist1, tmp_path):
    from ders_megatron.core.accounting import DeltaSpec, MoEShape, added_parameters

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = dist1.run(_save_ders_lm, str(tmp_path / "ckpt"), full_args(ModelDims(**DERS_LM)), ids)[0]
    export(tmp_path / "ckpt", tmp_path / "ders", "ders")
    export(tmp_path / "ckpt", tmp_path / "mixtral", "mixtral")

    dims = ModelDims(**DERS_LM)
    report = added_parameters(
        MoEShape(hidden_size=128, ffn_hidden_size=256, num_layers=2, num_experts=8, topk=2, gated=True),
        DeltaSpec(kind="lowrank", rank=4), dtype_bytes=4,
    )
    predicted = 4 * dense_param_count(dims) + report.added_bytes
    compact = (tmp_path / "ders" / "model.safetensors").stat().st_size
    synthesized = (tmp_path / "mixtral" / "model.safetensors").stat().st_size
    # The safetensors header (a JSON line per tensor) is the only overhead: < 1%.
    assert abs(compact - predicted) / predicted < 0.02, (compact, predicted)
    assert synthesized > 3 * compact  # 8 full experts per layer against one base + rank-4 deltas
    print(f"\ncompact ders {compact} B, predicted {predicted} B, mixtral (synthesized) {synthesized} B")

    torch.testing.assert_close(remote_code_logits(tmp_path / "ders", ids, tmp_path), reference, atol=ATOL, rtol=RTOL)
    with torch.no_grad():  # and through the package's registration
        torch.testing.assert_close(load_hf(tmp_path / "ders")(ids).logits, reference, atol=ATOL, rtol=RTOL)


def remote_code_logits(folder, ids, tmp_path):
    """Logits of ``folder`` loaded with trust_remote_code in a clean process without ders-megatron."""
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "logits.pt")


def test_compact_ders_on_qwen3_moe_loads_without_package(dist1, tmp_path):
    """The compact format of a QK-norm checkpoint is Qwen3-MoE's decoder with DeRS experts,
    loaded with trust_remote_code where ders-megatron is not importable."""
    reference = save_checkpoint(dist1, tmp_path / "ckpt", "lowrank-qk-norm-shared")
    export(tmp_path / "ckpt", tmp_path / "ders", "ders")
    config = json.loads((tmp_path / "ders" / "config.json").read_text())
    assert (config["model_type"], config["base_model_type"]) == ("ders_moe", "qwen3_moe")
    torch.testing.assert_close(remote_code_logits(tmp_path / "ders", tokens(), tmp_path), reference,
                               atol=ATOL, rtol=RTOL)


def test_compact_sparse_positions_derived_once_no_host_sync_per_forward(dist1, tmp_path, monkeypatch):
    """The compact format's seeded positions are derived at the first forward after a load
    (one read of each seed) and kept on the device: a later forward calls no ``.item()``
    and gives bitwise the same logits; a load that changes the seed re-derives them."""
    reference = save_checkpoint(dist1, tmp_path / "ckpt", "sparse-extended-shared")
    export(tmp_path / "ckpt", tmp_path / "ders", "ders")
    model = load_hf(tmp_path / "ders")
    ids = tokens()
    with torch.no_grad():
        first = model(ids).logits
        torch.testing.assert_close(first, reference, atol=ATOL, rtol=RTOL)

        def no_item(self):
            raise AssertionError("Tensor.item() in a forward after the first")

        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "item", no_item)
            again = model(ids).logits
        assert torch.equal(again, first)
        deltas = model.model.layers[0].mlp.experts["down_proj"]
        old_rows, _ = deltas.positions(0)
        deltas.load_state_dict({**deltas.state_dict(), "position_seed": deltas.position_seed + 1})
        new_rows, _ = deltas.positions(0)
        assert not torch.equal(old_rows, new_rows)  # the new seed's positions, not the cached ones


def test_remote_code_sparse_positions_match_the_package():
    from ders_megatron.convert.hf import modeling_ders_moe as remote
    from ders_megatron.core import deltas
    from ders_megatron.core.config import SparseDeltaConfig

    for seed, layer, expert, matrix in [(0, 1, 0, "fc1_gate"), (1234, 7, 63, "fc2"), (2**40, 2, 8, "fc1_up")]:
        assert remote.derive_seed(seed, layer, expert, matrix) == deltas.derive_seed(seed, layer, expert, matrix)
    for n, k, seed in [(10, 7, 3), (4096, 41, 5), (96 * 64, 614, 2**62), (100_000, 1000, 11)]:
        assert torch.equal(remote.sample_unique(n, k, seed), deltas.sample_unique(n, k, seed))
    if hasattr(deltas, "pack_bits"):
        codes = torch.randint(0, 2**3, (5, 7, 40), generator=torch.Generator().manual_seed(0))
        for bits in (1, 2, 3, 4, 8):
            packed = deltas.pack_bits(codes % 2**bits, bits)
            assert torch.equal(remote.unpack_bits(packed, bits, 40), deltas.unpack_bits(packed, bits, 40))
    config = SparseDeltaConfig(drop_rate=0.95)
    assert remote.sparse_kept(0.95, 96, 64) == config.kept(96, 64)


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #
def test_bad_exports_are_refused_clearly_and_write_nothing(dist1, tmp_path):
    from ders_megatron.io.checkpoint import CheckpointError
    from ders_megatron.convert.hf import export_hf
    from ders_megatron.cli.convert_hf import main
    from ders_megatron.convert.hf.dims import ConversionError

    dense = ModelDims(**{**BASE, "num_experts": 0, "moe_pattern": ()})
    dist1.run(_save, str(tmp_path / "dense"), full_args(dense))
    dist1.run(_save, str(tmp_path / "vanilla"), full_args(dims_of("vanilla-shared-gate")))
    out = tmp_path / "out"
    cases = [
        ("dense", "mixtral", ConversionError, "--format mixtral needs a MoE checkpoint"),
        ("dense", "ders", ConversionError, "--format ders needs a MoE checkpoint"),
        ("vanilla", "ders", ConversionError, "--format ders needs a DeRS checkpoint"),
        ("vanilla", "mixtral", ConversionError, "--format mixtral has no shared expert"),
        ("vanilla", "gpt2", ConversionError, "unknown --format 'gpt2'"),
        ("nowhere", "mixtral", CheckpointError, "does not exist"),
    ]
    for checkpoint, fmt, error, match in cases:
        with pytest.raises(error, match=match):
            export_hf(tmp_path / checkpoint, out, fmt=fmt, progress=False)
    with pytest.raises(ConversionError, match="dense layers at \\[1\\]"):
        ModelDims(**{**BASE, "moe_pattern": (1, 0)}).check_format("mixtral")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--checkpoint", str(tmp_path / "dense"), "--output", str(out), "--format", "qwen2_moe"])
    assert exit_info.value.code == 2
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]

    # A dense checkpoint exports as llama; without a tokenizer that is a warning, not a failure.
    with pytest.warns(UserWarning, match="no tokenizer files"):
        export_hf(tmp_path / "dense", out, fmt="llama", progress=False)
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    with pytest.raises(CheckpointError, match="--force"):
        export_hf(tmp_path / "dense", out, fmt="llama", progress=False)
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    export_hf(tmp_path / "dense", out, fmt="llama", progress=False, tokenizer=tmp_path / "tok", force=True)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("w1 w2")["input_ids"] == [5, 6]


def _save(root, args):
    from ders_megatron.testing.hf import save_megatron

    return save_megatron(root, args, tokens())


# --------------------------------------------------------------------------- #
# The whole path: HF dense -> import -> tools/upcycle.py -> export -> HF MoE.
# --------------------------------------------------------------------------- #
def _import_and_upcycle(source, dense, moe):
    from ders_megatron.cli.upcycle import main as upcycle_main

    _import(source, dense)
    assert upcycle_main(["--load", dense, "--save", moe, "--moe-ders", "lowrank", "--num-experts", "4",
                         "--moe-ders-rank", "2"]) == 0


def test_hf_dense_import_upcycle_export_equals_source(dist1, tmp_path):
    """Zero deltas and renormalized top-2 make the upcycled MoE the dense model: its
    exports (synthesized and compact) give the source HF model's logits."""
    pytest.importorskip("ders_megatron.convert.upcycle")
    from ders_megatron.testing.hf import hf_logits

    source = save_tiny_hf("llama", tmp_path / "hf")
    dist1.run(_import_and_upcycle, str(tmp_path / "hf"), str(tmp_path / "dense"), str(tmp_path / "moe"))
    expected = hf_logits(source, tokens())
    for fmt in ("mixtral", "ders"):
        export(tmp_path / "moe", tmp_path / fmt, fmt)
        with torch.no_grad():
            # Σ_k p_k·FFN(x) with Σ p_k = 1: the rounding of two terms per layer.
            torch.testing.assert_close(load_hf(tmp_path / fmt)(tokens()).logits, expected, atol=ATOL, rtol=RTOL)
        assert (tmp_path / fmt / "tokenizer.json").is_file()  # found through args.tokenizer_model
