"""The project's main job (``./main.sh``): a small DeRS MoE training run in Megatron's loop.

For now: tokenize real text (the King James Bible from Debian's ``bible-kjv``
packages when they can be fetched, else the Genesis excerpt shipped in
``examples/data``) to bytes, then ``torchrun`` ``examples/pretrain_gpt_ders.py``
on 2 ranks (expert parallel by default) with a tiny GPT whose MoE layers are
DeRS experts, and print the per-iteration losses, the parameter accounting and
peak memory. ``--cpu`` is passed when CUDA is absent.

    ./main.sh                      # 40 iterations, DeRS-LM (rank 4), EP=2
    ./main.sh --delta sparse --iters 60 --layout tp
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = REPO / "examples" / "pretrain_gpt_ders.py"
EXCERPT = REPO / "examples" / "data" / "kjv_genesis.txt"
KJV_PACKAGES = ("bible-kjv-text", "bible-kjv")

# A tiny GPT (hidden 64, 2 layers, 4 experts top-2, seq 64) with byte-level data.
# --make-vocab-size-divisible-by 256 pads 257 ids to 512 at TP 1 and 2 alike.
TINY_MODEL = (
    "--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 "
    "--seq-length 64 --max-position-embeddings 64 --micro-batch-size 2 --global-batch-size 4 "
    "--position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear "
    "--untie-embeddings-and-output-weights --hidden-dropout 0 --attention-dropout 0 "
    "--num-experts 4 --moe-router-topk 2 --moe-token-dispatcher-type alltoall "
    "--tokenizer-type NullTokenizer --vocab-size 257 --make-vocab-size-divisible-by 256 "
    "--lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 3 --clip-grad 1.0 "
    "--weight-decay 0.01 --log-interval 1 --eval-iters 0 --seed 1234"
).split()

LAYOUTS = {
    "dp": [],
    "ep": ["--expert-model-parallel-size", "2"],
    "tp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "pp": ["--pipeline-model-parallel-size", "2"],
}


def device_flags() -> list[str]:
    import torch

    return [] if torch.cuda.is_available() else ["--cpu"]


def torchrun(flags, nproc: int = 2, log_path=None, timeout: float | None = None):
    """Run the pretraining script under ``torchrun --standalone`` (a free port each time)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(PRETRAIN), *map(str, flags)]
    out = open(log_path, "w") if log_path else subprocess.PIPE
    try:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True,
                              env=env, timeout=timeout, cwd=REPO)
    finally:
        if log_path:
            out.close()


# --------------------------------------------------------------------------- #
# Text
# --------------------------------------------------------------------------- #
def fetch_kjv(cache: Path, timeout: float = 120) -> Path | None:
    """The King James Bible from Debian's packages (public domain), cached; None if offline."""
    target = cache / "kjv.txt"
    if target.is_file():
        return target
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", *KJV_PACKAGES], cwd=tmp, check=True,
                           capture_output=True, timeout=timeout)
            root = Path(tmp) / "root"
            for deb in Path(tmp).glob("*.deb"):
                subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True,
                               capture_output=True)
            text = subprocess.run([str(root / "usr/bin/bible"), "-f", "-p", str(root / "usr/lib"),
                                   "gen1:1-rev22:21"], check=True, capture_output=True, text=True,
                                  timeout=timeout).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    cache.mkdir(parents=True, exist_ok=True)
    target.write_text(_chapters(text))
    return target


def _chapters(verses: str) -> str:
    """``Ge1:1 In the beginning...`` lines -> verse text, a blank line between chapters."""
    out, previous = [], None
    for line in verses.splitlines():
        ref, _, text = line.partition(" ")
        chapter = ref.split(":")[0]
        if previous is not None and chapter != previous:
            out.append("")
        out.append(text)
        previous = chapter
    return "\n".join(out) + "\n"


def find_text(cache: Path, download: bool) -> Path:
    return (fetch_kjv(cache) if download else None) or EXCERPT


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="main_job", description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=40, help="training iterations (default 40)")
    p.add_argument("--delta", choices=("lowrank", "sparse", "dense"), default="lowrank",
                   help="--moe-ders kind (default lowrank)")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="ep",
                   help="2-rank parallel layout: dp, ep (default), tp (+SP), pp")
    p.add_argument("--text", type=Path, default=None, help="train on this text file instead")
    p.add_argument("--no-download", action="store_true",
                   help="do not fetch the KJV Debian packages; use the shipped excerpt")
    p.add_argument("--mock-data", action="store_true", help="Megatron's mock data, no text")
    p.add_argument("--workdir", type=Path, default=None, help="keep data, logs, checkpoint here")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ders-megatron",
                   help="where the fetched KJV text is kept")
    p.add_argument("--save", action="store_true", help="save a checkpoint at the end")
    return p


def _data_flags(args, workdir: Path) -> list[str]:
    if args.mock_data:
        return ["--mock-data"]
    sys.path.insert(0, str(REPO / "tools"))
    from preprocess_data import build_parser as preprocess_parser, preprocess

    text = args.text or find_text(args.cache, not args.no_download)
    print(f"[main_job] text: {text} ({text.stat().st_size / 1e6:.2f} MB)", flush=True)
    prefix = workdir / "data" / "text"
    summary = preprocess(preprocess_parser().parse_args(
        ["--input", str(text), "--output-prefix", str(prefix), "--quiet"]))
    print(f"[main_job] {summary['documents']:,} documents, {summary['tokens']:,} byte tokens",
          flush=True)
    return ["--data-path", str(prefix), "--split", "98,2,0"]


def run(args, workdir: Path) -> int:
    from ders_megatron.training_utils import read_loss_log

    loss_log, log = workdir / "losses.jsonl", workdir / "train.log"
    loss_log.unlink(missing_ok=True)
    flags = [*TINY_MODEL, *device_flags(), *LAYOUTS[args.layout], *_data_flags(args, workdir),
             "--moe-ders", args.delta, "--train-iters", str(args.iters),
             "--lr-warmup-iters", str(min(3, args.iters - 1)),
             "--ders-loss-log", str(loss_log)]
    if not args.mock_data:  # evaluate on the held-out 2% twice
        flags += ["--eval-interval", str(max(args.iters // 2, 1)), "--eval-iters", "2"]
    if args.save:
        flags += ["--save", str(workdir / "checkpoint"), "--save-interval", str(args.iters)]
    print(f"[main_job] torchrun 2 ranks, layout {args.layout}, --moe-ders {args.delta}; log: {log}",
          flush=True)
    result = torchrun(flags, nproc=2, log_path=log)
    lines = log.read_text(errors="replace").splitlines()
    if result.returncode != 0:
        print("\n".join(lines[-40:]), file=sys.stderr)
        print(f"[main_job] training failed (exit {result.returncode}); full log: {log}",
              file=sys.stderr)
        return result.returncode
    for line in lines:
        if line.startswith("[ders]"):
            print(line)
        elif "validation loss at iteration" in line:
            print("[main_job] " + line.strip(" |-"))
    losses = read_loss_log(loss_log)
    print("[main_job] iteration  lm loss")
    for iteration, loss in losses.items():
        print(f"[main_job] {iteration:9d}  {loss:.6f}")
    first, last = list(losses.values())[0], list(losses.values())[-1]
    print(f"[main_job] loss {first:.4f} -> {last:.4f} over {len(losses)} iterations")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error("--iters must be >= 1")
    # megatron-core's import-time notices about the absent TE/apex (expected on CPU).
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|absl).*")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return run(args, args.workdir)
    with tempfile.TemporaryDirectory(prefix="ders-main-job-") as tmp:
        return run(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
