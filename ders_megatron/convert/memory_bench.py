"""Peak memory of the streamed conversions against the largest layer (issue 18).

A synthetic Llama-family model of random weights (any size, any dtype; written tensor
by tensor through the key map's HF names and shapes, so the generator never holds
the model either) goes through the three streamed tools, each measured in a child
process of its own:

* ``import``: HF folder -> megatron checkpoint (:func:`~ders_megatron.convert.hf.importer.import_hf`);
* ``export``: that checkpoint -> HF folder (:func:`~ders_megatron.convert.hf.exporter.export_hf`);
* ``upcycle``: that checkpoint -> a DeRS MoE checkpoint (:func:`~ders_megatron.convert.upcycle.upcycle_checkpoint`);
* ``reference`` (optional): the in-memory import the streamed one replaced (a float32
  model filled through the key map, then saved), for comparison.

Measurement: the child first runs every step on a tiny model of the same family
(imports, megatron's one-time setup), then per step returns freed heap pages to the
OS (``malloc_trim``), reads ``VmRSS`` (the baseline), resets the high-water mark (``echo 5 >
/proc/self/clear_refs``, Linux >= 4.0) and runs the step; ``VmHWM`` afterwards is
its peak. ``above`` = peak - baseline is what the step itself needed, to be
compared with the largest layer (the largest of one decoder layer's tensors, the
embedding and the output layer, in the source's dtype).
"""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ders_megatron.convert.hf.dims import ModelDims
from ders_megatron.convert.hf.hf_files import ShardedSafetensorsWriter
from ders_megatron.convert.hf.keymap import all_maps

MIB = 2**20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class SyntheticModel:
    """A Llama (dense) model's shape; the defaults are a 2.3 GB bf16 model."""

    num_layers: int = 20
    hidden_size: int = 2048
    ffn_hidden_size: int = 5632
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    vocab_size: int = 32000
    dtype: str = "bfloat16"

    def hf_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.ffn_hidden_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, max_position_embeddings=4096,
            tie_word_embeddings=False, dtype=self.dtype, architectures=["LlamaForCausalLM"],
        )

    def dims(self) -> ModelDims:
        return ModelDims.from_hf_config(self.hf_config())

    def tensor_bytes(self) -> dict[str, int]:
        """Bytes per layer ("embedding", "output", "layer.i") of the HF tensors."""
        size = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        groups: dict[str, int] = {}
        for name, shape in hf_tensors(self.dims()):
            group = "embedding" if "embed_tokens" in name else "output" if "lm_head" in name else (
                "layer." + name.split(".")[2] if ".layers." in name else "final norm")
            groups[group] = groups.get(group, 0) + size * _numel(shape)
        return groups

    @property
    def largest_layer_bytes(self) -> int:
        return max(self.tensor_bytes().values())

    @property
    def total_bytes(self) -> int:
        return sum(self.tensor_bytes().values())


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def hf_tensors(dims: ModelDims, family: str = "llama"):
    """(HF name, shape) of every tensor the key map reads, in key-map order."""
    for entry in all_maps(dims, family):
        yield from zip(entry.hf, entry.hf_shapes)


