"""One single-process megatron-core session, for the tools and benchmarks.

Tools that build or read a model in one process (upcycling, compression,
conversion, analysis, evaluation) need what a torchrun rank has: a process group
(1-rank gloo), megatron's parallel state at world size 1 and its model-parallel
RNG, and the CPU runtime. :func:`single_rank_megatron` is that, and leaves alone
what a caller already set up (a test's rank pool, a torchrun job).

The tools compute on the CPU, on a CUDA machine too: they build their models on
the CPU (``use_cpu_initialization``), and megatron on its CUDA path would move
pieces to the GPU under them (RoPE's ``inv_freq`` on the first forward,
``models/common/embeddings/rotary_pos_embedding.py:160-162``; causal masks,
router statistics on ``torch.cuda.current_device()``): a process the session
starts forces the CPU runtime, so model, batches and megatron's own tensors
share one device.
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
    """A 1-rank gloo group, the CPU runtime (forced when this call starts the process's
    group: the tool's own process) and world-size-1 megatron parallel state for the
    block; existing state is left alone."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    enable_cpu_runtime(force=not dist.is_initialized())
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
