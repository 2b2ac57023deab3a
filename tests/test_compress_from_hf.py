"""Compression straight from a Hugging Face MoE folder (issue 18 item 3): ``tools/compress.py
--load HF_DIR`` writes a DeRS checkpoint and a ``ders`` HF folder whose logits are the
checkpoint's and the source's within the compression's error, carries the source's
tokenizer, and leaves no temporary behind; the Qwen3-MoE and OLMoE folders also load in
plain transformers (trust_remote_code, ders_megatron not importable)."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch

from ders_megatron.testing.hf import save_tiny_hf, tokens
from test_hf_export import remote_code_logits

# The DeRS checkpoint in megatron and the ders folder in transformers compute the same
# base + compressed delta in another summation order: ~1e-7 on O(1) logits (as in
# tests/test_hf_export.py). 1e-5 leaves margin and fails on any mapping error (>= 1e-3).
ATOL, RTOL = 1e-5, 1e-5

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning",
    "ignore:The argument order of load has been changed:UserWarning",
)


def run_compress(argv):
    from ders_megatron.cli.compress import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(argv)
    return code, err.getvalue()


@torch.no_grad()
def _mean_expert_logits(model, ids):
    """Logits of ``model`` with every expert replaced by the experts' mean (the --base mean
    with its deltas dropped): the error a compression that kept nothing of the deltas makes."""
    import copy

    mean = copy.deepcopy(model)
    for name, param in mean.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, ...] fused experts
            param.copy_(param.mean(0, keepdim=True).expand_as(param))
    return mean(ids).logits


def _checkpoint_logits(root, ids):
    from ders_megatron.testing.hf import checkpoint_logits

    return checkpoint_logits(root, ids)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_compress_from_hf_folder_to_ders_folder(dist1, tmp_path, family):
    from transformers import AutoModelForCausalLM

    from ders_megatron.convert.hf import DeRSMoEForCausalLM  # importing it registers ders_moe with Auto*
    from ders_megatron.io.checkpoint import load_common

    source, save, hf_out = tmp_path / "hf", tmp_path / "ders-ckpt", tmp_path / "ders-hf"
    source_model = save_tiny_hf(family, source)
    # Random experts are far from their mean: --max-delta-norm lifts the guard meant for trained ones.
    code, stderr = dist1.run(run_compress, ["--load", str(source), "--save", str(save), "--hf-output", str(hf_out),
                                            "--moe-ders-codecs", "quant:4", "--base", "mean",
                                            "--moe-ders-quant-group-size", "16", "--max-delta-norm", "100"])[0]
    assert code == 0, stderr[-3000:]
    ids = tokens()
    megatron = dist1.run(_checkpoint_logits, str(save), ids)[0]
    model = AutoModelForCausalLM.from_pretrained(hf_out, attn_implementation="eager").eval()
    assert isinstance(model, DeRSMoEForCausalLM)
    with torch.no_grad():
        compressed = model(ids).logits
        source_logits = source_model(ids).logits
    torch.testing.assert_close(compressed, megatron, atol=ATOL, rtol=RTOL)
    error = float((compressed - source_logits).abs().max())
    base_error = float((_mean_expert_logits(source_model, ids) - source_logits).abs().max())
    # Close to the source within the compression's error: 4-bit codes of the deltas from the
    # mean expert leave 5-9% of the error of dropping the deltas altogether (measured on these
    # tiny models: mixtral 0.0069 vs 0.093, qwen2_moe 0.0029 vs 0.051, qwen3_moe 0.0035 vs
    # 0.039, olmoe 0.0087 vs 0.10). 20% keeps margin; lost or misplaced deltas give ~100%.
    assert error < 0.2 * base_error, (error, base_error)
    args = load_common(save)["args"]
    assert args.moe_ders == "codec" and args.tokenizer_model == str((save / "hf").resolve())
    assert (save / "hf" / "tokenizer.json").is_file() and (hf_out / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ders-ckpt", "ders-hf", "hf"]  # no temporary left
    if family in ("qwen3_moe", "olmoe"):  # plain transformers, ders_megatron not importable
        (tmp_path / "remote").mkdir()
        torch.testing.assert_close(remote_code_logits(hf_out, ids, tmp_path / "remote"), megatron,
                                   atol=ATOL, rtol=RTOL)


def test_hf_output_needs_an_hf_load(dist1, tmp_path):
    code, stderr = dist1.run(run_compress, ["--load", str(tmp_path / "ckpt"), "--hf-output", str(tmp_path / "o"),
                                            "--moe-ders-codecs", "quant:4", "--base", "mean"])[0]
    assert code == 2 and "--hf-output is for a Hugging Face --load" in stderr, stderr
