"""What the DeRS pretraining entry point adds around ``megatron.training.pretrain``.

* :func:`patch_megatron_training`: fixes to megatron.training 0.19.2, each
  commented: two on any device (the wheel's dataset helpers, an atomic tracker
  file) and three for the CPU runtime (CUDA assert, GPU-arch query, RNG drawn by
  the JIT warm-up). The megatron-core patches live in :mod:`ders_megatron.layers.runtime`;
  these touch the training loop only.
* :func:`check_resume_checkpoint`: ``--load`` is checked before any work, so a
  checkpoint whose save was cut short is never taken as complete.
* :func:`forward_step`: the GPT forward step and loss (as Megatron-LM's
  ``pretrain_gpt.py``), with an optional full-precision loss log (:class:`LossLog`).
* Parameter census and training-state memory (:func:`parameter_census`,
  :func:`training_state_bytes`), paper-style accounting (:func:`accounting_lines`),
  and peak memory (:func:`peak_memory_line`).
"""

from __future__ import annotations

import functools
import json
import os
import resource
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ders_megatron.core.config import ders_config_from_args, shared_expert_of
from ders_megatron.io.atomic import atomic_text_file
from ders_megatron.io.checkpoint import TRACKER, CheckpointError, iteration_dir
from ders_megatron.layers.runtime import collective_device


# --------------------------------------------------------------------------- #
# megatron.training patches
# --------------------------------------------------------------------------- #
class _AtomicTrackerStorage:
    """``maybe_msc`` for ``training/checkpointing.py`` that writes the tracker atomically.

    ``iter_finalize_fn`` (``checkpointing.py:1011``) rewrites the tracker with
    ``open(path, 'w')``: a kill between the truncation and the write leaves an
    empty file, which ``read_metadata`` (``checkpointing.py:353-367``) answers
    with ``sys.exit()`` (status 0). Only local-file writes of the tracker change.
    """

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name == "open" and attr is open:
            return self._open
        return attr

    @staticmethod
    def _open(path, mode="r", *args, **kwargs):
        if mode == "w" and os.path.basename(str(path)) == TRACKER and not args and not kwargs:
            return atomic_text_file(path, fsync=True)
        return open(path, mode, *args, **kwargs)


def _skip_compile_helpers() -> None:
    """The wheel ships the compiled dataset helpers but not their Makefile.

    ``initialize.py:178`` runs ``compile_helpers()`` (``make -C .../datasets``),
    which fails without the Makefile and ``sys.exit(1)``s, on GPU as well.
    """
    from megatron.core.datasets import utils as dataset_utils

    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return  # a source checkout: let megatron build them
    dataset_utils.compile_helpers = lambda: None


def _no_device_arch() -> int:
    return 0


