"""Upcycle a dense megatron-core checkpoint into a (DeRS) MoE checkpoint.

Two paths, one set of rules (:func:`source_of`):

* **Offline** (:func:`upcycle_checkpoint`, ``tools/upcycle.py``): dense torch_dist
  checkpoint in, MoE release checkpoint out, streamed parameter by parameter
  (:mod:`ders_megatron.io.streaming`). The output is what
  ``megatron.training``'s ``--load`` reads: ``release/`` + tracker, common state
  ``{"args", "checkpoint_version": 3.0, "iteration": 0, ...}``, the MoE and
  DeRS settings in ``args`` under the training flags' dest names.
* **In memory** (:func:`ders_megatron.io.upcycle_state.upcycle_state_into_model`,
  training's ``--moe-ders-upcycle-from``): fills a freshly built DeRS or
  megatron-experts GPT model at any TP/EP/PP layout straight from the dense
  checkpoint; each rank reads only its own shards.

What each MoE tensor starts as:

==============================  =============================================
routed experts (vanilla)         full copies of the dense FFN (``SequentialMLP``
                                 keys ``mlp.experts.experts.linear_fc*``)
DeRS base ``mlp.experts.linear*`` the dense FFN; deltas as the DeRS layer
                                 initialises them (zero B / values / Δ, seeded A)
DeRS own biases                  ``mlp.experts.biases.fc1/fc2`` [E, out]: the dense
                                 bias in every expert's row (``--add-bias-linear``)
router                           N(0, std²), seeded by (seed, layer)
shared expert (``full``)         a copy of the dense FFN (megatron's keys)
shared expert (``ders``)         the routed base plus its own zero delta
shared-expert gate               zero, i.e. sigmoid(0) = 1/2
==============================  =============================================

Step-0 equivalence. With top-k probabilities renormalised to sum to 1
(megatron's default, softmax after top-k: ``moe_router_pre_softmax=False``;
sigmoid scores are renormalised too for k > 1) every token's MoE output is
Σ_k p_k FFN(x) = FFN(x): the upcycled model computes the dense model's logits.
With ``--no-renormalize-topk`` (pre-softmax) the top-k probabilities sum to
less than 1 and the MoE output is scaled down per token: not equivalent.
A shared expert adds a second FFN(x); ``shared_expert_init="split"`` scales
the fc2 of routed and shared experts by 1/(1+g) (g = 1, or 1/2 with the
zero-initialised sigmoid gate) so the sum is FFN(x) again; ``"copy"`` keeps full
copies (output (1+g)·FFN(x) at step 0).

Parallel layout: torch_dist checkpoints are layout-free (keys carry global
shapes), so the output loads at any TP/EP/PP. ``target_tp``/``target_ep``/
``target_etp`` are only checked for divisibility so a bad plan fails here.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ders_megatron.core.config import (
    DEFAULTS,
    DELTA_KINDS,
    IMPLS,
    DeRSArgumentError,
    check_expert_tp,
    check_shared_expert,
    delta_config,
    delta_matrices,
    ders_config_from_args,
    set_ders_args,
)
from ders_megatron.core.deltas import build_deltas
from ders_megatron.io.checkpoint import atomic_output_dir
from ders_megatron.io.upcycle_state import (
    SHARED_INITS,
    DenseSource,
    UpcycleError,
    key_suffix,
    read_dense_args,
    router_weight,
    shared_fc2_scale,
    source_of,
)

KINDS = ("vanilla", *DELTA_KINDS)  # what upcycling can start (codec: tools/compress.py)


# --------------------------------------------------------------------------- #
# Settings
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, kw_only=True)
class UpcycleConfig:
    """What ``tools/upcycle.py`` asks for (flag names in the error messages)."""

    kind: str = DEFAULTS["kind"]  # --moe-ders: vanilla (N full copies) | lowrank | sparse | dense
    num_experts: int = 8  # --num-experts
    topk: int = 2  # --moe-router-topk
    moe_layer_freq: int | tuple[int, ...] = 1  # --moe-layer-freq
    rank: int = DEFAULTS["rank"]  # --moe-ders-rank
    alpha: float | None = DEFAULTS["alpha"]  # --moe-ders-alpha
    drop_rate: float = DEFAULTS["drop_rate"]  # --moe-ders-drop-rate
    seed: int = DEFAULTS["seed"]  # --moe-ders-seed: deltas, sparse positions and the router
    shared_expert: str = DEFAULTS["shared_expert"]  # --moe-ders-shared-expert: none | full (copy) | ders (base + delta)
    shared_expert_gate: bool = False  # --moe-shared-expert-gate
    shared_expert_init: str = "split"  # --shared-expert-init: split | copy
    router_init_std: float | None = None  # --router-init-std (default: args.init_method_std)
    renormalize_topk: bool = True  # --no-renormalize-topk sets moe_router_pre_softmax
    freeze_base: bool = False  # --moe-ders-freeze-base
    impl: str | None = None  # --moe-ders-impl
    token_dispatcher: str | None = None  # --moe-token-dispatcher-type
    target_tp: int | None = None  # --target-tp (checked only)
    target_ep: int | None = None  # --target-ep (checked only)
    target_etp: int | None = None  # --target-etp (checked only)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UpcycleError(f"--moe-ders must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.num_experts, int) or self.num_experts < 2:
            raise UpcycleError(f"--num-experts must be an integer >= 2, got {self.num_experts!r}")
        if not isinstance(self.topk, int) or not 1 <= self.topk <= self.num_experts:
            raise UpcycleError(f"--moe-router-topk must be in [1, --num-experts={self.num_experts}], got {self.topk!r}")
        if self.topk == 1 and self.renormalize_topk:
            raise UpcycleError(
                "--moe-router-topk 1 needs softmax before top-k in megatron-core "
                "(transformer/transformer_config.py:2328); pass --no-renormalize-topk (the top-1 "
                "probability is then < 1, so the MoE does not equal the dense model at step 0)"
            )
        try:  # the size is the dense FFN's (a copy of it), always the experts' size here
            check_shared_expert(self.shared_expert, self.kind, None if self.shared_expert == "none" else 1, None)
        except DeRSArgumentError as err:
            raise UpcycleError(str(err)) from err
        if self.shared_expert_init not in SHARED_INITS:
            raise UpcycleError(f"--shared-expert-init must be one of {SHARED_INITS}, got {self.shared_expert_init!r}")
        if self.router_init_std is not None and not self.router_init_std > 0:
            raise UpcycleError(f"--router-init-std must be > 0, got {self.router_init_std!r}")
        for flag, value in (("--target-tp", self.target_tp), ("--target-ep", self.target_ep), ("--target-etp", self.target_etp)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UpcycleError(f"{flag} must be an integer >= 1, got {value!r}")
        if self.target_ep and self.num_experts % self.target_ep:
            raise UpcycleError(
                f"--num-experts {self.num_experts} is not divisible by --target-ep {self.target_ep}: "
                "every expert-parallel rank must hold the same number of experts"
            )
        if self.impl is not None and self.impl not in IMPLS:
            raise UpcycleError(f"--moe-ders-impl must be one of {IMPLS}, got {self.impl!r}")
        if self.kind != "vanilla":
            try:
                delta_config(self.kind, rank=self.rank, alpha=self.alpha, drop_rate=self.drop_rate)
            except ValueError as err:
                raise UpcycleError(str(err)) from err

    @property
    def fc2_scale(self) -> float:
        return shared_fc2_scale(self.shared_expert, self.shared_expert_gate, self.shared_expert_init)


def moe_args(dense_args: argparse.Namespace, cfg: UpcycleConfig) -> argparse.Namespace:
    """The MoE model's args: the dense args plus MoE and DeRS settings, under the
    ``dest`` names of Megatron's and ``ders_megatron.training.arguments``' flags."""
    args = copy.copy(dense_args)
    args.num_experts = cfg.num_experts
    args.moe_router_topk = cfg.topk
    args.moe_layer_freq = list(cfg.moe_layer_freq) if isinstance(cfg.moe_layer_freq, tuple) else cfg.moe_layer_freq
    args.moe_ffn_hidden_size = dense_args.ffn_hidden_size
    args.moe_router_pre_softmax = not cfg.renormalize_topk
    args.moe_grouped_gemm = False
    args.moe_use_upcycling = False
    if cfg.token_dispatcher is not None:
        args.moe_token_dispatcher_type = cfg.token_dispatcher
    args.moe_shared_expert_intermediate_size = None if cfg.shared_expert == "none" else dense_args.ffn_hidden_size
    args.moe_shared_expert_gate = cfg.shared_expert_gate and cfg.shared_expert != "none"
    set_ders_args(args, kind=cfg.kind, rank=cfg.rank, alpha=cfg.alpha, drop_rate=cfg.drop_rate, seed=cfg.seed,
                  impl=cfg.impl, freeze_base=cfg.freeze_base, shared_expert=cfg.shared_expert)
    # A new run: megatron.training reads these from checkpoint args on --load (checkpointing.py:2499).
    args.consumed_train_samples = args.skipped_train_samples = args.consumed_valid_samples = 0
    args.expert_model_parallel_size = cfg.target_ep or 1
    if cfg.target_tp is not None:
        args.tensor_model_parallel_size = cfg.target_tp
    args.expert_tensor_parallel_size = cfg.target_etp
    return args


def check_target_layout(args, cfg: UpcycleConfig) -> None:
    """Divisibility of the layout the MoE model will be trained at (``--target-*``)."""
    tp = cfg.target_tp or 1
    checks = [
        ("--num-attention-heads", args.num_attention_heads),
        ("--num-query-groups", getattr(args, "num_query_groups", None) if getattr(args, "group_query_attention", False) else None),
        ("--ffn-hidden-size", args.ffn_hidden_size),
    ]
    for flag, value in checks:
        if value is not None and value % tp:
            raise UpcycleError(f"{flag} {value} is not divisible by --target-tp {tp}")
    etp = cfg.target_etp if cfg.target_etp is not None else tp
    if cfg.kind != "vanilla":
        try:
            check_expert_tp(etp, tp, "--target-etp", "--target-tp")
        except DeRSArgumentError as err:
            raise UpcycleError(str(err)) from err


# --------------------------------------------------------------------------- #
# Input checks
# --------------------------------------------------------------------------- #
def _check_dense_matches(dense_root, args, shapes) -> None:
    """Every tensor the dense model has is in the checkpoint with its shape."""
    from ders_megatron.io.streaming import build_model, plan_model, single_rank_args

    from ders_megatron.io.layout import impl_of, resolve_key

    plan = plan_model(build_model(single_rank_args(args), use_te=False))
    for chunk in plan.chunks:
        key = resolve_key(chunk.key, shapes)  # either --transformer-impl's layout
        if key not in shapes:
            raise UpcycleError(
                f"{dense_root} lacks {chunk.key!r} (its args say --transformer-impl {impl_of(args)}): "
                "truncated, or not the model its args describe"
            )
        if tuple(shapes[key][0]) != chunk.global_shape:
            raise UpcycleError(
                f"{dense_root}: {key} has shape {tuple(shapes[key][0])}, its args say {chunk.global_shape}"
            )


# --------------------------------------------------------------------------- #
# Offline
# --------------------------------------------------------------------------- #
class _Values:
    """Full world-size-1 values of the MoE model's parameters, computed one at a time."""

    def __init__(self, plan, dense: DenseSource, args, cfg: UpcycleConfig, ders):
        from ders_megatron.io.streaming import SliceCache

        self.plan = plan
        self.dense = dense
        self.cfg = cfg
        self.ders = ders
        self.cache = SliceCache(dense.root, size=1, shapes=dense.shapes)
        self.std = cfg.router_init_std or getattr(args, "init_method_std", 0.02)
        self._deltas: tuple | None = None

    def __call__(self, name: str) -> torch.Tensor:
        entry = self.plan.entries[name]
        first = self.plan.entry_tensors(name)[0]
        layer, suffix = key_suffix(first)
        source = source_of(suffix, self.dense.suffixes, self.cfg.fc2_scale)
        shape, dtype = tuple(entry.data.shape), entry.data.dtype
        if source.what == "copy":
            request = self.dense.request(layer, source.suffix, (0,) * len(shape), shape)
            value = self.cache.get(request)
            return value if source.scale == 1.0 else (value.float() * source.scale).to(value.dtype)
        if source.what == "per_expert":  # [experts, out]: the dense bias in every expert's row
            request = self.dense.request(layer, source.suffix, (0,) * (len(shape) - 1), shape[1:])
            value = self.cache.get(request).unsqueeze(0).expand(shape).clone()
            return value if source.scale == 1.0 else (value.float() * source.scale).to(value.dtype)
        if source.what == "router":
            return router_weight(shape[0], shape[1], layer + 1, self.cfg.seed, self.std, dtype)
        if source.what == "zeros":
            return torch.zeros(shape, dtype=dtype)
        return self._delta_value(layer, suffix, dtype)

    def origin(self, name: str) -> str:
        """Where ``name``'s values come from (the writer's NaN/Inf message)."""
        from ders_megatron.io.checkpoint import describe_source

        layer, suffix = key_suffix(self.plan.entry_tensors(name)[0])
        source = source_of(suffix, self.dense.suffixes, self.cfg.fc2_scale)
        if source.what != "copy":
            return f"initialised by upcycling ({source.what})"
        found = self.dense.locate(layer, source.suffix)
        return f"copied from {describe_source(self.dense.root, found[0])}" if found else ""

    def _delta_value(self, layer, suffix, dtype) -> torch.Tensor:
        """Build the layer's delta module for one matrix as DeRSExperts does and read its tensor."""
        owner, _, rest = suffix.partition(".deltas.")
        matrix, _, param = rest.partition(".")
        key = (layer, owner, matrix)
        if self._deltas is None or self._deltas[0] != key:
            self._deltas = None
            config = self.plan.config
            out, inp = delta_matrices(config.hidden_size, config.moe_ffn_hidden_size, config.gated_linear_unit)[matrix]
            shared = owner.endswith("shared_experts")
            experts = [config.num_moe_experts] if shared else list(range(config.num_moe_experts))
            module = build_deltas(self.ders.delta, experts, out, inp, seed=self.ders.seed, matrix=matrix, dtype=dtype)
            module.set_layer_number(layer + 1)
            self._deltas = (key, dict(module.state_dict()))
        return self._deltas[1][param]


