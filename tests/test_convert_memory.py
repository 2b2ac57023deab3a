"""Peak memory of the streamed conversions (issue 18): import, export and upcycling each
stay within 3 x the largest layer + a fixed overhead, measured in a child process
(``ders_megatron.convert.memory_bench``; the >= 2 GB figures: ``tools/bench_memory.py``,
docs/benchmarks.md). The in-memory import they replaced is measured too, so the bound
is shown to tell the two apart."""

import pytest

from ders_megatron.convert.memory_bench import MIB, SyntheticModel, measure

# 240 MiB of bf16 tensors, 8 layers; the largest layer is the embedding (31 MiB), a
# decoder layer is 22 MiB. Small enough for ~40 s, large enough that holding the model
# (the reference: 480 MiB as float32) breaks the bound several times over.
MODEL = SyntheticModel(num_layers=8, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=16,
                       num_key_value_heads=4, vocab_size=16000, dtype="bfloat16")
# The fixed overhead, above 3 layers: the output file floor of import (64 MiB, when a layer is
# smaller), the finiteness check's block (16 MiB of bools) and the DCP writer's plan,
# metadata and allocator slack (measured ~20-40 MiB on tiny models). 128 MiB was exceeded by 1 MiB
# once in a full-suite run (import 222.8 MiB above baseline = 3 x 31.25 + 129): malloc arenas vary
# with the threads a run has started; 160 keeps that margin while the in-memory import this bound
# exists to catch stays far above it (718 MiB in the same run).
OVERHEAD_MIB = 160


def test_streamed_conversions_stay_within_three_layers(tmp_path):
    layer = MODEL.largest_layer_bytes
    # Export runs with its default --max-shard-size (5GB: the whole model in one shard):
    # its memory must not grow with the shard (the shard is spilled to disk, not held).
    report = measure(MODEL, tmp_path, steps=("import", "export", "upcycle", "reference"),
                     export_shard="5GB", upcycle_file_bytes=layer, timeout=300)
    bound = 3 * report["largest_layer_mib"] + OVERHEAD_MIB
    above = {r["step"]: r["above_mib"] for r in report["steps"]}
    for step in ("import", "export", "upcycle"):
        assert above[step] <= bound, (step, above, bound)
    # Not vacuous: the whole-model import is over the bound.
    assert above["reference"] > bound + report["total_mib"], (above, bound)
    assert report["largest_layer_mib"] == pytest.approx(layer / MIB)
