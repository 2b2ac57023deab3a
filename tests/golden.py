"""Golden outputs: fixed Megatron checkpoints and the digests of what the tools make of them.

Issue 15 moved the package into layers with "no change of behaviour": checkpoint
keys and Hugging Face exports byte-identical to before. This module makes that
checkable for good:

* ``tests/data/golden/<case>/`` are tiny Megatron checkpoints (with their args),
  saved once: a dense model and one MoE per export case of
  ``test_hf_export.py`` (vanilla, every delta kind, shared experts, codecs);
* ``tests/data/golden/digests.json`` holds, recorded with the code as it was
  before the move (commit 7fec34b; since then changed on purpose only where a commit says so: the
  ``ders`` format's modeling file, issues 16 and 17; its config and modeling files, issue 18: OLMoE's
  decoder and a ``clip_qkv`` field), the sha256 of every file of every export of
  every case, and the sha256 of every tensor (key, dtype, shape, bytes) that
  ``upcycle_checkpoint`` and ``compress_checkpoint`` write from these inputs, and
  ``import_hf`` writes from some of the exports (recorded with the in-memory importer
  before issue 18 made it stream).

``test_golden_outputs.py`` redoes each export/upcycle/compress and compares.
``python tests/golden.py checkpoints`` rewrites the inputs, ``python
tests/golden.py digests`` the expectations: only when the output format changes
on purpose; say so in the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "golden"
DIGESTS = DATA / "digests.json"

DENSE = dict(
    num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
    kv_channels=16, vocab_size=100, padded_vocab_size=128, max_position_embeddings=64,
)
MOE = dict(DENSE, num_experts=4, topk=2, moe_ffn_hidden_size=96, moe_pattern=(1, 1))
SHARED_MIXED = dict(shared_expert_size=96, moe_pattern=(1, 0))
# case: (ModelDims fields, export formats)
CASES = {
    "dense": (dict(DENSE), ["llama"]),
    "vanilla": (dict(MOE), ["mixtral"]),
    "vanilla-shared-gate": (dict(MOE, **SHARED_MIXED, shared_expert_gate=True, qkv_bias=True), ["qwen2_moe"]),
    "lowrank": (dict(MOE, ders_kind="lowrank", ders_rank=2, ders_alpha=4.0), ["mixtral", "ders"]),
    "sparse-shared-gate": (dict(MOE, **SHARED_MIXED, ders_kind="sparse", ders_drop_rate=0.9,
                                shared_expert_gate=True, tie_embeddings=True), ["qwen2_moe", "ders"]),
    "dense-shared-presoftmax": (dict(MOE, **SHARED_MIXED, ders_kind="dense", router_pre_softmax=True),
                                ["qwen2_moe", "ders"]),
    "lowrank-extended-shared": (dict(MOE, shared_expert_size=96, ders_kind="lowrank", ders_rank=3,
                                     ders_shared_expert=True), ["qwen2_moe", "ders"]),
    "codec-quant4-magnitude": (dict(MOE, ders_kind="codec", ders_codecs="fc1:quant:4,fc2:magnitude:0.9",
                                    ders_quant_group_size=32), ["mixtral", "ders"]),
}
# name: (UpcycleConfig fields); input: the dense case
UPCYCLES = {
    "vanilla": dict(kind="vanilla", num_experts=4),
    "lowrank": dict(kind="lowrank", num_experts=4, rank=2, seed=11),
    "sparse-shared-ders": dict(kind="sparse", num_experts=4, drop_rate=0.9, seed=12, shared_expert="ders",
                               moe_layer_freq=2),
    "dense-shared-full": dict(kind="dense", num_experts=4, shared_expert="full", topk=1, renormalize_topk=False),
}
# "case/fmt": (import_hf keywords); input: that case's export in fmt, imported back
IMPORTS = {
    "dense/llama": dict(make_vocab_size_divisible_by=48, tensor_parallel_size=2),  # 100 -> 192 rows
    "vanilla/mixtral": dict(),
    "vanilla-shared-gate/qwen2_moe": dict(),
    "sparse-shared-gate/qwen2_moe": dict(),  # tied embeddings, a dense layer, synthesized experts
}
# name: (CompressConfig fields); input: the vanilla case, dense base from the dense case
# The vanilla case's experts are random, not fine-tuned copies of the dense FFN: these digests
# guard the output format, so the delta-size guard (--max-delta-norm) is lifted.
_ANY_DELTA = dict(max_delta_norm=float("inf"))
COMPRESSIONS = {
    "dare": dict(codecs="dare:0.9", base="dense", **_ANY_DELTA),
    "quant4": dict(codecs="quant:4", base="dense", group_size=32, **_ANY_DELTA),
    "mean-svd": dict(codecs="svd:4", base="mean", **_ANY_DELTA),
    "mixed": dict(codecs="fc1:quant:2,fc2:magnitude:0.8", base="dense", group_size=16, **_ANY_DELTA),
}


def sha256_file(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def folder_digests(folder) -> dict[str, str]:
    """sha256 of every file below ``folder``, by relative path."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def tensor_digests(root) -> dict[str, str]:
    """sha256 of (dtype, shape, bytes) of every tensor of a torch_dist checkpoint, by key."""
    import torch

    from ders_megatron.io.checkpoint import load_full_tensors, tensor_shapes

    keys = sorted(tensor_shapes(root))
    tensors = load_full_tensors(root, keys)
    out = {}
    for key in keys:
        t = tensors[key].contiguous()
        head = f"{t.dtype}/{tuple(t.shape)}/".encode()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        out[key] = hashlib.sha256(head + raw).hexdigest()
    return out