def upcycle_checkpoint(dense_root, out_root, cfg: UpcycleConfig, *, force: bool = False,
                       transformer_impl: str | None = None, file_bytes: int | None = None) -> dict:
    """Write the MoE checkpoint of ``cfg`` from the dense checkpoint at ``dense_root``.

    Streams parameter by parameter; the output directory appears only when
    complete (and replaces an existing one only with ``force``). Returns a summary
    (bytes in/out, tensors, seconds).
    """
    from ders_megatron.io.streaming import (
        DEFAULT_FILE_BYTES,
        build_model,
        plan_model,
        release_common,
        single_rank_args,
        write_release,
    )
    from ders_megatron.io.layout import impl_of, plan_in_layout
    from ders_megatron.io.session import single_rank_megatron

    start = time.perf_counter()
    out_root = Path(out_root)
    if out_root.exists() and not force:
        raise UpcycleError(f"{out_root} exists; pass --force to overwrite it")
    with single_rank_megatron():
        dense_args = read_dense_args(dense_root)
        args = moe_args(dense_args, cfg)
        if transformer_impl is not None:
            args.transformer_impl = transformer_impl
        check_target_layout(args, cfg)
        dense = DenseSource(dense_root)
        _check_dense_matches(dense_root, dense_args, dense.shapes)
        ders = ders_config_from_args(args)
        # The local spec's model gives every tensor; the checkpoint is keyed for the impl
        # its args record (io/layout.py: what TE's spec names differently), TE or not here.
        model = build_model(single_rank_args(args), ders, use_te=False)
        plan = plan_in_layout(plan_model(model), impl_of(args))
        values = _Values(plan, dense, args, cfg, ders)
        with atomic_output_dir(out_root, force=force) as tmp:
            written = write_release(tmp, plan, values, release_common(args), file_bytes or DEFAULT_FILE_BYTES)
    return {
        "dense_bytes": sum(_nbytes(s, d) for k, (s, d) in dense.shapes.items() if not k.startswith("optimizer.")),
        "moe_bytes": written,
        "tensors": len(plan.chunks),
        "seconds": time.perf_counter() - start,
    }


def _nbytes(shape, dtype) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * torch.empty((), dtype=dtype).element_size()
