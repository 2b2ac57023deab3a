"""DeRS MoE in Megatron's own training loop (examples/pretrain_gpt_ders.py), 2 CPU ranks.

Every run is a ``torchrun`` of the real entry point with a tiny GPT (hidden 64,
2 layers, 4 experts top-2, seq 64) and reads its full-precision loss log
(``--ders-loss-log``). Runs that several tests compare are module fixtures.

Layouts change the order of floating-point sums (TP splits matmul reductions
and all-reduces partial products, SP and EP move tokens between ranks), not the
math: fp32 losses of O(5) agree to ~1e-7 after one step; 6 Adam steps amplify
that a little, hence ``LAYOUT_RTOL = 1e-5`` (observed: <= 5e-8).
"""

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ders_megatron.pipeline.main_job import EXCERPT, PRETRAIN, REPO, TINY_MODEL, device_flags, torchrun
from ders_megatron.pipeline.launch import kill_tree
from ders_megatron.training.utils import (
    TRACKER,
    IncompleteCheckpointError,
    _AtomicTrackerStorage,
    read_loss_log,
    resume_iteration,
)

pytestmark = pytest.mark.slow  # ~15 torchrun jobs: a few minutes on 2 CPU cores

LAYOUT_RTOL = 1e-5
MOCK = [*TINY_MODEL, *device_flags(), "--mock-data"]
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
EP2 = ["--expert-model-parallel-size", "2"]
PP2 = ["--pipeline-model-parallel-size", "2"]


def train(tmp: Path, name: str, flags, nproc: int = 2) -> dict[int, float]:
    """Run the entry point; return iteration -> LM loss."""
    log, losses = tmp / f"{name}.log", tmp / f"{name}.jsonl"
    result = torchrun([*flags, "--ders-loss-log", losses], nproc=nproc, log_path=log, timeout=300)
    text = log.read_text(errors="replace")
    assert result.returncode == 0, f"{name} failed:\n" + "\n".join(text.splitlines()[-40:])
    assert "[ders] parameters (whole model)" in text  # the start-of-run accounting
    assert "peak CPU memory" in text or "peak GPU memory" in text
    return read_loss_log(losses)


