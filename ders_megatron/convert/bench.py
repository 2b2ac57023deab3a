"""MoE layer benchmark: dense MLP vs megatron-core MoE vs DeRS drop-in vs DeRS fused.

Every variant runs on the same input tokens, with the same upstream gradient and
(for the MoE variants) the same router weights, so each token goes to the same
experts in every MoE variant. Variants are timed round-robin (one
forward+backward of each in turn, repeated), so a machine that slows down
mid-run slows every variant alike; the figure kept is the median.

Measured per variant:

* ``ms``: forward + backward wall time of the layer (``torch.cuda.synchronize``
  around it on GPU), median over ``repeats`` after ``warmup`` rounds; also the
  minimum (``min ms``), the steadier figure when other processes share the CPU
  (interference only ever adds time);
* ``peak MiB``: peak bytes of live tensors during one forward + backward above
  what was live before it (parameters and inputs excluded, parameter gradients
  included). GPU: ``torch.cuda.max_memory_allocated``. CPU: a
  ``TorchDispatchMode`` that follows every tensor storage created by an aten
  op until it is freed (:class:`LiveTensorBytes`); it sees what torch
  allocates, not the allocator's caching or fragmentation;
* ``params``: parameters of the module (router included; the sparse kind's
  position seed is a buffer, not a parameter).

Each figure is also given as a ratio to the dense MLP the MoE was upcycled from.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
import weakref
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ders_megatron.core.config import DEFAULTS, DeRSConfig, delta_config
from ders_megatron.core.config import IMPLS as CONFIG_IMPLS

BASELINES = ("dense", "sequential", "grouped")
IMPLS = CONFIG_IMPLS
# Opt-in: the drop-in layer on DeRSExperts.forward_unfused (per-expert delta
# temporaries), the path low-rank SwiGLU experts took before they ran the kernel.
UNFUSED = ("dropin-unfused",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class BenchShape:
    """One MoE layer: ``tokens`` per rank (sequence length, batch 1), SwiGLU experts."""

    hidden: int = 1024
    ffn: int = 4096
    tokens: int = 2048
    experts: int = 8
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")


@dataclass(frozen=True, kw_only=True)
class Variant:
    """``kind``: dense | sequential | grouped | dropin | fused; ``delta``: lowrank/sparse for DeRS."""

    kind: str
    delta: str | None = None
    rank: int | None = None
    drop_rate: float | None = None

    @property
    def label(self) -> str:
        if self.kind == "dense":
            return "dense MLP"
        if self.kind == "sequential":
            return "MoE SequentialMLP"
        if self.kind == "grouped":
            return "MoE GroupedMLP (TE)"
        detail = f"r={self.rank}" if self.delta == "lowrank" else f"p={self.drop_rate}"
        return f"DeRS {self.kind} {self.delta} {detail}"

    def ders_config(self, kernel_tile: int | None = None) -> DeRSConfig:
        delta = delta_config(self.delta, rank=self.rank or DEFAULTS["rank"],
                             drop_rate=self.drop_rate or DEFAULTS["drop_rate"])
        return DeRSConfig(delta=delta, impl="fused" if self.kind == "fused" else "dropin", kernel_tile=kernel_tile)


def variants(
    baselines=BASELINES, impls=IMPLS, ranks=(1, 4, 16), drop_rates=(0.9, 0.99, 0.9999)
) -> list[Variant]:
    """Baselines first (dense first: every ratio is taken against it), then DeRS side by side."""
    out = [Variant(kind=b) for b in ("dense", *baselines) if b in BASELINES]
    out = list(dict.fromkeys(out))
    for rank in ranks:
        out += [Variant(kind=impl, delta="lowrank", rank=rank) for impl in impls]
    for rate in drop_rates:
        out += [Variant(kind=impl, delta="sparse", drop_rate=rate) for impl in impls if impl in IMPLS]
    return out


@dataclass
class Result:
    label: str
    topk: int
    ms: float | None
    peak_mib: float | None
    params: int | None
    ms_min: float | None = None
    ms_all: list[float] = field(default_factory=list)
    note: str = ""
    ratios: dict = field(default_factory=dict)
    dtype: str = "float32"


# --------------------------------------------------------------------------- #
# Process group, config, modules.
# --------------------------------------------------------------------------- #
@contextlib.contextmanager
def bench_process_group(tp: int = 1):
    """megatron parallel state on the torchrun group, or on a 1-rank gloo group of our own."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from ders_megatron.layers.runtime import distributed_backend, enable_cpu_runtime
    from ders_megatron.io.session import free_port

    enable_cpu_runtime()  # no-op with CUDA
    own = not dist.is_initialized()
    if own:
        if "RANK" not in os.environ:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
        dist.init_process_group(backend=distributed_backend())
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(1234)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if own:
            dist.destroy_process_group()