def _keep_cpu_rng(fn):
    """Run ``fn`` without moving the CPU generator.

    On CPU the runtime maps the CUDA generator to the CPU one, so the JIT warm-up's
    ``torch.rand(..., device="cuda")`` (``initialize.py:497-547``, shapes divided by
    TP under SP) would shift the CPU generator by a TP-dependent amount before
    ``--use-cpu-initialization`` draws the weights; on GPU it draws from CUDA.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)

    wrapper.keeps_cpu_rng = True
    return wrapper


def patch_megatron_training(cpu: bool) -> None:
    """Idempotent fixes to megatron.training 0.19.2, applied before ``validate_args``."""
    from megatron.training import arguments, checkpointing, training

    _skip_compile_helpers()
    if not isinstance(checkpointing.maybe_msc, _AtomicTrackerStorage):
        checkpointing.maybe_msc = _AtomicTrackerStorage(checkpointing.maybe_msc)
    if cpu and not isinstance(training.initialize_megatron, functools.partial):
        # pretrain() calls initialize_megatron() (training.py:1091), which asserts
        # torch.cuda.is_available() unless allow_no_cuda (initialize.py:66).
        training.initialize_megatron = functools.partial(
            training.initialize_megatron, allow_no_cuda=True
        )
    if cpu and not getattr(training.set_jit_fusion_options, "keeps_cpu_rng", False):
        training.set_jit_fusion_options = _keep_cpu_rng(training.set_jit_fusion_options)
    if cpu:
        # validate_args asks for the GPU architecture under TP/CP > 1
        # (arguments.py:1414) and, below Blackwell, wants CUDA_DEVICE_MAX_CONNECTIONS=1
        # (arguments.py:1437): CUDA streams that do not exist on CPU.
        arguments.get_device_arch_version = _no_device_arch
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


# --------------------------------------------------------------------------- #
# --load preflight
# --------------------------------------------------------------------------- #
class IncompleteCheckpointError(CheckpointError):
    """``--load`` names a checkpoint whose save did not finish."""


def checkpoint_is_complete(path: Path, use_dist_ckpt: bool) -> bool:
    """dist_checkpointing writes ``metadata.json`` last (``dist_checkpointing/
    serialization.py:447``); the legacy format has one file per model-parallel rank."""
    if use_dist_ckpt:
        return (path / "metadata.json").is_file()
    return any(path.glob("mp_rank_*/model_optim_rng.pt"))


def resume_iteration(load_dir, use_dist_ckpt: bool = True, ckpt_step: int | None = None):
    """The iteration ``--load load_dir`` resumes from (None: nothing to load).

    Raises :class:`IncompleteCheckpointError` for a tracker that is empty or
    garbled, or that points at a directory whose save did not finish.
    """
    found = checkpoint_to_resume(load_dir, use_dist_ckpt, ckpt_step)
    return None if found is None else found[0]


def checkpoint_to_resume(load_dir, use_dist_ckpt: bool = True, ckpt_step: int | None = None):
    """(iteration, directory) that ``--load load_dir`` reads, as megatron.training picks
    it (``checkpointing.py:1633-1700``: the tracker, or ``--ckpt-step``); None: nothing
    to load. Errors as :func:`resume_iteration`."""
    root = Path(load_dir)
    tracker = root / TRACKER
    if not tracker.is_file() and not ckpt_step:
        return None  # Megatron starts from scratch (checkpointing.py:1687)
    text = tracker.read_text().strip() if tracker.is_file() else ""
    if tracker.is_file() and text != "release" and not text.isdigit():
        # read_metadata would sys.exit() with status 0 (checkpointing.py:367), even with --ckpt-step
        raise IncompleteCheckpointError(
            f"{tracker} holds {text!r}, not an iteration: a save was cut short while writing it. "
            "Write the last complete iteration into it (see the iter_* directories)."
        )
    release = text == "release" and not ckpt_step
    iteration = ckpt_step if ckpt_step else (0 if release else int(text))
    path = iteration_dir(root, None if release else iteration)
    if not checkpoint_is_complete(path, use_dist_ckpt):
        raise IncompleteCheckpointError(
            f"--load {root}: {path.name} is incomplete (its save did not finish); point "
            f"{TRACKER} at an earlier complete iteration or remove {path.name}."
        )
    return iteration, path


def check_resume_checkpoint(args) -> int | None:
    """Check ``--load`` before any work; returns the iteration it will resume from."""
    if args.load is None or args.non_persistent_ckpt_type == "local":
        return None
    use_dist_ckpt = args.ckpt_format != "torch"
    return resume_iteration(args.load, use_dist_ckpt, getattr(args, "ckpt_step", None))


# --------------------------------------------------------------------------- #
# Forward step, loss, and the loss log
# --------------------------------------------------------------------------- #
@dataclass
class LossLog:
    """Per-microbatch LM loss sums, one JSON line each, appended to ``path``.

    Written by the ranks that hold a share of the global loss (last pipeline
    stage, tensor-parallel rank 0; all data/context-parallel ranks), so that
    :func:`read_loss_log` can rebuild Megatron's ``lm loss`` (sum over the
    global batch / tokens, ``training.py:2548``) at full precision.
    """

    path: str
    rank: int = 0
    _iteration: int = field(default=-1, repr=False)
    _microbatch: int = field(default=0, repr=False)

    def record(self, iteration: int, loss_sum: torch.Tensor, tokens: torch.Tensor) -> None:
        if iteration != self._iteration:
            self._iteration, self._microbatch = iteration, 0
        line = json.dumps(
            {"iteration": iteration, "rank": self.rank, "microbatch": self._microbatch,
             "sum": float(loss_sum), "tokens": int(tokens)}
        )
        self._microbatch += 1
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())  # one write: lines of ranks never interleave
        finally:
            os.close(fd)


def read_loss_log(path) -> dict[int, float]:
    """Iteration -> LM loss. A later record of the same (iteration, rank, microbatch),
    e.g. from a resumed run, replaces an earlier one."""
    records = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        records[(r["iteration"], r["rank"], r["microbatch"])] = (r["sum"], r["tokens"])
    totals: dict[int, list[float]] = {}
    for (iteration, _, _), (loss_sum, tokens) in records.items():
        acc = totals.setdefault(iteration, [0.0, 0])
        acc[0] += loss_sum
        acc[1] += tokens
    return {it: s / n for it, (s, n) in sorted(totals.items())}


SPIKY_LOSS_FACTOR = 10  # Megatron-LM pretrain_gpt.py: flag a loss > 10x the largest seen


def check_loss(loss: torch.Tensor, check_nan: bool, check_spiky: bool) -> None:
    """Megatron-LM's ``pretrain_gpt.py`` loss checks, through megatron-core's rerun state
    machine (``rerun_state_machine.py:464``; with reruns disabled, a rejected result raises):
    NaN and Inf in the local loss are fatal (``--check-for-nan-in-loss-and-grad``, on by
    default), a spike of 10x the largest loss seen is reported (``--check-for-spiky-loss``)."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    machine = get_rerun_state_machine()
    if check_nan:
        machine.validate_result(result=loss, rejection_func=torch.isnan, tolerance=0.0, fatal=True,
                                message="found NaN in local forward loss calculation")
        machine.validate_result(result=loss, rejection_func=torch.isinf, tolerance=0.0, fatal=True,
                                message="found Inf in local forward loss calculation")
    if check_spiky:
        machine.validate_result(
            result=loss, tolerance=0.0, fatal=False, message="Spiky loss",
            rejection_func=functools.partial(machine.is_unexpectedly_large, threshold=SPIKY_LOSS_FACTOR,
                                             context="loss"))


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor,
              loss_log: LossLog | None = None):
    """Summed masked token loss, token count, and the ``lm loss`` report (0.19.2 contract),
    with Megatron-LM's NaN/Inf and spiky-loss checks (:func:`check_loss`) in training."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    if output_tensor.requires_grad:  # training, not evaluation
        from megatron.training import get_args

        args = get_args()
        check_loss(loss, getattr(args, "check_for_nan_in_loss_and_grad", True),
                   getattr(args, "check_for_spiky_loss", False))
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    if loss_log is not None and output_tensor.requires_grad:  # training, not evaluation
        from megatron.core import parallel_state
        from megatron.training import get_args

        if parallel_state.get_tensor_model_parallel_rank() == 0:
            loss_log.record(get_args().curr_iteration + 1, loss, num_tokens)
    return loss, num_tokens, report


def forward_step(data_iterator, model, loss_log: LossLog | None = None):
    """Megatron-LM's GPT forward step: batch in, ``(output, loss_fn)`` out."""
    from megatron.core.utils import get_attr_wrapped_model

    from ders_megatron.training.data import get_batch

    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    batch = get_batch(data_iterator, vp_stage)
    output = model(
        batch["tokens"], batch["position_ids"], batch["attention_mask"],
        labels=batch["labels"], loss_mask=batch["loss_mask"],
    )
    return output, functools.partial(loss_func, batch["loss_mask"], loss_log=loss_log)