def assert_close(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    assert a == pytest.approx(b, rel=rtol)


# --------------------------------------------------------------------------- #
# Parallel layouts and checkpoints (mock data, DeRS-LM)
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference(runs):
    """TP=1 (DP=2), 6 iterations straight, saving at 3 and 6."""
    flags = [*MOCK, "--moe-ders", "lowrank", "--train-iters", "6", "--save", runs / "ref", "--save-interval", "3"]
    return train(runs, "ref", flags)


@pytest.fixture(scope="module")
def tp2(runs):
    flags = [*MOCK, *TP2, "--moe-ders", "lowrank", "--train-iters", "6",
             "--save", runs / "tp2", "--save-interval", "3"]
    return train(runs, "tp2", flags)


def test_tp2_with_sp_matches_tp1(reference, tp2):
    assert len(reference) == 6
    assert_close(tp2, reference, LAYOUT_RTOL)


def test_ep2_matches_tp1(runs, reference):
    losses = train(runs, "ep2", [*MOCK, *EP2, "--moe-ders", "lowrank", "--train-iters", "6"])
    assert_close(losses, reference, LAYOUT_RTOL)


def test_pp2_matches_tp1(runs, reference):
    # Megatron seeds each pipeline stage differently (initialize.py: seed + 100 * pp_rank),
    # so PP=2 starts from the reference's iteration-3 checkpoint (weights and Adam state).
    flags = [*MOCK, *PP2, "--moe-ders", "lowrank", "--train-iters", "6",
             "--load", runs / "ref", "--ckpt-step", "3"]
    losses = train(runs, "pp2", flags)
    assert_close(losses, {i: reference[i] for i in (4, 5, 6)}, LAYOUT_RTOL)


def test_resume_is_exact(runs, reference):
    """6 iterations straight == 3 iterations, save, load in a new job, 3 more."""
    flags = [*MOCK, "--moe-ders", "lowrank", "--train-iters", "6", "--load", runs / "ref", "--ckpt-step", "3"]
    losses = train(runs, "resume", flags)
    assert losses == {i: reference[i] for i in (4, 5, 6)}  # bit-identical


def test_checkpoint_saved_at_tp2_resumes_at_tp1(runs, reference, tp2):
    flags = [*MOCK, "--moe-ders", "lowrank", "--train-iters", "6", "--load", runs / "tp2", "--ckpt-step", "3"]
    losses = train(runs, "tp2_to_tp1", flags)
    assert_close(losses, {i: tp2[i] for i in (4, 5, 6)}, LAYOUT_RTOL)
    assert_close(losses, {i: reference[i] for i in (4, 5, 6)}, LAYOUT_RTOL)


@pytest.mark.skipif(importlib.util.find_spec("ders_megatron.layers.fused") is None,
                    reason="the fused DeRS layer is not in this checkout")
def test_fused_impl_matches_dropin(runs, reference):
    """--moe-ders-impl fused at TP=2+SP: same math as the drop-in experts at TP=1."""
    flags = [*MOCK, *TP2, "--moe-ders", "lowrank", "--moe-ders-impl", "fused", "--train-iters", "6"]
    assert_close(train(runs, "fused_tp2", flags), reference, LAYOUT_RTOL)


# --------------------------------------------------------------------------- #
# Real text (King James Bible, Genesis; public domain): every delta kind trains
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def kjv(tmp_path_factory):
    sys.path.insert(0, str(REPO / "tools"))
    from preprocess_data import build_parser, preprocess

    prefix = tmp_path_factory.mktemp("kjv") / "genesis"
    preprocess(build_parser().parse_args(["--input", str(EXCERPT), "--output-prefix", str(prefix), "--quiet"]))
    return [*TINY_MODEL, *device_flags(), "--data-path", str(prefix), "--split", "100,0,0"]


def _plain_tensors(ckpt_dir, argv):
    """Runs on a gloo rank: the saved model tensors of the experts, and the base of a
    freshly built model (its init is seeded by --moe-ders-seed, whatever the layout)."""
    import torch
    from megatron.core import dist_checkpointing

    from ders_megatron.training.arguments import validated_args
    from ders_megatron.core.config import ders_config_from_args
    from ders_megatron.io.model import build_gpt
    from ders_megatron.testing.distributed import model_parallel

    step = (Path(ckpt_dir) / TRACKER).read_text().strip()
    saved = dist_checkpointing.load_plain_tensors(str(Path(ckpt_dir) / f"iter_{int(step):07d}"))
    saved = {k: v for k, v in saved.items() if k.startswith("decoder.layers.mlp.experts.")}
    args = validated_args(argv, {"eval_interval": 1000})
    args.padded_vocab_size = 512
    with model_parallel():
        fresh = build_gpt(args, ders=ders_config_from_args(args))
    layers = fresh.decoder.layers
    initial = {
        f"decoder.layers.mlp.experts.{n}.weight": torch.stack(
            [getattr(layer.mlp.experts, n).weight.detach() for layer in layers])
        for n in ("linear_fc1", "linear_fc2")
    }
    return saved, initial


@pytest.mark.parametrize("kind", ["lowrank", "sparse", "dense"])
def test_ders_trains_on_text(runs, kjv, dist1, kind):
    extra = ["--moe-ders-drop-rate", "0.9"] if kind == "sparse" else []
    flags = [*kjv, *EP2, "--moe-ders", kind, *extra, "--train-iters", "30",
             "--save", runs / f"text_{kind}", "--save-interval", "1000"]
    losses = list(train(runs, f"text_{kind}", flags).values())
    # Bytes of English: ln(512) = 6.24 at init (257 ids padded to 512); ~3 nats after 30 steps.
    start, end = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert end < start - 2.0, losses
    saved, _ = dist1.run(_plain_tensors, str(runs / f"text_{kind}"), _single_rank(flags))[0]
    trained = {k: v for k, v in saved.items() if k.rsplit(".", 1)[-1] in ("lora_B", "values", "weight")
               and ".deltas." in k}
    assert len(trained) == 3 and all(v.abs().max() > 0 for v in trained.values())  # zero at init


def _single_rank(flags):
    """The same model flags for one rank (the base init does not depend on the layout)."""
    flags = [str(f) for f in flags]
    i = flags.index(EP2[0])
    return flags[:i] + flags[i + 2:]


def test_frozen_base_stays_bit_identical(runs, kjv, dist1):
    flags = [*kjv, *EP2, "--moe-ders", "lowrank", "--moe-ders-freeze-base", "--train-iters", "6",
             "--save", runs / "frozen", "--save-interval", "1000"]
    losses = list(train(runs, "frozen", flags).values())
    assert losses[-1] < losses[0]
    saved, initial = dist1.run(_plain_tensors, str(runs / "frozen"), _single_rank(flags))[0]
    for key, tensor in initial.items():
        assert saved[key].equal(tensor), key
    assert saved["decoder.layers.mlp.experts.deltas.fc2.lora_B"].abs().max() > 0


# --------------------------------------------------------------------------- #
# Crash safety: --load never takes a half-written checkpoint
# --------------------------------------------------------------------------- #
def test_kill_during_save_never_leaves_a_loadable_partial_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    flags = [*MOCK, "--moe-ders", "lowrank", "--train-iters", "4", "--save", ckpt, "--save-interval", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(PRETRAIN), *map(str, flags)]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + 240
        while not (ckpt / "iter_0000004").exists():  # the second save has started
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.005)
        kill_tree(proc)
    # Whatever the kill interrupted, the tracker names a complete checkpoint.
    step = resume_iteration(ckpt)
    assert step in (2, 4)
    assert (ckpt / f"iter_{step:07d}" / "metadata.json").is_file()
    if step == 2:  # killed inside the save (the usual case): iteration 4 is partial, not used
        assert not (ckpt / "iter_0000004" / "metadata.json").is_file()

    # A tracker pointing at a partial directory, or a truncated tracker, is refused.
    (ckpt / "iter_0000008").mkdir()
    (ckpt / TRACKER).write_text("8")
    with pytest.raises(IncompleteCheckpointError, match="iter_0000008 is incomplete"):
        resume_iteration(ckpt)
    (ckpt / TRACKER).write_text("")
    with pytest.raises(IncompleteCheckpointError, match="not an iteration"):
        resume_iteration(ckpt)