@torch.no_grad()
def write_synthetic_hf(folder, model: SyntheticModel, seed: int = 0, shard_bytes: int = 512 * MIB) -> Path:
    """An HF folder of random weights (norms near 1, matrices N(0, 0.02²)), sharded with an
    index; one tensor in memory at a time."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[model.dtype]
    writer = ShardedSafetensorsWriter(folder, shard_bytes)
    for name, shape in hf_tensors(model.dims()):
        if "norm" in name:
            tensor = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            tensor = 0.02 * torch.randn(shape, generator=gen)
        writer.add(name, tensor.to(dtype))
        del tensor
    writer.finish()
    model.hf_config().save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- #
# The child process
# --------------------------------------------------------------------------- #
def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so that one step's
    freed memory does not sit in the next step's baseline RSS."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the baseline may then include freed pages
        pass


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def run_step(step: dict) -> None:
    """One conversion, as the tools run it."""
    kind, src, out = step["kind"], step["src"], step["out"]
    if kind == "import":
        from ders_megatron.convert.hf.importer import import_hf

        import_hf(src, out, force=True)
    elif kind == "export":
        from ders_megatron.convert.hf.exporter import export_hf

        export_hf(src, out, fmt="llama", max_shard_size=step.get("max_shard_size", "5GB"), force=True,
                  progress=False)
    elif kind == "upcycle":
        from ders_megatron.convert.upcycle import UpcycleConfig, upcycle_checkpoint

        upcycle_checkpoint(src, out, UpcycleConfig(**step.get("config", {})), force=True,
                           file_bytes=step.get("file_bytes"))
    elif kind == "reference":
        _reference_import(src, out)
    else:
        raise ValueError(f"unknown step {kind!r}")


def _reference_import(src, out) -> None:
    """The in-memory import the streamed one replaced: a float32 model, filled, saved."""
    from ders_megatron.convert.hf.importer import load_hf_weights, read_hf_config
    from ders_megatron.convert.hf.megatron_model import gpt_from_dims
    from ders_megatron.io.checkpoint import save_model
    from ders_megatron.io.session import single_rank_megatron

    config = read_hf_config(src)
    dims = ModelDims.from_hf_config(config)
    with single_rank_megatron():
        model = gpt_from_dims(dims)
        load_hf_weights(model, src, dims, config.model_type)
        save_model(model, out)


def child_main(spec_path: str) -> None:
    """Warm up on the tiny steps, then measure each step: prints one JSON line."""
    import warnings

    warnings.simplefilter("ignore")
    spec = json.loads(Path(spec_path).read_text())
    for step in spec["warmup"]:
        run_step(step)
    results = []
    for step in spec["steps"]:
        _release_free_memory()
        baseline = _status_kib("VmRSS")
        _reset_peak()
        start = time.perf_counter()
        run_step(step)
        seconds = time.perf_counter() - start
        peak = _status_kib("VmHWM")
        results.append(dict(step=step["kind"], label=step.get("label", step["kind"]), baseline_mib=baseline / 1024,
                            peak_mib=peak / 1024, above_mib=(peak - baseline) / 1024, seconds=seconds))
    print("RESULT " + json.dumps(results))


# --------------------------------------------------------------------------- #
# The parent
# --------------------------------------------------------------------------- #
def measure(model: SyntheticModel, workdir, *, steps=("import", "export", "upcycle"), export_shard="5GB",
            upcycle: dict | None = None, upcycle_file_bytes: int | None = None, timeout: float = 1800) -> dict:
    """Write the synthetic model under ``workdir``, run ``steps`` in one child process;
    returns the model's figures and one record per step. ``export_shard`` is export's
    ``--max-shard-size``, ``upcycle_file_bytes`` upcycle's ``--file-bytes`` (None: its default)."""
    workdir = Path(workdir)
    upcycle = upcycle or dict(kind="lowrank", num_experts=8, topk=2, rank=4)
    tiny = replace(model, num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128)
    plans = {}
    for name, shape in (("tiny", tiny), ("model", model)):
        src = write_synthetic_hf(workdir / name / "hf", shape)
        ckpt, root = str(workdir / name / "megatron"), workdir / name
        plans[name] = {
            "import": dict(kind="import", src=str(src), out=ckpt),
            "export": dict(kind="export", src=ckpt, out=str(root / "export"), max_shard_size=export_shard,
                           label=f"export (--max-shard-size {export_shard})"),
            "upcycle": dict(kind="upcycle", src=ckpt, out=str(root / "upcycled"), config=upcycle,
                            file_bytes=upcycle_file_bytes,
                            label=f"upcycle ({upcycle['kind']}, {upcycle['num_experts']} experts, --file-bytes "
                            f"{'256 MiB (default)' if upcycle_file_bytes is None else f'{upcycle_file_bytes / MIB:.0f} MiB'})"),
            "reference": dict(kind="reference", src=str(src), out=str(root / "reference")),
        }
    # export and upcycle read the import: it always runs first.
    order = ["import"] + [s for s in steps if s != "import"]
    spec = {"warmup": [plans["tiny"][s] for s in order], "steps": [plans["model"][s] for s in order]}
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    code = "import sys; from ders_megatron.convert.memory_bench import child_main; child_main(sys.argv[1])"
    root = str(Path(__file__).resolve().parents[2])
    env = {"TORCHDYNAMO_DISABLE": "1", "PYTHONPATH": root}
    import os

    result = subprocess.run([sys.executable, "-c", code, str(spec_path)], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **env}, cwd=root)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"the measuring process failed ({result.returncode}): {result.stderr[-3000:]}")
    records = json.loads(lines[-1][len("RESULT "):])
    if "import" not in steps:
        records = records[1:]
    return {"model": asdict(model), "total_mib": model.total_bytes / MIB,
            "largest_layer_mib": model.largest_layer_bytes / MIB, "steps": records}


def format_table(report: dict, overhead_mib: float) -> str:
    layer = report["largest_layer_mib"]
    lines = [f"model: {report['total_mib']:.0f} MiB of {report['model']['dtype']} tensors, largest layer "
             f"{layer:.0f} MiB; bound = 3 x largest layer + {overhead_mib:.0f} MiB = {3 * layer + overhead_mib:.0f} MiB",
             "", "| step | baseline MiB | peak MiB | above baseline MiB | x largest layer | within bound | s |",
             "|---|---|---|---|---|---|---|"]
    for r in report["steps"]:
        ok = r["above_mib"] <= 3 * layer + overhead_mib
        lines.append(f"| {r['label']} | {r['baseline_mib']:.0f} | {r['peak_mib']:.0f} | {r['above_mib']:.0f} | "
                     f"{r['above_mib'] / layer:.2f} | {'yes' if ok else 'no'} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def temporary_workdir():
    return tempfile.TemporaryDirectory(prefix="ders-memory-bench-")
