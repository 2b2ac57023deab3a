"""One single-process megatron-core session, for the tools and benchmarks.

Tools that build or read a model in one process (upcycling, compression,
conversion, analysis, evaluation) need what a torchrun rank has: a process group
(1-rank gloo), megatron's parallel state at world size 1 and its model-parallel
RNG, and on a CPU-only machine the CPU runtime. :func:`single_rank_megatron` is
that, and leaves alone what a caller already set up (a test's rank pool, a
torchrun job).
"""

from __future__ import annotations

import contextlib
import socket

from ders_megatron.io.checkpoint import ensure_process_group
from ders_megatron.layers.runtime import enable_cpu_runtime


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def single_rank_megatron():
    """A 1-rank gloo group, the CPU runtime (a no-op with CUDA) and world-size-1
    megatron parallel state for the block; existing state is left alone."""
    from megatron.core import parallel_state

    enable_cpu_runtime()
    ensure_process_group()
    if parallel_state.model_parallel_is_initialized():
        yield
        return
    parallel_state.initialize_model_parallel()
    # Megatron's unfused attention forks the model-parallel RNG state even in eval mode
    # (transformer/dot_product_attention.py:217): a process of its own must add it.
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(1234)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
