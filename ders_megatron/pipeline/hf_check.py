"""Load a Hugging Face folder with plain transformers, score probe tokens, continue a prompt.

Run as a script (``python ders_megatron/pipeline/hf_check.py FOLDER PROBE.pt OUT.json
PROMPT NEW_TOKENS``) so that nothing of ders-megatron is imported: the compact
``ders`` format loads through the modeling files copied into its folder
(``trust_remote_code=True``), the other formats are transformers' own classes.
Writes the logits of ``PROBE.pt``'s ``tokens`` to ``OUT.pt`` and the greedy
continuation to ``OUT.json``.
"""

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(folder: str, probe: str, out: str, prompt: str, new_tokens: int) -> None:
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # else it asks on stdin
    tokens = torch.load(probe, weights_only=True)["tokens"]
    with torch.no_grad():
        logits = model(tokens).logits
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        generated = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    torch.save(logits, out.removesuffix(".json") + ".pt")
    result = {
        "architecture": type(model).__name__,
        "module": type(model).__module__,
        "prompt": prompt,
        "continuation": tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True),
        "seconds": time.perf_counter() - start,
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
