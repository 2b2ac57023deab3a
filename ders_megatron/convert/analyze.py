"""Analysis plots for upcycled MoEs (``tools/analyze.py``), as in the DeRS paper.

* ``similarity``: cosine similarity between the dense FFN weight (or, without a
  dense checkpoint, the expert mean) and every expert, per MoE layer and matrix
  (paper Fig. 1: > 0.999 for upcycled experts). Streams one layer at a time.
* ``sweep``: held-out loss against a codec setting (drop rate, bit width, rank)
  (paper Figs. 4-6). The vanilla MoE is loaded once; for each setting every MoE
  layer's experts are replaced in memory by ``W_base + Δ̂_e`` (synthesized through
  the same codecs and delta modules the compressed checkpoint uses), evaluated,
  and restored.

Plots are PNG files written with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import torch

from ders_megatron.io.checkpoint import CheckpointError
from ders_megatron.core.config import Dare, Magnitude, Quant, parse_codec, parse_codecs
from ders_megatron.core.codecs import storage_bits


def moe_layers(shapes) -> list[int]:
    """0-based global indices of the MoE layers of a vanilla MoE checkpoint."""
    stacked = shapes.get("decoder.layers.mlp.experts.experts.linear_fc1.weight")
    if stacked is not None:
        return list(range(stacked[0][0]))
    layers = sorted(
        int(key.split(".")[2]) for key in shapes
        if key.startswith("decoder.layers.") and key.endswith(".mlp.experts.experts.linear_fc1.weight")
    )
    if not layers:
        raise CheckpointError("not a vanilla MoE checkpoint (no mlp.experts.experts.* tensors)")
    return layers


def expert_similarity(moe_root, dense_root=None) -> dict:
    """{"reference": "dense"|"mean", "layers": [...], "matrices": {matrix: [[cos per expert] per layer]}}."""
    from ders_megatron.core.decomposition import split_fc1
    from ders_megatron.convert.compress.pipeline import LayerSource, read_moe_args
    from ders_megatron.io.session import single_rank_megatron

    with single_rank_megatron():
        args = read_moe_args(moe_root)
        source = LayerSource(moe_root, dense_root)
        gated = bool(args.swiglu)
        layers = moe_layers(source.shapes)
        table: dict[str, list] = {}
        for layer in layers:
            fc1 = source.read(layer, "mlp.experts.experts.linear_fc1.weight")
            fc2 = source.read(layer, "mlp.experts.experts.linear_fc2.weight")
            experts = {**split_fc1(fc1, gated), "fc2": fc2}
            if dense_root is not None:
                dense = {
                    **split_fc1(source.dense_weight(layer, "mlp.linear_fc1.weight", tuple(fc1.shape[1:])), gated),
                    "fc2": source.dense_weight(layer, "mlp.linear_fc2.weight", tuple(fc2.shape[1:])),
                }
            else:
                dense = {m: w.float().mean(0) for m, w in experts.items()}
            for matrix, weights in experts.items():
                ref = dense[matrix].float().flatten()
                cos = torch.nn.functional.cosine_similarity(weights.float().flatten(1), ref.unsqueeze(0), dim=1)
                table.setdefault(matrix, []).append(cos.tolist())
    return {"reference": "dense" if dense_root else "mean", "layers": layers, "matrices": table}


def plot_similarity(similarity: dict, path) -> None:
    """Heat maps (layers x experts), one per matrix, shared colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrices = similarity["matrices"]
    values = torch.tensor([v for rows in matrices.values() for r in rows for v in r])
    low, high = float(values.min()), float(values.max())
    height = max(3.2, 0.45 * len(similarity["layers"]) + 2)
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.0 * len(matrices) + 1.5, height), squeeze=False,
                             constrained_layout=True)
    for i, (ax, (matrix, rows)) in enumerate(zip(axes[0], matrices.items())):
        image = ax.imshow(rows, vmin=low, vmax=high, cmap="viridis", aspect="auto")
        ax.set_title(matrix)
        ax.set_xlabel("expert")
        if i == 0:
            ax.set_ylabel("MoE layer")
        ax.set_yticks(range(len(similarity["layers"])), [str(g) for g in similarity["layers"]])
        ax.set_xticks(range(len(rows[0])))
    fig.colorbar(image, ax=axes[0].tolist(), label=f"cosine(expert, {similarity['reference']} FFN)")
    fig.suptitle("Expert vs. " + ("dense FFN" if similarity["reference"] == "dense" else "expert mean"))
    _save(fig, path)
    plt.close(fig)


def _setting(codec) -> float:
    if isinstance(codec, (Dare, Magnitude)):
        return codec.drop_rate
    if isinstance(codec, Quant):
        return codec.bits
    return codec.rank


