"""In-process training and scoring for the replication study, with megatron-core's parts.

Setting A trains ~60 small models; a torchrun launch per run (~10 s of start-up, the
same as a run) would dominate, so every run is trained in this process at world size
1 with megatron-core's own pieces: the model from the checkpoint's args
(``convert.hf.megatron_model.gpt_from_args``, the exporter's builder), megatron's
``DistributedDataParallel`` + ``get_megatron_optimizer`` (Adam, grad clipping; frozen
parameters excluded, ``optimizer/__init__.py:988``), ``OptimizerParamScheduler``
(warm-up + cosine, ``optimizer_param_scheduler.py:125``) and the no-pipelining
schedule (``pipeline_parallel/schedules.py:696``), which scales the MoE aux loss per
micro-batch as Megatron's training loop does.

Data: random windows of ``seq_length + 1`` tokens, drawn from a ``torch.Generator``
seeded by the run's seed (the data order is part of what a seed varies). Scoring:
every non-overlapping window of the held-out tokens, the mean loss of each window
kept so that two models can be compared pairwise (:mod:`.stats`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """One training run's schedule (every variant of a setting alike)."""

    iters: int
    lr: float
    batch: int  # sequences per iteration
    seq_length: int
    warmup: int = 10
    min_lr_ratio: float = 0.1  # cosine to lr * min_lr_ratio
    clip_grad: float = 1.0
    aux_loss_coeff: float = 0.01

    def __post_init__(self):
        if self.iters < 1 or self.batch < 1 or self.seq_length < 8 or not self.lr > 0:
            raise ValueError(f"bad schedule {self}")


def _batch(tokens_N: torch.Tensor, starts_B: torch.Tensor, seq_length: int) -> dict:
    offsets_S = torch.arange(seq_length + 1)
    rows_BS = tokens_N[starts_B[:, None] + offsets_S[None, :]]  # [batch, seq + 1]
    return {
        "tokens": rows_BS[:, :-1].contiguous(),
        "labels": rows_BS[:, 1:].contiguous(),
        "position_ids": offsets_S[:-1].expand(len(starts_B), seq_length).contiguous(),
    }


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    per_token_BS = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output_BS):
        loss = output_BS.float().mean()
        return loss, {"lm loss": loss.detach()}

    return per_token_BS, loss_func


def _optimizer(ddp_model, schedule: Schedule):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = OptimizerConfig(optimizer="adam", lr=schedule.lr, min_lr=schedule.lr * schedule.min_lr_ratio,
                             weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, clip_grad=schedule.clip_grad,
                             use_distributed_optimizer=False)
    optimizer = get_megatron_optimizer(config, [ddp_model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=schedule.lr, min_lr=schedule.lr * schedule.min_lr_ratio,
        lr_warmup_steps=min(schedule.warmup, schedule.iters - 1), lr_decay_steps=schedule.iters,
        lr_decay_style="cosine", start_wd=0.0, end_wd=0.0, wd_incr_steps=schedule.iters, wd_incr_style="constant",
    )
    return optimizer, scheduler


def train(model, tokens_N: torch.Tensor, schedule: Schedule, seed: int, progress=None) -> dict:
    """Train ``model`` in place; the LM loss of every iteration and the time taken."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = model.config
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module=model)
    optimizer, scheduler = _optimizer(ddp, schedule)
    forward_backward = get_forward_backward_func()
    generator = torch.Generator().manual_seed(seed)
    high = tokens_N.numel() - schedule.seq_length - 1
    losses, start = [], time.perf_counter()
    ddp.train()
    for _ in range(schedule.iters):
        starts_B = torch.randint(0, high, (schedule.batch,), generator=generator)
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        out = forward_backward(forward_step_func=_forward_step,
                               data_iterator=iter([_batch(tokens_N, starts_B, schedule.seq_length)]),
                               model=[ddp], num_microbatches=1, seq_length=schedule.seq_length,
                               micro_batch_size=schedule.batch, forward_only=False)
        ok, grad_norm, _ = optimizer.step()
        if not ok:
            raise FloatingPointError("optimizer step skipped (non-finite gradients)")
        scheduler.step(1)
        loss = float(out[0]["lm loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at iteration {len(losses) + 1}")
        losses.append(loss)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.3f}")
    return {"losses": losses, "seconds": time.perf_counter() - start,
            "tokens": schedule.iters * schedule.batch * schedule.seq_length}


@torch.no_grad()
def window_losses(model, tokens_N: torch.Tensor, seq_length: int, batch: int = 8) -> torch.Tensor:
    """Mean LM loss of every non-overlapping ``seq_length + 1`` window: [windows] float64."""
    count = tokens_N.numel() // (seq_length + 1)
    rows_WS = tokens_N[: count * (seq_length + 1)].view(count, seq_length + 1)
    positions_S = torch.arange(seq_length)
    model.eval()
    out = []
    for first in range(0, count, batch):
        rows = rows_WS[first:first + batch]
        per_token_BS = model(rows[:, :-1].contiguous(), positions_S.expand(len(rows), -1).contiguous(), None,
                             labels=rows[:, 1:].contiguous())
        out.append(per_token_BS.double().mean(dim=1))
    return torch.cat(out)
