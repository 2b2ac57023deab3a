"""The compression report: sizes before/after, per-layer reconstruction, held-out loss.

Sizes are the tensors' bytes as stored in the two checkpoints (numel × element
size from their metadata: packed uint8 codes, int32 indices, int64 seeds count
what they really take), split into the MoE layers (routed experts, shared
expert, router) and the whole model; optimizer state is not counted.
"""

from __future__ import annotations

import torch

from ders_megatron.core.config import codecs_spec

MOE_PARTS = (".mlp.experts.", ".mlp.router.", ".mlp.shared_experts.")


def checkpoint_sizes(root) -> dict:
    """Bytes and element counts of a checkpoint's model tensors, MoE layers apart."""
    from ders_megatron.io.checkpoint import tensor_shapes

    sizes = {"model_bytes": 0, "moe_bytes": 0, "model_numel": 0, "moe_numel": 0}
    for key, (shape, dtype) in tensor_shapes(root).items():
        if key.startswith("optimizer."):
            continue
        numel = 1
        for size in shape:
            numel *= size
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        sizes["model_bytes"] += nbytes
        sizes["model_numel"] += numel
        if any(part in key for part in MOE_PARTS):
            sizes["moe_bytes"] += nbytes
            sizes["moe_numel"] += numel
    return sizes


def build_report(moe_root, out_root, cfg, table, stats: dict, evaluation: dict) -> dict:
    before, after = checkpoint_sizes(moe_root), checkpoint_sizes(out_root)
    layers = []
    for layer in sorted(stats):
        for owner, per_matrix in stats[layer].items():
            for matrix, values in per_matrix.items():
                layers.append({"layer": layer, "owner": owner, "matrix": matrix, **values})
    report = {
        "input": str(moe_root),
        "output": str(out_root),
        "codecs": codecs_spec(table),
        "base": cfg.base,
        "dense": str(cfg.dense_root) if cfg.base == "dense" else None,
        "shared_expert": cfg.shared_expert,
        "before": before,
        "after": after,
        "compression": {
            "moe_layers": before["moe_bytes"] / max(after["moe_bytes"], 1),
            "model": before["model_bytes"] / max(after["model_bytes"], 1),
        },
        "layers": layers,
    }
    if evaluation:
        report["eval"] = evaluation
        if "before" in evaluation and "after" in evaluation:
            loss0, loss1 = evaluation["before"]["loss"], evaluation["after"]["loss"]
            report["eval"]["relative_loss_change"] = (loss1 - loss0) / loss0
    return report


def base_text(report: dict) -> str:
    """The base in words: ``dense (FFN of DIR)``, ``mean`` or ``fisher``."""
    if report["base"] != "dense":
        return report["base"]
    scale = report.get("fc2_scale")
    if scale is None or report.get("shared_expert_init") is None or scale == 1.0 and not report.get("shared_expert_init_inferred"):
        return f"dense (the FFN of {report['dense']})"
    how = "read off the weights" if report.get("shared_expert_init_inferred") else "--shared-expert-init"
    return (f"dense (the FFN of {report['dense']}, fc2 x{scale:.4g} as the upcycler's "
            f"{report['shared_expert_init']} shared-expert init: {how})")


def format_report(report: dict) -> str:
    """A plain-text summary and per-layer table."""
    mib = 2**20
    b, a, c = report["before"], report["after"], report["compression"]
    lines = [
        f"DeRS compression {report['input']} -> {report['output']}",
        f"  codecs {report['codecs']}, base {base_text(report)}, shared expert {report['shared_expert']}",
        f"  MoE layers: {b['moe_bytes'] / mib:.3f} MiB -> {a['moe_bytes'] / mib:.3f} MiB  (x{c['moe_layers']:.2f})",
        f"  model:      {b['model_bytes'] / mib:.3f} MiB -> {a['model_bytes'] / mib:.3f} MiB  (x{c['model']:.2f})",
    ]
    if "eval" in report:
        ev = report["eval"]
        for when in ("before", "after"):
            if when in ev:
                lines.append(f"  held-out {when:6s}: loss {ev[when]['loss']:.4f}  ppl {ev[when]['perplexity']:.3f}  "
                             f"({ev[when]['tokens']} tokens)")
        if "relative_loss_change" in ev:
            lines.append(f"  relative loss change: {100 * ev['relative_loss_change']:+.2f}%")
    lines.append(f"  {'layer':>5} {'owner':>7} {'matrix':>9} {'|Δ|/|W|':>9} {'rel.err':>9} {'Δ rel.err':>10} "
                 f"{'cos min':>9} {'cos mean':>9}")
    for row in report["layers"]:
        lines.append(
            f"  {row['layer']:>5} {row['owner']:>7} {row['matrix']:>9} {row['delta_norm']:>9.2e} {row['rel_error']:>9.2e} "
            f"{row['delta_rel_error']:>10.3f} {row['cosine_min']:>9.6f} {row['cosine_mean']:>9.6f}"
        )
    return "\n".join(lines)