@torch.no_grad()
def _synthesize_into(model, codec_text, base, dense_base, calibration, seed, group_size) -> None:
    """Replace every MoE layer's expert weights by W_base + Δ̂_e (in place); ``dense_base``: the
    :class:`~ders_megatron.convert.compress.pipeline.DenseBase` of ``--base dense``, else None."""
    from ders_megatron.core.decomposition import compress_experts, split_fc1

    gated = model.config.gated_linear_unit
    table = parse_codecs(codec_text, group_size)
    for layer in model.decoder.layers:
        experts = getattr(getattr(layer.mlp, "experts", None), "local_experts", None)
        if experts is None:
            continue
        g = layer.layer_number - 1
        fc1 = torch.stack([m.linear_fc1.weight for m in experts])
        fc2 = torch.stack([m.linear_fc2.weight for m in experts])
        weights = {**split_fc1(fc1, gated), "fc2": fc2}
        given = base if dense_base is None else dense_base(g, weights, gated)
        result = compress_experts(weights, table, base=given, layer_number=layer.layer_number, seed=seed,
                                  calibration=(calibration or {}).get(layer.layer_number))
        for e, mlp in enumerate(experts):
            synth = {m: result.base[m] + result.deltas[m].delta_weight(e) for m in weights}
            fc1_e = torch.cat([synth["fc1_gate"], synth["fc1_up"]]) if gated else synth["fc1"]
            mlp.linear_fc1.weight.copy_(fc1_e.to(mlp.linear_fc1.weight.dtype))
            mlp.linear_fc2.weight.copy_(synth["fc2"].to(mlp.linear_fc2.weight.dtype))


def sweep(moe_root, codecs: list[str], *, base: str | None = None, dense_root=None, eval_data, calib_data=None,
          seed: int = 1234, group_size: int = 128, seq_length=None, batch_size: int = 4, eval_batches: int = 16,
          calib_batches: int = 8) -> dict:
    """Held-out loss of the MoE with each codec's synthesized experts (module doc)."""
    from ders_megatron.io.checkpoint import load_model
    from ders_megatron.convert.compress.calibration import calibrate, evaluate, load_tokens, token_batches
    from ders_megatron.convert.compress.pipeline import CompressConfig, DenseBase, LayerSource, read_moe_args
    from ders_megatron.io.session import single_rank_megatron
    from ders_megatron.io.streaming import build_model, single_rank_args

    for text in codecs:  # settings errors before any work; base None: dense (tools/compress.py's rule)
        base = CompressConfig(codecs=text, base=base, dense_root=dense_root, calib_data=calib_data,
                              group_size=group_size).base
    with single_rank_megatron():
        args = read_moe_args(moe_root)
        dense_base = DenseBase(LayerSource(moe_root, dense_root), args) if base == "dense" else None
        model = build_model(single_rank_args(args), None, meta=False, use_te=False)
        load_model(model, moe_root)
        seq = seq_length or args.seq_length
        batches = token_batches(load_tokens(eval_data, args.padded_vocab_size), seq, batch_size, eval_batches)
        calibration = None
        if base == "fisher" or any("wsvd" in c for c in codecs):
            calib = token_batches(load_tokens(calib_data, args.padded_vocab_size), seq, batch_size, calib_batches)
            calibration = calibrate(model, calib, fisher=base == "fisher", gram=True)
        original = {k: v.clone() for k, v in model.state_dict().items()
                    if ".local_experts." in k and isinstance(v, torch.Tensor)}
        baseline = evaluate(model, batches)
        hidden, ffn = args.hidden_size, args.moe_ffn_hidden_size or args.ffn_hidden_size
        matrices = [(ffn, hidden)] * (2 if args.swiglu else 1) + [(hidden, ffn)]
        results = []
        for text in codecs:
            _synthesize_into(model, text, base, dense_base, calibration, seed, group_size)
            codec = parse_codec(text, group_size)
            bits = sum(storage_bits(codec, o, i) for o, i in matrices)
            full = sum(32 * o * i for o, i in matrices)
            results.append({"codec": text, "setting": _setting(codec), **evaluate(model, batches),
                            "delta_bits_per_expert": bits, "expert_bits": full})
            model.load_state_dict(original, strict=False)
    record = dense_base.record() if dense_base is not None else {}
    return {"base": base, **record, "baseline": baseline, "results": results}


def plot_sweep(result: dict, path) -> None:
    """Held-out loss against the codec setting, the uncompressed loss as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    by_kind: dict[str, list] = {}
    for row in result["results"]:
        by_kind.setdefault(row["codec"].split(":")[0], []).append(row)
    for kind, rows in by_kind.items():
        rows = sorted(rows, key=lambda r: r["setting"])
        ax.plot([r["setting"] for r in rows], [r["loss"] for r in rows], marker="o", label=f"{kind} ({result['base']} base)")
    ax.axhline(result["baseline"]["loss"], color="gray", linestyle="--", label="vanilla MoE")
    kinds = set(by_kind)
    ax.set_xlabel("bit width" if kinds == {"quant"} else "drop rate" if kinds <= {"dare", "magnitude"} else "setting")
    ax.set_ylabel("held-out loss")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _save(fig, path) -> None:
    """Save the figure whole or not at all (``io/atomic.py``), in the format its suffix names."""
    from pathlib import Path

    from ders_megatron.io.atomic import atomic_output_files

    with atomic_output_files([path]) as (tmp,):
        fig.savefig(tmp, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
