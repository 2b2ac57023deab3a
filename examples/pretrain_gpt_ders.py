"""Pretrain a GPT with DeRS MoE layers in Megatron-LM's own training loop.

    torchrun --nproc-per-node 8 examples/pretrain_gpt_ders.py <Megatron-LM flags> \
        --num-experts 8 --moe-ders lowrank --moe-ders-rank 4 [--cpu]

Every Megatron-LM flag works as in ``pretrain_gpt.py`` (data blends over
indexed .bin/.idx files or --mock-data, LR schedules, clipping, the distributed
optimizer, logging, evaluation, --save/--load/--save-interval); the DeRS and
``--cpu`` flags are in ``ders_megatron/training/arguments.py``. megatron-core 0.19.2 flow:
``initialize_args`` (parse, DeRS checks, ``--cpu`` runtime, Megatron's
``validate_args``), then
``pretrain_cfg_container_from_args`` (``training/argument_utils.py:534``, no
model config so that our model provider is used) and ``pretrain``.
"""

import functools
import os
import sys

# Dynamo off before torch is imported: megatron's jit fuser is torch.compile.
if "--cpu" in sys.argv:
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def main(argv=None) -> None:
    from megatron.core.enums import ModelType
    from megatron.training import get_args, pretrain, print_rank_0
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from ders_megatron.io.checkpoint import CheckpointError
    from ders_megatron.training.arguments import DeRSArgumentError, initialize_args
    from ders_megatron.training.data import train_valid_test_datasets_provider
    from ders_megatron.training.provider import DeRSModelProvider
    from ders_megatron.training.utils import (
        LossLog,
        check_resume_checkpoint,
        forward_step,
        peak_memory_line,
    )

    try:
        # Every flag is checked here, before any work. 0.19.2 has no default
        # --eval-interval, yet sizes the validation set with it (training/training.py:4481);
        # 1000 was Megatron-LM's default.
        args = initialize_args(argv, args_defaults={"eval_interval": 1000})
        check_resume_checkpoint(args)  # --load: never a half-written checkpoint
    except (DeRSArgumentError, CheckpointError) as err:  # CheckpointError: incomplete, or holds code
        print(f"pretrain_gpt_ders.py: error: {err}", file=sys.stderr)
        sys.exit(2)

    loss_log = LossLog(args.ders_loss_log, rank=args.rank) if args.ders_loss_log else None
    cfg = pretrain_cfg_container_from_args(args)
    pretrain(
        cfg,
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        functools.partial(forward_step, loss_log=loss_log),
        model_provider=DeRSModelProvider(check_args=False),  # initialize_args checked them
    )
    print(f"[ders] rank {get_args().rank}: {peak_memory_line()}", flush=True)
    print_rank_0("[ders] training done")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        # Without it, 2-rank gloo runs sometimes abort at exit.
        torch.distributed.destroy_process_group()


if __name__ == "__main__":  # dist_checkpointing's async writer re-imports this module
    main()
