"""The final table (as the paper's Table 6: size, added parameters, training memory,
quality) and the summary the main job prints, from the steps' records."""

from __future__ import annotations

import math

from ders_megatron.pipeline.train import loss_trend

COLUMNS = ("model", "parameters", "added vs dense", "stored MiB", "weights+grads+Adam MiB", "peak RSS MiB/rank",
           "s/iter", "train loss (first→last 5)", "held-out loss", "held-out ppl")


def build_rows(pipeline, records: dict) -> list[dict]:
    """One dict per scored model (pipeline.rows()), from the eval and train records."""
    dense_params = records["eval-pretrained"]["summary"]["params"]
    rows = []
    for name, (label, root, producer) in pipeline.rows().items():
        ev = records[f"eval-{name}"]["summary"]
        train = records.get(f"train-{name}", {}).get("summary") if producer.startswith("train-") else None
        row = {"name": name, "model": label, "checkpoint": str(root), "parameters": ev["params"],
               "added": ev["params"] - dense_params, "stored_bytes": ev["bytes"], "heldout_loss": ev["loss"],
               "heldout_ppl": ev["perplexity"], "heldout_tokens": ev["tokens"]}
        if train:
            first, last = loss_trend(train["losses"])
            peaks = train["peak_mib_per_rank"]
            row.update(train_loss_first=first, train_loss_last=last, peak_mib_per_rank=max(peaks) if peaks else None,
                       peak_mib_ranks=peaks, seconds_per_iter=train["seconds_per_iter"], train_seconds=train["seconds"],
                       census=train["census"], state_mib=train.get("state_mib"))
        rows.append(row)
    return rows


def _num(n: int) -> str:
    """1,234,567 -> 1.23M (params), signed for the added column."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{sign}{n / scale:.3g}{unit}"
    return f"{sign}{n}"


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the rows."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        trained = "train_loss_first" in r
        cells = [
            r["model"], _num(r["parameters"]), "0" if r["name"] == "pretrained" else _num(r["added"]),
            f"{r['stored_bytes'] / 2**20:.1f}",
            f"{r['state_mib']:.0f}" if r.get("state_mib") else "–",
            f"{r['peak_mib_per_rank']:.0f}" if trained and r.get("peak_mib_per_rank") else "–",
            f"{r['seconds_per_iter']:.2f}" if trained and r.get("seconds_per_iter") else "–",
            f"{r['train_loss_first']:.3f} → {r['train_loss_last']:.3f}" if trained else "–",
            f"{r['heldout_loss']:.4f}", f"{r['heldout_ppl']:.2f}" if math.isfinite(r["heldout_ppl"]) else "inf",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hf_lines(pipeline, records: dict) -> list[str]:
    """Per exported model: format, logits check, greedy continuation."""
    lines = []
    checks = [("pretrained", f"{pipeline.hf_dir.name} (the input, HF)")]
    checks += [(row, f"{row} -> --format {fmt}") for row, fmt in pipeline.exports().items()]
    for row, what in checks:
        rec = records.get(f"hf-check-{row}", {}).get("summary")
        if not rec:
            continue
        status = "match" if rec["logits_match"] else "MISMATCH"
        lines.append(f"{what}: {rec['architecture']}, logits vs Megatron max |diff| {rec['max_abs_diff']:.2e} "
                     f"(max |logit| {rec['max_abs_logit']:.1f}, argmax agreement {100 * rec['argmax_agreement']:.0f}%)"
                     f" -> {status}")
        lines.append(f"    {rec['prompt']!r} -> {rec['continuation']!r}")
    return lines
