"""Processes the pipeline starts: the tools and the torchrun training script.

Every tool runs as its own process with its output in a log file, exactly as a
user would type it (the command line is logged too), so any step can be rerun by
hand. :func:`run_logged` shows a tqdm timer while it waits (only on a terminal).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "examples" / "pretrain_gpt_ders.py"
TOOLS = REPO / "tools"
EXCERPT = REPO / "examples" / "data" / "kjv_genesis.txt"

# A tiny GPT (hidden 64, 2 layers, 4 experts top-2, seq 64) with byte-level data:
# the smoke-test model of tests/test_training.py.
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


class StepFailed(RuntimeError):
    """A pipeline process exited non-zero; the message names its log."""


def device_flags() -> list[str]:
    """``--cpu`` for a child where this machine has no CUDA (asked of the machine, not of
    this process, whose in-process scoring runs on the CPU runtime, io/session.py)."""
    from ders_megatron.layers.runtime import cuda_present

    return [] if cuda_present() else ["--cpu"]


def child_env(threads: int = 1) -> dict[str, str]:
    """Environment of every child: the repo importable, dynamo off (megatron's jit
    fuser is torch.compile), ``threads`` BLAS threads per process."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, OMP_NUM_THREADS=str(threads), TORCHDYNAMO_DISABLE="1", PYTHONPATH=path)


def torchrun_cmd(script: Path, flags, nproc: int) -> list[str]:
    """``torchrun --standalone`` (a free port each time) of ``script``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            str(script), *map(str, flags)]


def torchrun(flags, nproc: int = 2, log_path=None, timeout: float | None = None):
    """Run the pretraining script on ``nproc`` ranks; stdout+stderr to ``log_path`` or piped."""
    out = open(log_path, "w") if log_path else subprocess.PIPE
    try:
        return run_bounded(torchrun_cmd(PRETRAIN, flags, nproc), stdout=out, stderr=subprocess.STDOUT,
                           env=child_env(), timeout=timeout)
    finally:
        if log_path:
            out.close()


def run_bounded(cmd: list[str], *, timeout: float | None, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, text=True)``, except that a timeout (or an interrupt) ends every
    process ``cmd`` started, not only ``cmd``.

    ``subprocess.run`` kills only its child: torchrun's workers (started in sessions
    of their own by torch.distributed.elastic) or a pipeline's steps would live on
    and load the machine. stdin is closed, so nothing can wait on a prompt.
    """
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, text=True, env=env,
                            cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        kill_tree(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and all its descendants, whatever session they moved to."""
    _kill([*_descendants(proc), proc], proc)


def _descendants(proc: subprocess.Popen) -> list:
    """The processes ``proc`` started, recursively (psutil handles; empty once it is gone)."""
    import psutil

    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill(victims: list, proc: subprocess.Popen) -> None:
    """SIGKILL every one of ``victims`` still there, then reap ``proc``."""
    import psutil

    for victim in victims:
        try:
            victim.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    proc.wait(timeout=30)


def tool_cmd(tool: str, *args) -> list[str]:
    """``python tools/<tool>.py ARGS``."""
    return [sys.executable, str(TOOLS / f"{tool}.py"), *map(str, args)]


def show(cmd: list[str]) -> str:
    """The command as a user would type it (repo-relative tool paths)."""
    parts = [("python" if c == sys.executable else os.path.relpath(c, REPO) if c.startswith(str(TOOLS)) or
              c == str(PRETRAIN) else c) for c in map(str, cmd)]
    return shlex.join(parts)


def run_logged(cmd: list[str], log: Path, desc: str, *, threads: int | None = None,
               poll: Callable[[], tuple[int, dict]] | None = None, total: int | None = None) -> float:
    """Run ``cmd`` with its output in ``log``; a tqdm bar while it runs.

    ``poll`` (optional) returns (progress, postfix) for the bar, e.g. training
    iterations read from the loss log. Raises :class:`StepFailed` with the log's
    tail on a non-zero exit. Returns the wall time in seconds.
    """
    from tqdm.auto import tqdm

    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = child_env(threads or (1 if poll else os.cpu_count() or 1))
    with open(log, "w") as out:
        out.write(f"$ {show(cmd)}\n")
        out.flush()
        # Its own session, so that an interrupt ends torchrun's workers too (by group id).
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO, start_new_session=True)
        bar = tqdm(total=total, desc=desc, unit="it" if poll else "s", disable=None, leave=False,
                   dynamic_ncols=True)
        try:
            while not _wait(proc, 1.0):
                if poll is not None:
                    done, postfix = poll()
                    bar.update(done - bar.n)
                    bar.set_postfix(postfix, refresh=False)
                else:
                    bar.update(1)
        except BaseException:
            _end_group(proc)
            raise
        finally:
            bar.close()
    if proc.returncode != 0:
        raise StepFailed(f"{desc} failed (exit {proc.returncode}); log: {log}\n{_error_lines(log)}")
    return time.perf_counter() - start


def _wait(proc: subprocess.Popen, seconds: float) -> bool:
    """True once ``proc`` has exited; waits at most ``seconds``."""
    try:
        proc.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def _error_lines(log: Path) -> str:
    """The error lines of a failed process's log (its last lines if none is recognised)."""
    lines = log.read_text(errors="replace").splitlines()
    errors = [line for line in lines if re.search(r"\w+(Error|Exception)\b|error:", line)
              and "ChildFailedError" not in line and "elastic" not in line]
    picked = list(dict.fromkeys(errors))[-5:] or lines[-20:]
    return "\n".join(picked)


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group we started (torchrun then stops its workers), and after
    10 s SIGKILL whatever is left of the tree. The tree is listed first: torchrun's
    workers run in sessions of their own, and once torchrun has exited they can no
    longer be found from ``proc``."""
    descendants = _descendants(proc)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    _kill([*descendants, *_descendants(proc), proc], proc)
