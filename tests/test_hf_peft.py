"""DeRS-LM deltas as a PEFT LoRA adapter: the upcycled base (every expert = W_base) in a
transformers MoE family plus ``PeftModel.from_pretrained`` gives the Megatron model's logits."""

import json

import pytest
import torch

from ders_megatron.convert.hf.dims import ConversionError, ModelDims
from ders_megatron.testing.hf import VOCAB, tokens

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning",
    "ignore:The argument order of load has been changed:UserWarning",
    "ignore:no tokenizer files:UserWarning",
)

# float32 both sides. PEFT adds B_e A_e to the expert weight before the product, megatron
# adds the delta term to the base product: the same sums in another order, ~1e-7 on logits
# of magnitude ~1. 1e-5 fails on any mis-keyed or mis-ordered factor (an unapplied adapter
# or a swapped expert moves logits by >= 1e-3, checked below against the bare base).
ATOL, RTOL = 1e-5, 1e-5

BASE = dict(
    num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
    kv_channels=16, vocab_size=VOCAB, padded_vocab_size=128, max_position_embeddings=64,
    num_experts=4, topk=2, moe_ffn_hidden_size=96, moe_pattern=(1, 1), ders_kind="lowrank", ders_rank=2,
)
CASES = {
    # name: (ModelDims overrides, base format the adapter goes over)
    "lowrank-mixtral": (dict(ders_alpha=4.0), "mixtral"),
    # extended DeRS shared expert without megatron's gate: Qwen2-MoE's zero gate, doubled down
    "lowrank-extended-shared": (dict(shared_expert_size=96, ders_shared_expert=True, moe_pattern=(1, 0),
                                     ders_rank=3), "qwen2_moe"),
    "lowrank-qk-norm": (dict(qk_layernorm=True, moe_pattern=(0, 1), router_pre_softmax=True), "qwen3_moe"),
    "lowrank-full-qk-norm": (dict(qk_layernorm=True, qk_layernorm_width="full", router_pre_softmax=True), "olmoe"),
}


def _save(root, case):
    from ders_megatron.convert.hf.megatron_model import checkpoint_args
    from ders_megatron.testing.hf import save_megatron

    return save_megatron(root, checkpoint_args(ModelDims(**{**BASE, **CASES[case][0]})), tokens())


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_over_upcycled_base_gives_megatron_logits(dist1, tmp_path, case):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from ders_megatron.convert.hf.peft_adapter import export_peft

    reference = dist1.run(_save, str(tmp_path / "ckpt"), case)[0]
    export_peft(tmp_path / "ckpt", tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "base" / "config.json").read_text())
    assert config["model_type"] == CASES[case][1]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "base", attn_implementation="eager").eval()
    with torch.no_grad():
        base_logits = base(tokens()).logits
    model = peft.PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()
    with torch.no_grad():
        logits = model(tokens()).logits
    torch.testing.assert_close(logits, reference, atol=ATOL, rtol=RTOL)
    assert (base_logits - reference).abs().max() > 1e-3  # the adapter carries the deltas
    experts = base.model.layers[CASES[case][0].get("moe_pattern", (1, 1)).index(1)].mlp.experts
    base_layer = experts.get_base_layer() if hasattr(experts, "get_base_layer") else experts
    gate_up = base_layer.gate_up_proj
    assert torch.equal(gate_up[0], gate_up[3])  # every expert = W_base


def test_peft_adapter_refuses_what_lora_cannot_hold(dist1, tmp_path):
    from ders_megatron.convert.hf.megatron_model import checkpoint_args
    from ders_megatron.convert.hf.peft_adapter import check_adapter
    from ders_megatron.testing.hf import save_megatron

    sparse = ModelDims(**{**BASE, "ders_kind": "sparse", "ders_drop_rate": 0.9})
    with pytest.raises(ConversionError, match="low-rank deltas only"):
        check_adapter(sparse, "mixtral")
    with pytest.raises(ConversionError, match="megatron's own experts"):
        check_adapter(ModelDims(**{**BASE, "ders_kind": "vanilla"}), "mixtral")
    with pytest.raises(ConversionError, match="--format 'ders'"):
        check_adapter(ModelDims(**BASE), "ders")
    from ders_megatron.cli.convert_hf import main

    dist1.run(save_megatron, str(tmp_path / "sparse"), checkpoint_args(sparse), tokens())
    with pytest.raises(SystemExit) as exit_info:
        main(["adapter", "--checkpoint", str(tmp_path / "sparse"), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and not (tmp_path / "out").exists()
