"""What the study runs: the two settings, their MoE layouts and variants, and the profiles.

Setting A (many seeds, small model): a dense GPT pretrained here on the KJV text with
a byte-level BPE, upcycled in the two layouts the paper uses and trained on for the
same token budget as a dense-continued control. Setting B (the real model):
SmolLM2-135M (or ``--hf-model``), one seed, the variants the issue names.

A profile fixes every size and schedule; ``quick`` exercises the machinery in the
test suite (never its outcome), ``full`` is the study (docs/replication.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ders_megatron.pipeline.replicate.trainer import Schedule


@dataclass(frozen=True)
class Variant:
    """One model of a comparison; ``kind`` "dense" is the dense-continued control."""

    name: str
    label: str
    kind: str  # dense | vanilla | lowrank | sparse
    rank: int | None = None
    drop_rate: float | None = None
    freeze_base: bool = False


def lowrank(rank: int, frozen: bool = False) -> Variant:
    suffix = "-frozen" if frozen else ""
    label = f"DeRS-LM r={rank}" + (" (frozen base)" if frozen else "")
    return Variant(f"lm{rank}{suffix}", label, "lowrank", rank=rank, freeze_base=frozen)


def sparse(drop_rate: float) -> Variant:
    return Variant(f"sm{drop_rate:g}", f"DeRS-SM p={drop_rate:g}", "sparse", drop_rate=drop_rate)


DENSE = Variant("dense", "dense-continued", "dense")
VANILLA = Variant("vanilla", "vanilla upcycling", "vanilla")


@dataclass(frozen=True)
class Layout:
    """How the dense model is upcycled (paper: MoE-LLaVA and Coder-MoE settings)."""

    name: str
    label: str
    num_experts: int
    topk: int
    moe_layer_freq: int
    shared_expert: bool  # a shared expert (universal FFN); DeRS variants make it base + delta


LLAVA = Layout("llava", "4 experts top-2, every other layer (MoE-LLaVA)", 4, 2, 2, False)
CODER = Layout("coder", "4 experts top-1, every layer, + shared expert (Coder-MoE, extended DeRS)", 4, 1, 1, True)


@dataclass(frozen=True)
class TinyGPT:
    """Setting A's model (Llama-style: RMSNorm, SwiGLU, RoPE, tied embeddings)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    vocab_size: int  # the BPE trained on the training split


@dataclass(frozen=True)
class SettingA:
    model: TinyGPT
    pretrain: Schedule
    train: Schedule
    seeds: tuple[int, ...]
    layouts: tuple[Layout, ...]
    variants: tuple[Variant, ...]
    compress_seeds: int = 3  # the trained vanilla MoEs of the first N seeds are compressed

    @property
    def compressed_seeds(self) -> tuple[int, ...]:
        return self.seeds[: self.compress_seeds]


@dataclass(frozen=True)
class SettingB:
    train: Schedule
    layout: Layout
    variants: tuple[Variant, ...]
    seed: int = 1


COMPRESSION = ("dare:0.2", "dare:0.5", "dare:0.7", "dare:0.9", "dare:0.95", "dare:0.99",
               "quant:8", "quant:4", "quant:2", "quant:1", "svd:1", "svd:4", "svd:16")


@dataclass(frozen=True)
class Profile:
    name: str
    a: SettingA
    b: SettingB | None
    codecs: tuple[str, ...] = COMPRESSION
    heldout_fraction: float = 0.02  # every 50th chapter
    bootstrap: int = 2000  # paired bootstrap resamples
    notes: dict = field(default_factory=dict)


A_VARIANTS = (DENSE, VANILLA, lowrank(1), lowrank(4), lowrank(16), lowrank(64),
              sparse(0.9), sparse(0.99), sparse(0.9999), lowrank(4, frozen=True))
B_VARIANTS = (DENSE, VANILLA, lowrank(4), lowrank(1), sparse(0.9), sparse(0.99))

FULL = Profile(
    name="full",
    a=SettingA(
        model=TinyGPT(num_layers=4, hidden_size=128, ffn_hidden_size=512, num_attention_heads=4, vocab_size=2048),
        pretrain=Schedule(iters=1000, lr=2e-3, batch=16, seq_length=128, warmup=50),
        train=Schedule(iters=200, lr=1e-3, batch=8, seq_length=128, warmup=10),
        seeds=(1, 2, 3), layouts=(LLAVA, CODER), variants=A_VARIANTS,
    ),
    b=SettingB(train=Schedule(iters=150, lr=5e-4, batch=4, seq_length=128, warmup=10), layout=LLAVA,
               variants=B_VARIANTS),
)

QUICK = Profile(
    name="quick",
    a=SettingA(
        model=TinyGPT(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, vocab_size=320),
        pretrain=Schedule(iters=6, lr=3e-3, batch=4, seq_length=32, warmup=2),
        train=Schedule(iters=3, lr=1e-3, batch=4, seq_length=32, warmup=1),
        seeds=(1, 2), layouts=(LLAVA, CODER), variants=(DENSE, VANILLA, lowrank(4), lowrank(4, True)), compress_seeds=1,
    ),
    b=SettingB(train=Schedule(iters=2, lr=1e-4, batch=2, seq_length=16, warmup=1), layout=LLAVA,
               variants=(DENSE, VANILLA, lowrank(4))),
    codecs=("dare:0.9", "quant:4"),
    bootstrap=200,
)

PROFILES = {p.name: p for p in (FULL, QUICK)}
