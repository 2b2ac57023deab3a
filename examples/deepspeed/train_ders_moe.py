"""Train a tiny language model whose FFNs are DeRS MoE layers, with DeepSpeed (ZeRO 1 or 2).

Each block is ``x + DeRSMoE(LayerNorm(x))``: DeepSpeed's own MoE layer (gate,
all-to-all, expert-parallel groups) whose experts are one shared base FFN plus a
light delta per expert (``ders_megatron/convert/deepspeed/``). The data is synthetic
(``label = (5 * token + 3) mod vocab``), so the loss falls within a few dozen steps.

    # one CPU process
    python examples/deepspeed/train_ders_moe.py --cpu
    # two CPU processes, experts split over them (expert parallel 2), ZeRO 2 over both
    torchrun --nproc_per_node 2 examples/deepspeed/train_ders_moe.py --cpu --ep-size 2
    # GPUs
    deepspeed --num_gpus 2 examples/deepspeed/train_ders_moe.py --ep-size 2
    # save, then resume
    ... --steps 20 --save-dir /tmp/ders_ds && ... --steps 20 --load-dir /tmp/ders_ds

``ds_config.json`` sets ZeRO stage 2 and ``torch_adam`` (plain ``torch.optim.AdamW``:
nothing to compile; drop it on GPUs for DeepSpeed's FusedAdam). On CPU, DeepSpeed
compiles its shared-memory comm op on first use (tens of seconds, cached in
``TORCH_EXTENSIONS_DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing

from ders_megatron.core.config import DEFAULTS, DELTA_KINDS, delta_config  # noqa: E402
from ders_megatron.convert.deepspeed.ffn import DeRSFFNConfig  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="DeepSpeed's CPU accelerator (gloo), even with GPUs")
    p.add_argument("--ds-config", default=str(HERE / "ds_config.json"), help="DeepSpeed config JSON")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2), help="override zero_optimization.stage")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=1234, help="model init, data and gate noise")
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--ffn", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--swiglu", action="store_true", help="gated FFN, silu(gate) * up")
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--ep-size", type=int, default=1, help="expert-parallel size (divides the world size)")
    p.add_argument("--top-k", type=int, default=2, choices=(1, 2))
    p.add_argument("--capacity-factor", type=float, default=2.0)
    p.add_argument("--aux-loss-coeff", type=float, default=0.01)
    # The package's vocabulary and defaults (ders_megatron/core/config.py); no vanilla/codec here.
    p.add_argument("--moe-ders", default="lowrank", choices=DELTA_KINDS, help="delta kind")
    p.add_argument("--moe-ders-rank", type=int, default=DEFAULTS["rank"])
    p.add_argument("--moe-ders-alpha", type=float, default=DEFAULTS["alpha"])
    p.add_argument("--moe-ders-drop-rate", type=float, default=DEFAULTS["drop_rate"])
    p.add_argument("--moe-ders-freeze-base", action="store_true", help="train the deltas (and gate) only")
    p.add_argument("--save-dir", help="engine.save_checkpoint here after training")
    p.add_argument("--load-dir", help="engine.load_checkpoint from here before training")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return p


def ffn_config(args, layer_number: int) -> DeRSFFNConfig:
    return DeRSFFNConfig(
        hidden_size=args.hidden,
        ffn_hidden_size=args.ffn,
        num_experts=args.num_experts,
        delta=delta_config(args.moe_ders, args.moe_ders_rank, args.moe_ders_alpha, args.moe_ders_drop_rate),
        gated=args.swiglu,
        activation="silu" if args.swiglu else "gelu",
        seed=args.seed,
        layer_number=layer_number,
        num_layers=args.layers,
        freeze_base=args.moe_ders_freeze_base,
    )


class Block(nn.Module):
    def __init__(self, args, layer_number: int):
        super().__init__()
        from ders_megatron.convert.deepspeed.layer import DeRSMoE

        self.norm = nn.LayerNorm(args.hidden)
        # Attribute names on the path to a DeRS layer must not contain "expert"
        # (check_checkpoint_layout says why).
        self.moe = DeRSMoE(
            ffn_config(args, layer_number),
            ep_size=args.ep_size,
            k=args.top_k,
            capacity_factor=args.capacity_factor,
            eval_capacity_factor=args.capacity_factor,
        )

    def forward(self, x_BSD):
        y_BSD, l_aux, _ = self.moe(self.norm(x_BSD))
        return x_BSD + y_BSD, l_aux


class TinyMoELM(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.aux_loss_coeff = args.aux_loss_coeff
        self.embed = nn.Embedding(args.vocab, args.hidden)
        self.blocks = nn.ModuleList(Block(args, layer_number=i + 1) for i in range(args.layers))
        self.norm = nn.LayerNorm(args.hidden)
        self.head = nn.Linear(args.hidden, args.vocab, bias=False)

    def forward(self, tokens_BS, labels_BS):
        x_BSD = self.embed(tokens_BS)
        aux = x_BSD.new_zeros(())
        for block in self.blocks:
            x_BSD, l_aux = block(x_BSD)
            aux = aux + l_aux
        logits = self.head(self.norm(x_BSD))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels_BS.flatten())
        return loss + self.aux_loss_coeff * aux


def build_model(args) -> TinyMoELM:
    """Same weights on every rank for a seed: non-expert ones from the torch seed, DeRS base and
    deltas from seeds derived per (layer, global expert, matrix)."""
    from ders_megatron.convert.deepspeed.layer import check_checkpoint_layout

    torch.manual_seed(args.seed)
    model = TinyMoELM(args)
    check_checkpoint_layout(model)
    return model


def load_ds_config(args) -> dict:
    with open(args.ds_config) as f:
        config = json.load(f)
    if args.zero_stage is not None:
        config.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    return config


def build_engine(args, ds_config: dict):
    import deepspeed

    model = build_model(args)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    return engine


def batch(args, micro_batch: int, step: int, rank: int, device):
    """Synthetic tokens for (step, rank): each data-parallel rank gets its own."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
    tokens = torch.randint(0, args.vocab, (micro_batch, args.seq), generator=gen)
    labels = (5 * tokens + 3) % args.vocab
    return tokens.to(device), labels.to(device)