def layer_config(shape: BenchShape, topk: int, grouped: bool = False):
    """One SwiGLU MoE layer's TransformerConfig (megatron defaults where not set)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = parallel_state.get_tensor_model_parallel_world_size()
    return TransformerConfig(
        num_layers=1,
        hidden_size=shape.hidden,
        ffn_hidden_size=shape.ffn,
        moe_ffn_hidden_size=shape.ffn,
        num_attention_heads=8,
        num_moe_experts=shape.experts,
        moe_router_topk=topk,
        moe_router_pre_softmax=topk == 1,  # megatron refuses top-1 without it (transformer_config.py:2336)
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2,
        moe_grouped_gemm=grouped,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        hidden_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=DTYPES[shape.dtype],
        bf16=shape.dtype == "bfloat16",
        tensor_model_parallel_size=tp,
        sequence_parallel=tp > 1,
    )


def build_module(variant: Variant, shape: BenchShape, topk: int, token_tile: int | None = None):
    """The layer for one variant, on the default device; None if it cannot run here."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from ders_megatron.layers.specs import ders_moe_spec, vanilla_moe_spec

    config = layer_config(shape, topk, grouped=variant.kind == "grouped")
    if variant.kind == "dense":
        submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        return MLP(config, submodules, tp_group=get_default_pg_collection().tp)
    if variant.kind == "sequential":
        module = vanilla_moe_spec(use_te=False)(config=config)
    elif variant.kind == "grouped":
        if grouped_unavailable_reason():
            return None
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
        from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend

        module = get_moe_module_spec_for_backend(TESpecProvider(), shape.experts, moe_grouped_gemm=True)(config=config)
    else:
        module = ders_moe_spec(variant.ders_config(kernel_tile=token_tile))(config=config)
        if variant.kind == "dropin-unfused":  # the reference path, measured as the layer's forward
            module.experts.forward = module.experts.forward_unfused
    module.set_layer_number(1)
    return module


def grouped_unavailable_reason() -> str:
    """Why megatron's grouped-GEMM experts cannot run here ('' when they can)."""
    from megatron.core.extensions.transformer_engine import HAVE_TE

    if not torch.cuda.is_available():
        return "not run: TEGroupedMLP (megatron-core 0.19.2's grouped-GEMM experts) needs CUDA + Transformer Engine"
    if not HAVE_TE:
        return "not run: Transformer Engine is not installed"
    return ""


@torch.no_grad()
def prepare(module, router_state: dict | None, seed: int = 0) -> None:
    """Same router everywhere; small random deltas (LoRA B starts at zero)."""
    if router_state is not None and hasattr(module, "router"):
        module.router.load_state_dict(router_state)
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if ".deltas." in f".{name}":
            param.copy_((torch.randn(param.shape, generator=gen) * 0.01).to(param.dtype))


# --------------------------------------------------------------------------- #
# Measurement.
# --------------------------------------------------------------------------- #
def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fwd_bwd(module, x, grad) -> None:
    """One forward + backward; parameter gradients are freed first (set_to_none)."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(grad)


def time_round_robin(modules: dict, x, grad, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per forward+backward of each module, interleaved across modules."""
    times = {label: [] for label in modules}
    for step in range(warmup + repeats):
        for label, module in modules.items():
            _sync()
            start = time.perf_counter()
            fwd_bwd(module, x, grad)
            _sync()
            if step >= warmup:
                times[label].append(time.perf_counter() - start)
    return times


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created under this mode and still alive (CPU)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            # Sparse (CSR) tensors have no storage of their own: their parts are tracked as created.
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta and tensor.layout == torch.strided:
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._sizes:
            return
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


