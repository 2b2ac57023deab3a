"""Explicit CPU runtime mode for megatron-core 0.19.2.

megatron-core assumes CUDA in a handful of places (hard-coded ``device="cuda"``,
``torch.cuda.current_device()``, streams and events, the CUDA RNG tracker, a
``Tensor.type()`` assertion in the optimizer). :func:`enable_cpu_runtime`
redirects exactly those call sites to the CPU so that the *real* megatron-core
model, router, token dispatchers, DDP, optimizer, schedules and
dist_checkpointing run on a CPU-only machine with the gloo backend.

It is opt-in (``--cpu`` in our scripts, automatic in the tests), idempotent, and
a no-op when CUDA is present unless forced: the single-process tools
(``io/session.py``) force it, so their models, batches and everything megatron
puts on ``torch.cuda.current_device()`` (RoPE's ``inv_freq``,
``models/common/embeddings/rotary_pos_embedding.py:160-162``) stay on the CPU
together on a CUDA machine too. Every patch names the megatron-core 0.19.2 file
and line it covers (paths relative to ``megatron/core/``). Not covered: the
``flex`` dispatcher (DeepEP/HybridEP), Transformer Engine, fused CUDA kernels,
CUDA graphs, and optimizer-state checkpoints on the torch-Adam fallback (see
README "CPU mode").
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_CUDA_PRESENT: bool | None = None  # torch.cuda.is_available() before a forced runtime patched it

CPU_MODE_HINT = (
    "CUDA is not available on this machine. megatron-core needs CUDA unless the "
    "ders-megatron CPU runtime is on: pass --cpu to our scripts, or call "
    "ders_megatron.layers.runtime.enable_cpu_runtime() before building models."
)


class CpuRuntimeError(RuntimeError):
    """Raised when megatron-core would need CUDA and the CPU runtime is off."""


def cpu_runtime_enabled() -> bool:
    return _ENABLED


def require_device_runtime() -> None:
    """Fail early, with the fix, when neither CUDA nor the CPU runtime is there."""
    if not torch.cuda.is_available() and not _ENABLED:
        raise CpuRuntimeError(CPU_MODE_HINT)


def select_runtime(cpu: bool) -> torch.device:
    """What every entry point calls with its ``--cpu`` flag.

    ``cpu=True`` switches the CPU runtime on (a no-op with CUDA present); without
    it, a CPU-only machine stops here with the fix instead of failing deep
    inside megatron-core.
    """
    if cpu:
        enable_cpu_runtime()
    return default_device()


def default_device() -> torch.device:
    """The device models and batches live on: CUDA when present, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    require_device_runtime()
    return torch.device("cpu")


def distributed_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def collective_device(group=None) -> torch.device:
    """Where a tensor handed to a collective on ``group`` must live: NCCL reduces CUDA
    tensors only (a CPU tensor raises), gloo CPU ones."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------- #
# 1. device="cuda" and .cuda()/.pin_memory()/.to("cuda") become CPU.
# --------------------------------------------------------------------------- #
def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is what torch.cuda.current_device() returns on a GPU machine.
    return isinstance(device, int) and not isinstance(device, bool)


_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU for every torch call made under it.

    Covers: ``transformer/utils.py:39,44`` (causal masks on ``device="cuda"``),
    ``pipeline_parallel/schedules.py`` and ``optimizer/clip_grads.py``
    (``.cuda()``, ``device=torch.cuda.current_device()``),
    ``transformer/moe/token_dispatcher.py:428`` (``torch.device("cuda")``
    permute indices), and ``Tensor.type()`` asserted to be a CUDA type in
    ``optimizer/clip_grads.py:174``, ``optimizer/distrib_optimizer.py:401,466``
    and ``optimizer/optimizer.py:1009,1028``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            tensor = args[0]
            return _CUDA_TYPE_NAMES.get(tensor.dtype, func(*args))
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def _ensure_mode():
    """Enter the CUDA-to-CPU mode if the current mode stack is empty."""
    if torch._C._len_torch_function_stack() == 0:
        with _CudaToCpuMode():
            yield
    else:
        yield


def _patch_custom_function_backward() -> None:
    """torch runs custom autograd.Function backwards with an empty mode stack.

    Without this, e.g. the backward of ``_AllToAll``
    (``tensor_parallel/mappings.py:474``) allocates on ``device="cuda"``.
    """
    original_apply = torch.autograd.function.BackwardCFunction.apply

    @functools.wraps(original_apply)
    def apply_under_cpu_mode(self, *args):
        with _ensure_mode():
            return original_apply(self, *args)

    torch.autograd.function.BackwardCFunction.apply = apply_under_cpu_mode


# --------------------------------------------------------------------------- #
# 2. torch.cuda.* entry points megatron-core calls unconditionally.
# --------------------------------------------------------------------------- #
class _NullStream:
    """Stands in for torch.cuda.Stream / Event: every op is synchronous on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _current_device():
    return _CPU


