"""Run test bodies on N gloo ranks, with megatron-core parallel state.

Spawning a process costs ~3 s of imports, re-initializing megatron's model
parallel state well under 0.1 s. So :class:`DistributedPool` keeps N worker
processes alive (one gloo process group for the pool's life) and runs many
test bodies on them, each under its own parallel layout
(:func:`model_parallel`). A body is a picklable top-level function called as
``fn(*args, **kwargs)`` on every rank; its per-rank return values come back as
a list.

Failure handling: the failing rank's traceback is raised in the parent as
:class:`RankFailure`; a body that outlives its timeout raises ``TimeoutError``
naming the ranks that did not answer. Either way the workers are killed (a
rank stuck in a collective cannot be recovered) and restarted on next use.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from typing import Any, Callable

from ders_megatron.io.session import free_port  # noqa: F401  (re-exported for tests)

DEFAULT_TIMEOUT_S = 300.0
MAX_WORKER_THREADS = 300
_GRACE_AFTER_FAILURE_S = 10.0


class RankFailure(RuntimeError):
    """A test body raised on at least one rank."""


def init_process_group(rank: int, world_size: int, port: int, cpu_runtime: bool = True) -> None:
    """A gloo (nccl with CUDA) rank; with ``cpu_runtime`` megatron-core's CPU runtime on.

    Code that is not megatron-core (DeepSpeed) may want it off: the runtime's
    ``torch.cuda`` redirections make such libraries take their CUDA paths.
    """
    import torch.distributed as dist

    from ders_megatron.layers.runtime import distributed_backend, enable_cpu_runtime

    if cpu_runtime:
        enable_cpu_runtime()
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    dist.init_process_group(backend=distributed_backend(), rank=rank, world_size=world_size)


@contextlib.contextmanager
def model_parallel(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    vpp: int | None = None,
    cp: int = 1,
    seed: int = 1234,
):
    """Initialize megatron-core's parallel state (and RNG tracker) for a block."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    parallel_state.destroy_model_parallel()
    before = _live_groups()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        _destroy_groups_since(before)
        # megatron-core module globals that outlive a model: the MoE metrics tracker
        # (per-layer buffers sized by the first model) and the aux-loss backward scale
        # a pipeline schedule leaves behind (moe_utils.py:331).
        destroy_moe_metrics_tracker()
        MoEAuxLossAutoScaler.main_loss_backward_scale = None


def _live_groups() -> set:
    from torch.distributed import distributed_c10d

    return set(distributed_c10d._world.pg_map)


def _destroy_groups_since(before: set) -> None:
    """megatron's ``destroy_model_parallel`` only drops its references; every gloo
    group keeps its threads and sockets. Re-initializing layouts in a long-lived
    worker would pile up thousands of threads, so destroy what this block created."""
    import torch.distributed as dist

    for group in _live_groups() - before:
        dist.destroy_process_group(group)


def _worker_main(rank, world_size, port, sys_path, env, cpu_runtime, task_queue, result_queue):
    sys.path[:] = sys_path
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    os.environ.update(env)
    try:
        init_process_group(rank, world_size, port, cpu_runtime)
    except BaseException:  # noqa: BLE001 - reported to the parent
        result_queue.put((rank, False, traceback.format_exc()))
        return
    while True:
        task = task_queue.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            result_queue.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - reported to the parent
            result_queue.put((rank, False, traceback.format_exc()))
    import torch.distributed as dist

    # Without it, 2-rank gloo runs sometimes abort at exit.
    dist.destroy_process_group()


class DistributedPool:
    """N persistent gloo ranks that run test bodies (see module docstring)."""

    def __init__(
        self,
        world_size: int,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        cpu_runtime: bool = True,
        env: dict[str, str] | None = None,
    ):
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.cpu_runtime = cpu_runtime
        self.env = dict(env or {})
        self._ctx = mp.get_context("spawn")
        self._procs: list[mp.Process] = []

    def _start(self) -> None:
        port = free_port()
        self._tasks = [self._ctx.Queue() for _ in range(self.world_size)]
        self._results = self._ctx.Queue()
        self._procs = [
            self._ctx.Process(
                target=_worker_main,
                args=(
                    rank, self.world_size, port, list(sys.path), self.env, self.cpu_runtime,
                    self._tasks[rank], self._results,
                ),
                # Not daemonic: dist_checkpointing's async writer starts its own
                # Manager process, which daemonic processes may not do.
                daemon=False,
            )
            for rank in range(self.world_size)
        ]
        for proc in self._procs:
            proc.start()
        atexit.register(self.close, kill=True)

    def run(self, fn: Callable, *args, timeout_s: float | None = None, **kwargs) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results by rank."""
        if not self._procs:
            self._start()
        for task_queue in self._tasks:
            task_queue.put((fn, args, kwargs))
        results, failures = self._collect(timeout_s or self.timeout_s)
        if failures:
            self.close(kill=True)
            details = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
            raise RankFailure(f"{fn.__name__} failed on rank(s) {sorted(failures)}:\n{details}")
        self._recycle_if_bloated()
        return [results[rank] for rank in range(self.world_size)]

    def _recycle_if_bloated(self) -> None:
        """Restart the workers (on next use) once one holds more than
        :data:`MAX_WORKER_THREADS` native threads.

        :func:`model_parallel` destroys the groups it made, but a body that wraps a
        model in megatron's DDP still leaves their gloo threads behind (~57 per body at
        EP=2, measured: no Python reference to the groups survives, so something on the
        C++ side keeps them): a restart (~3 s) costs less than a worker whose idle
        threads compete with the next test's ranks for the cores.
        """
        import psutil

        try:
            threads = max(psutil.Process(proc.pid).num_threads() for proc in self._procs)
        except psutil.NoSuchProcess:
            threads = MAX_WORKER_THREADS + 1
        if threads > MAX_WORKER_THREADS:
            self.close()

    def _collect(self, timeout_s: float):
        results: dict[int, Any] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        grace_deadline = None
        while len(results) + len(failures) < self.world_size:
            now = time.monotonic()
            if failures and grace_deadline is None:
                grace_deadline = now + _GRACE_AFTER_FAILURE_S
            if grace_deadline is not None and now > grace_deadline:
                return results, failures  # the others are stuck in a collective
            if now > deadline:
                missing = sorted(set(range(self.world_size)) - set(results) - set(failures))
                self.close(kill=True)
                raise TimeoutError(f"ranks {missing} did not finish within {timeout_s:.0f} s")
            try:
                rank, ok, payload = self._results.get(timeout=1.0)
                (results if ok else failures)[rank] = payload
            except queue.Empty:
                for rank, proc in enumerate(self._procs):
                    if not proc.is_alive() and rank not in results and rank not in failures:
                        failures[rank] = f"process exited with code {proc.exitcode}"
        return results, failures

    def close(self, kill: bool = False) -> None:
        if not self._procs:
            return
        if not kill:
            for task_queue in self._tasks:
                task_queue.put(None)
            for proc in self._procs:
                proc.join(timeout=30)
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._procs = []


def run_distributed(fn: Callable, world_size: int, *args, timeout_s: float | None = None, **kwargs):
    """One-off: start ``world_size`` ranks, run ``fn`` on each, shut down."""
    pool = DistributedPool(world_size)
    try:
        return pool.run(fn, *args, timeout_s=timeout_s, **kwargs)
    finally:
        pool.close()