def peak_bytes(module, x, grad) -> int:
    """Peak extra bytes of one forward+backward (see module docstring for the method)."""
    if torch.cuda.is_available():
        _sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fwd_bwd(module, x, grad)
        _sync()
        return torch.cuda.max_memory_allocated() - before
    module.zero_grad(set_to_none=True)
    x.grad = None
    tracker = LiveTensorBytes()
    with tracker:
        fwd_bwd(module, x, grad)
    return tracker.peak


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- #
# The run.
# --------------------------------------------------------------------------- #
def run_topk(shape, topk, variant_list, warmup, repeats, memory=True, token_tile=None, log=print) -> list[Result]:
    """Build every variant for one top-k, time them round-robin, then measure memory."""
    from ders_megatron.layers.runtime import default_device

    device = default_device()
    dtype = DTYPES[shape.dtype]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape.tokens, 1, shape.hidden, generator=gen).to(device, dtype).requires_grad_(True)
    grad = torch.randn(shape.tokens, 1, shape.hidden, generator=gen).to(device, dtype)
    modules, results, router_state = {}, {}, None
    for variant in variant_list:
        module = build_module(variant, shape, topk, token_tile)
        if module is None:
            results[variant.label] = Result(variant.label, topk, None, None, None, note=grouped_unavailable_reason(),
                                            dtype=shape.dtype)
            continue
        module = module.to(device)
        if router_state is None and hasattr(module, "router"):
            router_state = {k: v.clone() for k, v in module.router.state_dict().items()}
        prepare(module, router_state)
        modules[variant.label] = module
        results[variant.label] = Result(variant.label, topk, None, None, count_params(module), dtype=shape.dtype)
    log(f"top-{topk}: timing {len(modules)} variants, {warmup} warm-up + {repeats} rounds")
    for label, seconds in time_round_robin(modules, x, grad, warmup, repeats).items():
        results[label].ms = 1e3 * statistics.median(seconds)
        results[label].ms_min = 1e3 * min(seconds)
        results[label].ms_all = [round(1e3 * s, 2) for s in seconds]
    if memory:
        for label, module in modules.items():
            results[label].peak_mib = peak_bytes(module, x, grad) / 2**20
    _add_ratios(list(results.values()))
    return list(results.values())


def _add_ratios(results: list[Result]) -> None:
    dense = next(r for r in results if r.label == "dense MLP")
    for r in results:
        for name in ("ms", "ms_min", "peak_mib", "params"):
            mine, ref = getattr(r, name), getattr(dense, name)
            r.ratios[name] = mine / ref if mine is not None and ref else None
    seq = next((r for r in results if r.label == "MoE SequentialMLP"), None)
    if seq is not None and seq.ms:
        for r in results:
            r.ratios["ms_vs_sequential"] = r.ms / seq.ms if r.ms is not None else None
            r.ratios["ms_min_vs_sequential"] = r.ms_min / seq.ms_min if r.ms_min is not None else None


