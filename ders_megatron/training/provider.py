"""The model provider ``megatron.training.pretrain`` calls: GPTModel with DeRS MoE layers.

``get_model`` (``training/training.py:1730-1763``) calls it as
``provider(pre_process=, post_process=, config=None, pg_collection=)``, plus
``vp_stage=`` per virtual-pipeline chunk. Every Megatron model flag keeps its
meaning: the transformer config comes from ``core_transformer_config_from_args``
and the GPT settings (vocab padding, RoPE, tied embeddings, sequence length)
from ``gpt_config_from_args`` / ``GPTModelBuilder`` (``training/models/gpt.py``);
only the decoder block spec is ours (:func:`ders_megatron.layers.specs.gpt_block_spec`:
``--moe-layer-freq``, DeRS or megatron experts, shared experts, a norm that
supports sequence parallelism on CPU, the layers of this PP/VPP stage).

Why GPTModel and not HybridModel (which GPTModel's deprecation warning points
to): HybridModel lays out its layers from ``--hybrid-layer-pattern`` through a
``HybridStackSubmodules`` spec, and megatron.training builds it only from a
model config (``hybrid_config_from_args``), a path that ignores ``model_provider``.
The DeRS block spec is a ``TransformerBlockSubmodules`` that GPTModel takes
as is; a hybrid stack spec with a DeRS MoE slot is possible later.
"""

from __future__ import annotations

from ders_megatron.core.config import ders_config_from_args
from ders_megatron.io.model import build_gpt
from ders_megatron.io.upcycle_state import upcycle_state_into_model
from ders_megatron.training.arguments import check_args_parsed_by_megatron
from ders_megatron.training.utils import check_resume_checkpoint


def resumes(args) -> bool:
    """``--load`` holds a checkpoint of this run: megatron loads it after the build, so an
    upcycle at start would be overwritten (a restarted upcycling job resumes instead)."""
    return check_resume_checkpoint(args) is not None

class DeRSModelProvider:
    """``model_provider`` for ``pretrain``; logs the parameter report once all chunks exist.

    The one model hook a Megatron-LM ``pretrain_gpt.py`` needs (README "DeRS in your own
    pretrain_gpt.py"): with ``check_args`` it first runs the DeRS checks on args that
    came through Megatron's own parser with ``extra_args_provider=add_ders_args``.

    The report (:func:`ders_megatron.training.utils.accounting_lines`) counts the
    real model across ranks, so every rank must build through this provider.
    """

    def __init__(self, args=None, report: bool = True, check_args: bool = True):
        self._args = args
        self._report = report
        self._check_args = check_args  # examples/pretrain_gpt_ders.py checked them at parse time
        self._chunks = []

    def __call__(self, pre_process=True, post_process=True, config=None, pg_collection=None,
                 vp_stage=None):
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.training import get_args

        args = self._args or get_args()
        if self._check_args:  # args from Megatron-LM's own parser (a user's pretrain_gpt.py)
            check_args_parsed_by_megatron(args)
            self._check_args = False
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        model = build_gpt(args, ders=ders_config_from_args(args), config=config, pre_process=pre_process,
                          post_process=post_process, pg_collection=pg_collection, vp_stage=vp_stage)
        self._chunks.append(model)
        vp_size = args.virtual_pipeline_model_parallel_size
        if vp_stage is None or vp_stage == vp_size - 1:  # every chunk of this rank exists
            if getattr(args, "moe_ders_upcycle_from", None) and not resumes(args):
                self._upcycle(args)
            if self._report:
                self._log_report(args, pg_collection)
            self._chunks = []
        return model

    def _upcycle(self, args) -> None:
        """``--moe-ders-upcycle-from``: fill this rank's chunks from the dense checkpoint
        (each rank reads only its shards), before megatron builds DDP and the optimizer
        (``training/training.py`` get_model -> setup_model_and_optimizer). Same rules and
        result as tools/upcycle.py's output loaded at this layout."""
        from megatron.training import print_rank_0

        counts = upcycle_state_into_model(args.moe_ders_upcycle_from, self._chunks)
        print_rank_0(f"[ders] upcycled from {args.moe_ders_upcycle_from}: {counts['copy']} tensors copied, "
                     f"{counts['router']} routers initialised, deltas from their seeds")

    def _log_report(self, args, pg_collection) -> None:
        from megatron.training import print_rank_0

        from ders_megatron.training.utils import accounting_lines, parameter_census

        census = parameter_census(self._chunks, pg_collection)
        for line in accounting_lines(census, args):
            print_rank_0(f"[ders] {line}")


def model_provider(pre_process=True, post_process=True, config=None, pg_collection=None,
                   vp_stage=None):
    """Function form (no report) for callers that want a plain provider."""
    provider = DeRSModelProvider(report=False, check_args=False)
    return provider(pre_process, post_process, config, pg_collection, vp_stage)
