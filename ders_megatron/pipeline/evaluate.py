"""Scores every model the same way, in this process at world size 1.

* :func:`evaluate_checkpoint`: held-out LM loss of a megatron checkpoint (dense,
  vanilla, DeRS or compressed: the model its args describe, as the exporter builds
  it) over the same token windows for every model, the logits of a probe window
  (what the Hugging Face exports must reproduce), and the checkpoint's size.
* :func:`compare_export`: runs ``hf_check.py`` (plain transformers, a separate
  process) on an exported folder and compares its logits with the probe's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ders_megatron.pipeline.config import EVAL_BATCH
from ders_megatron.pipeline.launch import run_logged

HF_CHECK = Path(__file__).with_name("hf_check.py")
PROBE_TOKENS = 64  # positions of the probe window whose logits the exports must match

# float32 on both sides; the export holds the same weights (DeRS experts synthesized as
# W_base + Δ_e in fp32, or kept as base + delta), so only the order of the sums differs.
# That is ~1e-7 relative per layer (tests/test_hf_export.py: <= 3e-7 on logits ~1 with
# 2 layers) and grows with depth; 30 layers of SmolLM2 measured ~2e-6 of the largest
# logit. 1e-4 of the largest logit keeps margin; a wrong tensor moves logits by > 1e-2.
LOGITS_RTOL = 1e-4


def checkpoint_size(root) -> dict:
    """Floating-point parameters and bytes of every model tensor in a checkpoint
    (sparse seeds, indices and packed codes count in bytes, not parameters)."""
    from ders_megatron.io.checkpoint import tensor_shapes

    params = nbytes = 0
    for key, (shape, dtype) in tensor_shapes(root).items():
        if key.startswith("optimizer."):
            continue
        numel = int(torch.Size(shape).numel())
        nbytes += numel * torch.empty((), dtype=dtype).element_size()
        params += numel if dtype.is_floating_point else 0
    return {"params": params, "bytes": nbytes}


def evaluate_checkpoint(root: Path, heldout_prefix: Path, seq_length: int, batches: int, probe_path: Path) -> dict:
    """Held-out loss of the checkpoint at ``root``; saves the probe window's logits."""
    from tqdm.auto import tqdm

    from ders_megatron.io.checkpoint import load_common, load_model
    from ders_megatron.convert.compress.calibration import evaluate, load_tokens, token_batches
    from ders_megatron.convert.hf.megatron_model import gpt_from_args, megatron_logits
    from ders_megatron.io.session import single_rank_megatron

    with single_rank_megatron():
        args = load_common(root)["args"]
        model = gpt_from_args(args)
        load_model(model, root)
        data = token_batches(load_tokens(heldout_prefix, args.padded_vocab_size), seq_length, EVAL_BATCH, batches)
        result = evaluate(model, tqdm(data, desc=f"held-out loss {root.name}", leave=False, disable=None))
        tokens = data[0]["tokens"][:1, :PROBE_TOKENS]
        logits = megatron_logits(model, tokens, vocab_size=args.vocab_size)
        size = checkpoint_size(root)
    probe_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"tokens": tokens, "logits": logits}, probe_path)
    return {**result, **size, "checkpoint": str(root)}


def compare_export(folder: Path, probe_path: Path, out_json: Path, prompt: str, new_tokens: int, log: Path) -> dict:
    """Logits of the exported model (plain transformers) against the Megatron probe."""
    cmd = [sys.executable, str(HF_CHECK), str(folder), str(probe_path), str(out_json), prompt, str(new_tokens)]
    run_logged(cmd, log, f"transformers {folder.name}")
    result = json.loads(out_json.read_text())
    reference = torch.load(probe_path, weights_only=True)["logits"]
    logits = torch.load(out_json.with_suffix(".pt"), weights_only=True)
    diff = float((logits - reference).abs().max())
    scale = float(reference.abs().max())
    agree = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
    result.update(max_abs_diff=diff, max_abs_logit=scale, argmax_agreement=agree,
                  logits_match=diff <= LOGITS_RTOL * scale, folder=str(folder))
    return result