def train(engine, args, start: int, steps: int) -> list[float]:
    """Steps ``start .. start+steps-1``; returns this rank's losses. The gate's random draws
    (random token selection, sampled second expert) are reseeded per step, so a resumed
    run repeats an uninterrupted one exactly."""
    import deepspeed.comm as dist

    rank = dist.get_rank()
    losses = []
    for step in range(start, start + steps):
        torch.manual_seed(args.seed * 7919 + step * 31 + rank)
        tokens, labels = batch(args, engine.train_micro_batch_size_per_gpu(), step, rank, engine.device)
        loss = engine(tokens, labels)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _single_process_env() -> None:
    """``python train_ders_moe.py`` without a launcher: a world of one (else DeepSpeed looks for MPI)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def main(argv=None) -> list[float]:
    args = build_parser().parse_args(argv)
    if args.cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # read when deepspeed first picks its accelerator
    _single_process_env()
    import deepspeed
    import deepspeed.comm as dist

    deepspeed.init_distributed()
    engine = build_engine(args, load_ds_config(args))
    start = 0
    if args.load_dir:
        _, client_state = engine.load_checkpoint(args.load_dir)
        start = client_state["step"]
    losses = train(engine, args, start, args.steps)
    if dist.get_rank() == 0:
        for i, loss in enumerate(losses):
            print(f"step {start + i:4d}  loss {loss:.4f}")
    if args.save_dir:
        engine.save_checkpoint(args.save_dir, client_state={"step": start + args.steps})
    dist.barrier()
    torch.distributed.destroy_process_group()  # without it 2-rank gloo runs sometimes abort at exit
    return losses


if __name__ == "__main__":
    main()
