"""One fine-tuning run: ``torchrun examples/pretrain_gpt_ders.py`` from an imported or
upcycled checkpoint, with a progress bar fed by the run's loss log, and a summary
(losses, peak memory per rank, parameter census, time per iteration) read from
its output.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ders_megatron.pipeline.config import PipelineConfig
from ders_megatron.pipeline.launch import PRETRAIN, device_flags, run_logged, torchrun_cmd

# training_utils.peak_memory_line: "peak CPU memory (max RSS): X MiB" / "peak GPU memory allocated: X MiB"
PEAK = re.compile(r"\[ders\] rank (\d+): peak .*?: ([\d.]+) MiB")
# training_utils.accounting_lines: weights + grads + optimizer state of the whole model (all ranks)
STATE = re.compile(r"\[ders\] params\+grads\+optimizer state: (?:this model )?([\d.]+) MiB")
CENSUS = re.compile(r"\[ders\] parameters \(whole model\): (.*)")
ITER_MS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*elapsed time per iteration \(ms\): ([\d.]+)")


def model_flags(checkpoint: Path) -> list[str]:
    """The Megatron flags of the model a checkpoint holds (its shape, MoE and DeRS settings)."""
    from ders_megatron.io.checkpoint import load_common
    from ders_megatron.convert.hf.dims import ModelDims
    from ders_megatron.convert.hf.megatron_model import megatron_argv

    return megatron_argv(ModelDims.from_args(load_common(checkpoint)["args"]))


def data_flags(data_json: Path) -> list[str]:
    """Tokenizer and data flags that tools/preprocess_data.py wrote for the training split.

    The model's ``--vocab-size`` (from :func:`model_flags`) is kept: it may exceed the
    tokenizer's, and the padded embedding must match the checkpoint.
    """
    summary = json.loads(data_json.read_text())
    flags = ["--tokenizer-type", "NullTokenizer", "--data-path", summary["data_path"], "--split", "100,0,0"]
    return flags + ["--null-tokenizer-eod-id", str(summary["eod_id"])]


def training_flags(cfg: PipelineConfig, moe: bool, load: Path, save: Path, loss_log: Path) -> list[str]:
    warmup = min(3, cfg.iters - 1)
    flags = [
        "--seq-length", cfg.seq_length, "--micro-batch-size", cfg.micro_batch_size,
        "--global-batch-size", cfg.global_batch_size, "--train-iters", cfg.iters,
        "--lr", f"{cfg.lr:g}", "--min-lr", f"{cfg.lr / 10:g}", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", warmup,
        "--clip-grad", 1.0, "--weight-decay", 0.0, "--seed", cfg.seed,
        "--load", load, "--no-load-optim", "--no-load-rng",  # an imported / upcycled release checkpoint
        "--save", save, "--save-interval", cfg.iters, "--no-save-optim", "--no-save-rng",
        "--log-interval", 1, "--eval-iters", 0, "--ders-loss-log", loss_log,
        *device_flags(),
    ]
    if moe:
        flags += ["--expert-model-parallel-size", cfg.ep, "--moe-aux-loss-coeff", cfg.aux_loss_coeff]
    return [str(f) for f in flags] + list(cfg.extra_train_args)


def _progress(loss_log: Path):
    def poll():
        if not loss_log.is_file():
            return 0, {}
        lines = [json.loads(line) for line in loss_log.read_text().splitlines() if line.strip()]
        if not lines:
            return 0, {}
        last = max(r["iteration"] for r in lines)
        rows = [r for r in lines if r["iteration"] == last]
        return last, {"loss": f"{sum(r['sum'] for r in rows) / max(1, sum(r['tokens'] for r in rows)):.3f}"}

    return poll


def train(cfg: PipelineConfig, name: str, load: Path, save: Path, data_json: Path, out_dir: Path, log: Path,
          moe: bool) -> dict:
    """Fine-tune ``load`` into ``save``; returns (and writes ``out_dir/<name>.json``) the summary."""
    from ders_megatron.training.utils import read_loss_log

    out_dir.mkdir(parents=True, exist_ok=True)
    loss_log = out_dir / f"{name}.losses.jsonl"
    loss_log.unlink(missing_ok=True)
    flags = [*model_flags(load), *data_flags(data_json), *training_flags(cfg, moe, load, save, loss_log)]
    seconds = run_logged(torchrun_cmd(PRETRAIN, flags, cfg.nproc), log, f"train {name}",
                         poll=_progress(loss_log), total=cfg.iters)
    summary = {"seconds": seconds, **parse_log(log.read_text(errors="replace")),
               "losses": {str(k): v for k, v in read_loss_log(loss_log).items()}}
    return summary


def parse_log(text: str) -> dict:
    """Peak memory per rank, parameter census and steady-state time per iteration."""
    peaks = {}
    for m in PEAK.finditer(text):
        peaks[int(m.group(1))] = float(m.group(2))
    census = {}
    if m := CENSUS.search(text):
        for part in m.group(1).split("|"):
            key, _, value = part.strip().rpartition(" ")
            census[key.strip()] = int(value.replace(",", ""))
    times = [float(ms) for it, ms in ITER_MS.findall(text) if int(it) > 1]  # iteration 1 warms up
    state = STATE.search(text)
    return {"peak_mib_per_rank": [peaks[r] for r in sorted(peaks)], "census": census,
            "state_mib": float(state.group(1)) if state else None,
            "seconds_per_iter": sum(times) / len(times) / 1000 if times else None}


def loss_trend(losses: dict) -> tuple[float, float]:
    """Mean LM loss of the first and of the last five iterations (fewer for short runs)."""
    values = list(losses.values())
    n = max(1, min(5, len(values) // 2))
    return sum(values[:n]) / n, sum(values[-n:]) / n