# --------------------------------------------------------------------------- #
# Parameter census, training-state memory, accounting
# --------------------------------------------------------------------------- #
CENSUS_KEYS = ("total", "trainable", "ders_base", "ders_deltas", "experts", "router",
               "shared_expert", "other")


def _category(name: str, param) -> str:
    if "deltas" in name:
        return "ders_deltas"
    if "router" in name:
        return "router"
    if "shared_expert" in name:
        return "shared_expert"
    if ".experts." in name:
        # DeRS's base is a dense (all-reduced) parameter; megatron's experts are not.
        return "ders_base" if getattr(param, "allreduce", True) else "experts"
    return "other"


def _replicas(param, sizes: dict[str, int]) -> int:
    """How many ranks hold this exact tensor (parallel.py's placement table)."""
    expert = not getattr(param, "allreduce", True)
    tp_sharded = getattr(param, "tensor_model_parallel", False)
    if expert:
        return sizes["expt_dp"] * (1 if tp_sharded else sizes["expt_tp"])
    return sizes["dp_cp"] * (1 if tp_sharded else sizes["tp"])


def parameter_census(chunks, pg_collection=None) -> dict[str, int]:
    """Parameters of the whole model (every rank's shard counted once), by category.

    Collective over the world when torch.distributed is initialized.
    """
    import torch.distributed as dist

    sizes = {"dp_cp": 1, "tp": 1, "expt_dp": 1, "expt_tp": 1}
    if pg_collection is not None:
        sizes = {k: getattr(pg_collection, k).size() for k in sizes}
    reduce = dist.is_available() and dist.is_initialized()
    # Built where the all-reduce can take it: a CPU tensor fails under NCCL (every GPU launch did).
    local = torch.zeros(len(CENSUS_KEYS), dtype=torch.float64, device=collective_device() if reduce else "cpu")
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if getattr(param, "shared", False):  # tied embedding's copy on the last stage
                continue
            share = param.numel() / _replicas(param, sizes)
            local[CENSUS_KEYS.index(_category(name, param))] += share
            local[0] += share
            if param.requires_grad:
                local[1] += share
    if reduce:
        dist.all_reduce(local)
    return {k: int(round(v)) for k, v in zip(CENSUS_KEYS, local.tolist())}