def make_checkpoints() -> None:
    """Write the input checkpoints (needs the rank pool's single-process megatron)."""
    from ders_megatron.convert.hf.dims import ModelDims
    from ders_megatron.convert.hf.megatron_model import checkpoint_args
    from ders_megatron.testing.hf import save_megatron, tokens
    from ders_megatron.testing.distributed import run_distributed

    for case, (fields, _) in CASES.items():
        target = DATA / case
        if target.exists():
            raise SystemExit(f"{target} exists; remove it first")
        args = checkpoint_args(ModelDims(**fields))
        run_distributed(save_megatron, 1, str(target), args, tokens())


def export_digests(case: str, fmt: str) -> dict[str, str]:
    from ders_megatron.convert.hf import export_hf

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no tokenizer files")
        out = Path(tmp) / "out"
        export_hf(str(DATA / case), str(out), fmt=fmt, progress=False)
        return folder_digests(out)


def upcycle_digests(name: str) -> dict[str, str]:
    from ders_megatron.convert.upcycle import UpcycleConfig, upcycle_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        upcycle_checkpoint(str(DATA / "dense"), str(out), UpcycleConfig(**UPCYCLES[name]))
        return tensor_digests(out)


def compress_digests(name: str) -> dict[str, str]:
    from ders_megatron.convert.compress.pipeline import CompressConfig, compress_checkpoint

    fields = dict(COMPRESSIONS[name])
    if fields["base"] == "dense":
        fields["dense_root"] = str(DATA / "dense")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        compress_checkpoint(str(DATA / "vanilla"), str(out), CompressConfig(**fields))
        return tensor_digests(out)


def import_digests(name: str) -> dict[str, str]:
    from ders_megatron.convert.hf import export_hf
    from ders_megatron.convert.hf.importer import import_hf

    case, fmt = name.split("/")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no tokenizer files")
        hf, out = Path(tmp) / "hf", Path(tmp) / "out"
        export_hf(str(DATA / case), str(hf), fmt=fmt, progress=False)
        import_hf(str(hf), str(out), **IMPORTS[name])
        return tensor_digests(out)


def all_digests() -> dict:
    return {
        "export": {f"{case}/{fmt}": export_digests(case, fmt) for case, (_, fmts) in CASES.items() for fmt in fmts},
        "upcycle": {name: upcycle_digests(name) for name in UPCYCLES},
        "compress": {name: compress_digests(name) for name in COMPRESSIONS},
        "import": {name: import_digests(name) for name in IMPORTS},
    }


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "checkpoints":
        make_checkpoints()
    elif what == "digests":
        from ders_megatron.testing.distributed import run_distributed

        digests = run_distributed(all_digests, 1)[0]
        DIGESTS.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
        print(f"wrote {DIGESTS}: {sum(len(v) for v in digests.values())} outputs")
    else:
        raise SystemExit("usage: python tests/golden.py checkpoints|digests")