def test_resume_iteration_reads_the_tracker_as_megatron_does(tmp_path):
    assert resume_iteration(tmp_path) is None  # no tracker: Megatron starts from scratch
    done = tmp_path / "iter_0000005"
    done.mkdir()
    (done / "metadata.json").write_text("{}")
    assert resume_iteration(tmp_path, ckpt_step=5) == 5  # --ckpt-step needs no tracker
    (tmp_path / TRACKER).write_text("5\n")
    assert resume_iteration(tmp_path) == 5
    with pytest.raises(IncompleteCheckpointError, match="iter_0000004"):
        resume_iteration(tmp_path, ckpt_step=4)
    legacy = tmp_path / "iter_0000005" / "mp_rank_00"  # --ckpt-format torch
    assert pytest.raises(IncompleteCheckpointError, resume_iteration, tmp_path, use_dist_ckpt=False)
    legacy.mkdir()
    (legacy / "model_optim_rng.pt").write_bytes(b"")
    assert resume_iteration(tmp_path, use_dist_ckpt=False) == 5


def test_tracker_is_written_atomically(tmp_path):
    """Megatron's tracker write (checkpointing.py:1011) goes through our atomic file."""
    tracker = tmp_path / TRACKER
    tracker.write_text("2")
    from megatron.core.msc_utils import maybe_msc

    storage = _AtomicTrackerStorage(maybe_msc)
    with pytest.raises(RuntimeError):
        with storage.open(str(tracker), "w") as f:
            f.write("4")
            raise RuntimeError("killed mid-write")
    assert tracker.read_text() == "2" and list(tmp_path.iterdir()) == [tracker]
    with storage.open(str(tracker), "w") as f:
        f.write("4")
    assert tracker.read_text() == "4"


