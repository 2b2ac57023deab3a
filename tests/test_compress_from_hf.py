"""Compression straight from a Hugging Face MoE folder (issue 18 item 3): ``tools/compress.py
--load HF_DIR`` writes a DeRS checkpoint and a ``ders`` HF folder whose logits are the
checkpoint's, carries the source's tokenizer, and leaves no temporary behind."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch

from ders_megatron.testing.hf import save_tiny_hf, tokens

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


def _checkpoint_logits(root, ids):
    from ders_megatron.testing.hf import checkpoint_logits

    return checkpoint_logits(root, ids)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_compress_from_hf_folder_to_ders_folder(dist1, tmp_path, family):
    from transformers import AutoModelForCausalLM

    from ders_megatron.convert.hf import DeRSMoEForCausalLM  # importing it registers ders_moe with Auto*
    from ders_megatron.io.checkpoint import load_common

    source, save, hf_out = tmp_path / "hf", tmp_path / "ders-ckpt", tmp_path / "ders-hf"
    save_tiny_hf(family, source)
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
        torch.testing.assert_close(model(ids).logits, megatron, atol=ATOL, rtol=RTOL)
    args = load_common(save)["args"]
    assert args.moe_ders == "codec" and args.tokenizer_model == str((save / "hf").resolve())
    assert (save / "hf" / "tokenizer.json").is_file() and (hf_out / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ders-ckpt", "ders-hf", "hf"]  # no temporary left


def test_hf_output_needs_an_hf_load(dist1, tmp_path):
    code, stderr = dist1.run(run_compress, ["--load", str(tmp_path / "ckpt"), "--hf-output", str(tmp_path / "o"),
                                            "--moe-ders-codecs", "quant:4", "--base", "mean"])[0]
    assert code == 2 and "--hf-output is for a Hugging Face --load" in stderr, stderr
