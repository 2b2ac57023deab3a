"""The one model builder: a GPTModel with DeRS (or megatron's) MoE layers from Megatron args.

The training script's model provider, the tools' meta-device models and the
rank-pool tests all build through :func:`build_gpt`, so a checkpoint's keys are
the same whoever wrote it. The transformer config comes from megatron.training's
own ``core_transformer_config_from_args`` and the GPT settings from
``gpt_config_from_args`` / ``GPTModelBuilder`` (``training/models/gpt.py``); only
the decoder block spec is ours (:func:`ders_megatron.layers.specs.gpt_block_spec`).
"""

from __future__ import annotations

from ders_megatron.core.config import DeRSConfig, qk_layernorm_width_of
from ders_megatron.layers.specs import gpt_block_spec


def build_gpt(args, *, ders: DeRSConfig | None, config=None, pre_process: bool = True,
              post_process: bool = True, pg_collection=None, vp_stage: int | None = None,
              use_te: bool | None = None):
    """One GPTModel chunk for this rank from Megatron args (``args.padded_vocab_size`` set).

    ``ders``: the experts (``core.config.ders_config_from_args(args)`` for a run's flags;
    None builds megatron's own). ``use_te``: Transformer Engine layers; by default what
    ``--transformer-impl`` says.
    """
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.argument_utils import core_transformer_config_from_args, gpt_config_from_args
    from megatron.training.models.gpt import GPTModelBuilder

    if use_te is None:
        use_te = getattr(args, "transformer_impl", "local") == "transformer_engine"
    if config is None:
        config = core_transformer_config_from_args(args)
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    model_cfg = gpt_config_from_args(args, config)
    model_cfg.transformer_layer_spec = gpt_block_spec(
        config, ders=ders, use_te=use_te, vp_stage=vp_stage, pp_rank=pg_collection.pp.rank(),
        qk_layernorm_width=qk_layernorm_width_of(args), tp_group=pg_collection.tp,
    )
    return GPTModelBuilder(model_cfg).build_model(
        pg_collection, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage
    )