# --------------------------------------------------------------------------- #
# Kernel-only: the sparse products against the dense products they replace.
# --------------------------------------------------------------------------- #
def kernel_microbench(shape: BenchShape, topk: int, drop_rates, repeats: int = 7, log=print) -> list[dict]:
    """Median ms of each product of one expert's delta on its ``tokens·topk/experts`` rows,
    in both forms the sparse SwiGLU kernel runs (:mod:`ders_megatron.layers.sparse_compute`:
    CSR with its transposes, and the gather form), against the dense GEMMs of the same
    matrix: forward ``x Δᵀ`` vs ``x Wᵀ``; backward ``dy Δ`` plus the values' gradient at
    the kept positions vs ``dy W`` plus ``dyᵀ x``. ``picked`` is the form the kernel takes.
    """
    from ders_megatron.core.deltas import sample_unique
    from ders_megatron.core.sparse_product import build_sparse_index, sparse_dtype
    from ders_megatron.layers.sparse_compute import CSRProduct, GatherProduct, gather_form_applies

    rows = max(1, shape.tokens * topk // shape.experts)
    dtype = DTYPES[shape.dtype]
    cd = sparse_dtype(dtype)
    gen = torch.Generator().manual_seed(0)
    out = []
    for matrix, (O, I) in (("fc1", (shape.ffn, shape.hidden)), ("fc2", (shape.hidden, shape.ffn))):
        x = torch.randn(rows, I, generator=gen).to(dtype)
        dy = torch.randn(rows, O, generator=gen).to(dtype)
        w = torch.randn(O, I, generator=gen).to(dtype)
        dense = {"forward": lambda: x @ w.t(), "backward": lambda: (dy @ w, dy.t() @ x)}
        dense_ms = {name: _median_ms(fn, repeats) for name, fn in dense.items()}
        for rate in drop_rates:
            kept = max(1, round((1 - rate) * O * I))
            index = build_sparse_index(sample_unique(O * I, kept, 0), O, I, (0, O), (0, I))
            vals = torch.randn(kept, generator=gen)
            forms = {"CSR": CSRProduct(index, vals, cd)}
            if dtype == cd:  # the gather form runs in the model's dtype only
                forms["gather"] = GatherProduct(index, vals)
            for name in ("forward", "backward"):
                timed = {}
                for form, product in forms.items():
                    acc = product.new_grad()
                    fn = ((lambda p=product: p.add_forward(None, x)) if name == "forward"
                          else (lambda p=product, acc=acc: p.add_backward(None, dy, x, acc)))
                    timed[form] = _median_ms(fn, repeats)
                row = dict(matrix=f"{matrix} [{O}, {I}]", drop_rate=rate, kept=kept, rows=rows, product=name,
                           sparse_ms=timed["CSR"], gather_ms=timed.get("gather"), dense_ms=dense_ms[name],
                           picked="gather" if dtype == cd and gather_form_applies(index) else "CSR")
                row["sparse_vs_dense"] = row["sparse_ms"] / row["dense_ms"]
                out.append(row)
                log(format_kernel_row(row))
    return out


def _median_ms(fn, repeats: int) -> float:
    fn()
    seconds = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        seconds.append(time.perf_counter() - start)
    return 1e3 * statistics.median(seconds)


KERNEL_HEAD = ("| matrix | p | kept | rows | product | CSR ms | dense ms | CSR × dense | gather ms | kernel takes |\n"
               "|---|---|---|---|---|---|---|---|---|---|")


def format_kernel_row(row: dict) -> str:
    return (f"| {row['matrix']} | {row['drop_rate']} | {row['kept']:,d} | {row['rows']} | {row['product']} | "
            f"{row['sparse_ms']:.2f} | {row['dense_ms']:.2f} | {row['sparse_vs_dense']:.3f} | "
            f"{_fmt(row['gather_ms'], '.2f')} | {row['picked']} |")


def machine_description() -> str:
    import platform

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def memory_method() -> str:
    if torch.cuda.is_available():
        return "peak memory: torch.cuda.max_memory_allocated above the bytes allocated before the step"
    return ("peak memory: live tensor storages under a TorchDispatchMode (ders_megatron.convert.bench."
            "LiveTensorBytes), above what was live before the step; parameter grads included")


def results_payload(shape, results: list[Result], command: str = "") -> dict:
    """``shape`` of the first dtype; each result names its own ``dtype``."""
    return {
        "shape": asdict(shape),
        "dtypes": list(dict.fromkeys(r.dtype for r in results)),
        "machine": machine_description(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "memory_method": memory_method(),
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "results": [asdict(r) for r in results],
    }


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def format_table(results: list[Result]) -> str:
    """A markdown table: absolute figures and ratios to the dense MLP (and to SequentialMLP).

    Time ratios are given for the median and, after a slash, for the minimum.
    """
    head = ("| top-k | dtype | variant | fwd+bwd ms (median / min) | × dense | × SequentialMLP "
            "| peak MiB | × dense | params | × dense |")
    lines = [head, "|" + "---|" * 10]
    for r in results:
        if r.ms is None and r.note:
            lines.append(f"| {r.topk} | {r.dtype} | {r.label} | {r.note} | | | | | | |")
            continue
        q = r.ratios
        lines.append(
            f"| {r.topk} | {r.dtype} | {r.label} | {_fmt(r.ms, '.1f')} / {_fmt(r.ms_min, '.1f')} | "
            f"{_fmt(q.get('ms'), '.3f')} / {_fmt(q.get('ms_min'), '.3f')} | "
            f"{_fmt(q.get('ms_vs_sequential'), '.3f')} / {_fmt(q.get('ms_min_vs_sequential'), '.3f')} | "
            f"{_fmt(r.peak_mib, '.1f')} | {_fmt(q.get('peak_mib'), '.2f')} | "
            f"{_fmt(r.params, ',d')} | {_fmt(q.get('params'), '.4f')} |"
        )
    return "\n".join(lines)