def bytes_per_param(args) -> tuple[int, int]:
    """(trainable, frozen) bytes per parameter: weights, fp32 main grads, fp32 main
    weights under bf16/fp16, and Adam's two fp32 moments (SGD: one)."""
    low_precision = args.bf16 or args.fp16
    weight = 2 if low_precision else 4
    optimizer_state = 8 if args.optimizer == "adam" else 4
    trainable = weight + 4 + (4 if low_precision else 0) + optimizer_state
    return trainable, weight


def training_state_bytes(census: dict[str, int], args) -> int:
    """Parameter + gradient + optimizer bytes of the whole model (all ranks together)."""
    trainable, frozen = bytes_per_param(args)
    return census["trainable"] * trainable + (census["total"] - census["trainable"]) * frozen


def accounting_shape(args):
    """ders_megatron.core.accounting's MoEShape for these flags (None without MoE)."""
    from ders_megatron.core.accounting import MoEShape

    if not args.num_experts:
        return None
    shared = shared_expert_of(args)
    ffn = args.moe_ffn_hidden_size or args.ffn_hidden_size
    return MoEShape(
        hidden_size=args.hidden_size, ffn_hidden_size=ffn, moe_ffn_hidden_size=ffn,
        num_layers=args.num_layers, num_experts=args.num_experts,
        moe_layer_freq=args.moe_layer_freq, topk=args.moe_router_topk, gated=args.swiglu,
        bias=args.add_bias_linear, shared_expert=shared, router_bias=args.add_bias_linear,
    )


def accounting_delta(args):
    from ders_megatron.core.accounting import DeltaSpec

    ders = ders_config_from_args(args)
    if ders is None:
        return DeltaSpec(kind="vanilla")
    if ders.kind == "lowrank":
        return DeltaSpec(kind="lowrank", rank=ders.delta.rank)
    if ders.kind == "sparse":
        return DeltaSpec(kind="sparse", drop_rate=ders.delta.drop_rate)
    return DeltaSpec(kind=ders.kind)  # codec: ValueError, "accounting: n/a" in the report


def accounting_lines(census: dict[str, int], args) -> list[str]:
    """The start-of-run report: real counts, and dense / vanilla / DeRS per the paper."""
    from ders_megatron.core.accounting import DeltaSpec, added_parameters

    mib = 1 << 20
    lines = [
        "parameters (whole model): total {total:,} | trainable {trainable:,} | DeRS base "
        "{ders_base:,} | DeRS deltas {ders_deltas:,} | megatron experts {experts:,} | router "
        "{router:,} | shared expert {shared_expert:,} | other {other:,}".format(**census)
    ]
    own_bytes = training_state_bytes(census, args)
    shape = accounting_shape(args)
    if shape is None:
        lines.append(f"params+grads+optimizer state: {own_bytes / mib:.1f} MiB (dense model)")
        return lines
    try:
        this = added_parameters(shape, accounting_delta(args), dtype_bytes=4)
        vanilla = added_parameters(shape, DeltaSpec(kind="vanilla"), dtype_bytes=4)
    except ValueError as err:  # shapes the paper's accounting does not cover
        lines.append(f"accounting: n/a ({err})")
        return lines
    dense = census["total"] - this.added_params
    vanilla_total = dense + vanilla.added_params
    trainable_b, _ = bytes_per_param(args)
    lines += [
        f"accounting ({this.label}): dense model {dense:,} | vanilla upcycling adds "
        f"{vanilla.added_params:,} (total {vanilla_total:,}) | this model adds "
        f"{this.added_params:,} (total {census['total']:,}, "
        f"{100 * this.added_params / max(dense, 1):.2f}% over dense)",
        f"params+grads+optimizer state: this model {own_bytes / mib:.1f} MiB | dense "
        f"{dense * trainable_b / mib:.1f} MiB | vanilla upcycling "
        f"{vanilla_total * trainable_b / mib:.1f} MiB",
    ]
    return lines


# --------------------------------------------------------------------------- #
# Peak memory
# --------------------------------------------------------------------------- #
def peak_memory_line() -> str:
    """This process's peak memory: CUDA max allocated on GPU, max RSS on CPU."""
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / (1 << 20)
        return f"peak GPU memory allocated: {peak:.1f} MiB"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"peak CPU memory (max RSS): {rss_kib / 1024:.1f} MiB"