def _entry_point(flags):
    """The entry point as one plain process (world size 1, no torchrun)."""
    return subprocess.run([sys.executable, str(PRETRAIN), *map(str, flags)], capture_output=True,
                          text=True, timeout=120, cwd=REPO,
                          env=dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONPATH=str(REPO)))


def test_invalid_flags_fail_before_any_work(tmp_path):
    """A bad combination exits with the flag named, before process groups or files."""
    flags = [*MOCK, "--moe-ders", "lowrank", "--moe-ders-rank", "500", "--train-iters", "6",
             "--save", tmp_path / "never", "--save-interval", "1"]
    result = _entry_point(flags)
    assert result.returncode != 0
    assert "--moe-ders-rank 500 exceeds the expert FFN" in result.stderr
    assert "initializing torch distributed" not in result.stdout
    assert not (tmp_path / "never").exists()


def test_load_of_partial_checkpoint_fails_before_any_work(tmp_path):
    partial = tmp_path / "partial"
    (partial / "iter_0000003").mkdir(parents=True)
    (partial / TRACKER).write_text("3")
    result = _entry_point([*MOCK, "--moe-ders", "lowrank", "--train-iters", "6", "--load", partial])
    assert result.returncode != 0
    assert "iter_0000003 is incomplete" in result.stderr
    assert "initializing torch distributed" not in result.stdout


def test_load_with_other_ders_flags_fails_before_any_work():
    """--load of a DeRS checkpoint with another rank and alpha: each flag named, nothing started."""
    golden = Path(__file__).resolve().parent / "data" / "golden" / "lowrank"  # rank 2, alpha 4 (tests/golden.py)
    flags = [*MOCK, "--moe-ders", "lowrank", "--moe-ders-rank", "4", "--train-iters", "6", "--load", golden]
    result = _entry_point(flags)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--moe-ders-rank: run 4, checkpoint 2" in result.stderr
    assert "--moe-ders-alpha: run (not set), checkpoint 4.0" in result.stderr
    assert "initializing torch distributed" not in result.stdout


# --------------------------------------------------------------------------- #
# Upcycling at start (--moe-ders-upcycle-from)
# --------------------------------------------------------------------------- #
# At TP=2 megatron pads the vocabulary to a multiple of 128·TP: 64·TP keeps the dense model's 128
# rows (without it the upcycle stops on the embedding's shape, naming the flag).
@pytest.mark.parametrize("layout", [EP2, [*TP2, "--make-vocab-size-divisible-by", "64"]], ids=["ep2", "tp2-sp"])
def test_upcycle_at_start_equals_the_offline_tool(tmp_path, layout):
    """2 ranks (EP=2, or TP=2 with SP) fill their shards straight from the dense checkpoint; with lr 0 the
    step leaves them as filled, and the saved tensors are bit-identical to tools/upcycle.py's
    output of the same settings (recorded in tests/data/golden/digests.json, "lowrank")."""
    import json

    import golden
    from ders_megatron.pipeline.train import model_flags
    from ders_megatron.testing.distributed import run_distributed

    dense = golden.DATA / "dense"
    settings = golden.UPCYCLES["lowrank"]  # 4 experts, rank 2, seed 11
    flags = [*model_flags(dense), *device_flags(), "--mock-data", "--seq-length", "32",
             "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "1",
             "--lr", "0", "--min-lr", "0", "--lr-decay-style", "constant", "--eval-iters", "0",
             "--num-experts", settings["num_experts"], "--moe-router-topk", "2",
             "--moe-ders", "lowrank", "--moe-ders-rank", settings["rank"], "--moe-ders-seed", settings["seed"],
             *layout, "--moe-ders-upcycle-from", dense,
             "--save", tmp_path / "run", "--save-interval", "1", "--no-save-optim", "--no-save-rng"]
    log = tmp_path / "run.log"
    result = torchrun(flags, nproc=2, log_path=log, timeout=300)
    text = log.read_text(errors="replace")
    assert result.returncode == 0, "\n".join(text.splitlines()[-40:])
    assert "[ders] upcycled from" in text
    got = run_distributed(golden.tensor_digests, 1, str(tmp_path / "run"))[0]
    want = json.loads(golden.DIGESTS.read_text())["upcycle"]["lowrank"]
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []


# --------------------------------------------------------------------------- #
# Memory: DeRS-LM ~ dense, vanilla upcycling grows with the experts
# --------------------------------------------------------------------------- #
MEMORY_MODEL = (
    "--num-layers 2 --hidden-size 256 --ffn-hidden-size 1024 --num-attention-heads 4 --seq-length 64 "
    "--max-position-embeddings 64 --micro-batch-size 1 --train-iters 1 --swiglu --disable-bias-linear "
    "--untie-embeddings-and-output-weights --tokenizer-type NullTokenizer --vocab-size 257 --cpu"
).split()


def _state_memory(variants):
    """Runs on a gloo rank: real models' census and params+grads+Adam bytes per variant."""
    from ders_megatron.training.arguments import validated_args
    from ders_megatron.core.config import ders_config_from_args
    from ders_megatron.io.model import build_gpt
    from ders_megatron.testing.distributed import model_parallel
    from ders_megatron.training.utils import (
        accounting_delta,
        accounting_shape,
        parameter_census,
        training_state_bytes,
    )

    out = {}
    for name, extra in variants.items():
        args = validated_args(MEMORY_MODEL + extra, {"eval_interval": 1000})
        args.padded_vocab_size = 512
        with model_parallel():
            census = parameter_census([build_gpt(args, ders=ders_config_from_args(args))])
        added = None
        if args.num_experts:
            from ders_megatron.core.accounting import added_parameters

            added = added_parameters(accounting_shape(args), accounting_delta(args)).added_params
        out[name] = (census, training_state_bytes(census, args), added)
    return out


def test_ders_memory_stays_dense_while_vanilla_grows_with_experts(dist1):
    moe = lambda e: ["--num-experts", str(e), "--moe-router-topk", "2"]  # noqa: E731
    variants = {
        "dense": [],
        "vanilla4": moe(4), "vanilla8": moe(8),
        "ders4": moe(4) + ["--moe-ders", "lowrank", "--moe-ders-rank", "1"],
        "ders8": moe(8) + ["--moe-ders", "lowrank", "--moe-ders-rank", "1"],
    }
    res = dist1.run(_state_memory, variants)[0]
    dense_census, dense_bytes, _ = res["dense"]
    for name in ("vanilla4", "vanilla8", "ders4", "ders8"):
        census, _, added = res[name]
        assert census["total"] - dense_census["total"] == added, name  # real model == paper accounting
    # fp32 weights + fp32 grads + Adam's two moments: 16 bytes per trainable parameter.
    assert dense_bytes == 16 * dense_census["total"]
    assert res["ders4"][1] <= 1.05 * dense_bytes and res["ders8"][1] <= 1.05 * dense_bytes
    # Vanilla upcycling adds (E - 1) full FFN copies per MoE layer: it grows linearly in E.
    vanilla_growth = res["vanilla8"][1] - res["vanilla4"][1]
    ffn_bytes = 16 * 2 * (3 * 256 * 1024)  # 2 MoE layers x one SwiGLU FFN
    assert vanilla_growth == 4 * ffn_bytes + 16 * 2 * 4 * 256  # 4 more experts (+ router rows)
    assert res["vanilla4"][1] > 2.5 * dense_bytes