def _current_stream(*args, **kwargs):
    return _NullStream()


def _stream_context(stream=None):
    return contextlib.nullcontext()


def _synchronize(*args, **kwargs):
    return None


def _get_rng_state(device="cuda"):
    return torch.get_rng_state()


def _set_rng_state(new_state, device="cuda"):
    torch.set_rng_state(new_state)


def _manual_seed(seed):
    torch.manual_seed(seed)


def _device_count():
    return 1


def _set_device(device):
    return None


def _cuda_unavailable():
    return False


def _memory_zero(*args, **kwargs):
    return 0


def _patch_torch_cuda() -> None:
    """Each torch.cuda name gets its own function object.

    Binding one object to two names makes dynamo fail with "Duplicate torch
    object" (seen on this stack), hence the separate small functions.
    """
    cuda = torch.cuda
    # mappings, layers, models/gpt/gpt_model.py:452, transformer/moe/router.py:98-247,
    # pipeline_parallel/p2p_communication.py: device=torch.cuda.current_device()
    cuda.current_device = _current_device
    # transformer/moe/token_dispatcher.py:469, transformer/moe/shared_experts.py:192,
    # transformer/moe/moe_layer.py:434: streams and events
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.current_stream = _current_stream
    cuda.stream = _stream_context
    # pipeline_parallel/p2p_communication.py: synchronize after batched send/recv
    cuda.synchronize = _synchronize
    # tensor_parallel/random.py:446 model_parallel_cuda_manual_seed and the RNG tracker
    cuda.get_rng_state = _get_rng_state
    cuda.set_rng_state = _set_rng_state
    cuda.manual_seed = _manual_seed
    # training/initialize.py:358,447 skip model-parallel init when device_count() == 0
    cuda.device_count = _device_count
    # ...but with PYTORCH_NVML_BASED_CUDA_CHECK=1 (accelerate sets it in os.environ on import,
    # and spawned ranks inherit it) torch.cuda.is_available() answers device_count() > 0
    # (torch/cuda/__init__.py:219-223), which the line above makes True on a machine without
    # CUDA: ranks then pick nccl (distributed_backend) and fail. The runtime is on where CUDA
    # is absent or where a tool forced the CPU, so the answer is False (cuda_present() keeps
    # the machine's own answer).
    cuda.is_available = _cuda_unavailable
    # training/initialize.py:282 selects the local device once device_count() > 0
    cuda.set_device = _set_device
    # memory reports in training/utils.py and our own logs
    cuda.memory_allocated = _memory_zero
    cuda.max_memory_allocated = _memory_zero
    cuda.memory_reserved = _memory_zero
    cuda.max_memory_reserved = _memory_zero
    cuda.reset_peak_memory_stats = _synchronize
    cuda.empty_cache = _synchronize


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _get_cpu_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # tensor_parallel/random.py:135 queues the CUDA generator update with
    # torch.cuda._lazy_call: on CPU the queue grows forever and fork() does nothing.
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state
    # tensor_parallel/random.py:104 reads torch.cuda.random.get_rng_state directly.
    mcore_random._get_cuda_rng_state = _get_cpu_rng_state

    # transformer/moe/moe_utils.py:1184 turns the all-to-all split sizes into
    # numpy only for CUDA tensors; gloo's all_to_all_single needs lists.
    original_move = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(original_move)
    def move_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = move_to_cpu
    if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
        token_dispatcher.maybe_move_tensor_to_cpu = move_to_cpu


def cuda_present() -> bool:
    """Whether this machine has CUDA, even after a forced CPU runtime answers ``False`` for
    ``torch.cuda.is_available()`` (what a launcher asks before starting a GPU job)."""
    return torch.cuda.is_available() if _CUDA_PRESENT is None else _CUDA_PRESENT


def enable_cpu_runtime(force: bool = False) -> bool:
    """Switch megatron-core to the CPU. Returns True if the CPU runtime is active.

    A no-op (returning False) when CUDA is available, unless ``force``: then this
    process computes on the CPU although CUDA is there (and ``torch.cuda`` answers as
    on a CPU-only machine; :func:`cuda_present` still tells the truth). Also disables
    dynamo: megatron's jit fuser is ``torch.compile`` and one router took 16 s to
    compile on this CPU.
    """
    global _ENABLED, _CUDA_PRESENT
    if _ENABLED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    _CUDA_PRESENT = torch.cuda.is_available()
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from torch import _dynamo

    _dynamo.config.disable = True
    _patch_torch_cuda()
    _patch_custom_function_backward()
    _patch_megatron()
    # Kept for the whole process: entered and never exited on purpose.
    _CudaToCpuMode().__enter__()
    _ENABLED = True
    return True
