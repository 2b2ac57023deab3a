"""The main job (``python -m ders_megatron.pipeline.main_job``, what ``./main.sh`` runs) end to end
at a reduced size: a tiny random Llama built offline (hidden 64, 2 layers, a byte-level
BPE tokenizer trained on the Genesis excerpt) instead of SmolLM2, 4 experts in every
layer (so the vanilla MoE exports to Mixtral too), 4 iterations of 32 tokens.

One run is a module fixture; the tests read its artifacts, then rerun it to see every
step skipped, and change one setting to see only the steps after it redone.
"""

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ders_megatron.pipeline.launch import EXCERPT, REPO, kill_tree, run_bounded
from ders_megatron.training.utils import TRACKER

pytestmark = pytest.mark.slow  # ~2 minutes on 2 CPU cores (4 torchrun jobs, 14 tool runs)

ITERS = 4
ARGS = ["--text", str(EXCERPT), "--heldout-fraction", "0.1", "--iters", str(ITERS), "--seq-length", "32",
        "--num-experts", "4", "--moe-layer-freq", "1", "--global-batch-size", "4", "--lr", "3e-3",
        "--eval-tokens", "512", "--new-tokens", "8"]
MOE = ("vanilla", "lowrank", "sparse")
EXPORTS = {"dense": "llama", "vanilla": "mixtral", "lowrank": "ders", "compressed": "ders"}


def save_tiny_llama(folder: Path, text: Path, vocab: int = 384) -> None:
    """A random LlamaForCausalLM and a byte-level BPE tokenizer trained on ``text`` (offline)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(text)], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-6,  # not 1e-5, the default: its round trip through the args is checked
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(folder)


def main_job(workdir: Path, hf_model: Path, *extra) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = run_bounded(
        [sys.executable, "-m", "ders_megatron.pipeline.main_job", "--hf-model", str(hf_model), "--workdir", str(workdir),
         *ARGS, *extra],
        timeout=600, env=dict(os.environ, TORCHDYNAMO_DISABLE="1"),
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result, time.perf_counter() - start


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(folder, EXCERPT)
    return folder


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_llama):
    workdir = tmp_path_factory.mktemp("main-job")
    result, seconds = main_job(workdir, tiny_llama)
    print(f"\nmain job (tiny): {seconds:.0f} s")
    return workdir, result.stdout, json.loads((workdir / "results.json").read_text())


def _complete_checkpoint(root: Path, iteration: str = "release") -> None:
    assert (root / TRACKER).read_text().strip() == iteration, root
    step_dir = root / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")
    assert (step_dir / "metadata.json").is_file(), step_dir


def test_every_artifact(job):
    workdir, stdout, results = job
    ckpt = workdir / "checkpoints"
    _complete_checkpoint(ckpt / "dense")  # the HF import
    assert (ckpt / "dense" / "hf" / "tokenizer.json").is_file()
    for variant in MOE:
        _complete_checkpoint(ckpt / "upcycled" / variant)
    for variant in ("dense", *MOE):
        _complete_checkpoint(ckpt / "trained" / variant, str(ITERS))
    _complete_checkpoint(ckpt / "compressed")
    for split in ("train", "heldout"):
        assert (workdir / "data" / f"{split}.bin").stat().st_size > 0
        assert json.loads((workdir / "data" / f"{split}.json").read_text())["vocab_size"] == 384
    for row, fmt in EXPORTS.items():
        folder = workdir / "hf" / f"{row}-{fmt}"
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file(), folder
    for name in ("similarity", "sweep"):
        assert (workdir / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert json.loads((workdir / "plots" / f"{name}.json").read_text())
    assert (workdir / "results.md").read_text().startswith("| model |")
    # Every step's process kept its log, its command line first.
    assert (workdir / "logs" / "upcycle-lowrank.log").read_text().startswith("$ python tools/upcycle.py")
    assert "| DeRS-LM (r=4) |" in stdout and "wall time" in stdout


def test_exports_match_megatron_in_plain_transformers(job):
    workdir, stdout, results = job
    checks = results["hf_checks"]
    assert set(checks) == {"pretrained", *EXPORTS}
    architectures = {"pretrained": "LlamaForCausalLM", "dense": "LlamaForCausalLM", "vanilla": "MixtralForCausalLM",
                     "lowrank": "DeRSMoEForCausalLM", "compressed": "DeRSMoEForCausalLM"}
    for row, check in checks.items():
        assert check["architecture"] == architectures[row], row
        assert check["logits_match"] and check["argmax_agreement"] == 1.0, (row, check)
        assert check["continuation"], row  # a greedy continuation was decoded
    # The compact format came from the modeling file copied into the export, not from ders-megatron,
    # and transformers did not stop to ask whether to run it.
    assert not checks["lowrank"]["module"].startswith("ders_megatron")
    assert "Do you wish to run the custom code" not in (workdir / "logs" / "hf-check-lowrank.log").read_text()
    assert stdout.count("-> match") == len(checks)


def test_table_rows(job):
    _, _, results = job
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == ["pretrained", "dense", *MOE, "compressed"]
    dense = rows["pretrained"]["parameters"]
    assert rows["dense"]["added"] == 0
    # Vanilla adds 3 FFN copies per layer (+ router); DeRS-LM rank-4 deltas a small fraction of that.
    ffn = 3 * 64 * 128
    assert rows["vanilla"]["added"] == 2 * (3 * ffn + 4 * 64)
    assert 0 < rows["sparse"]["added"] < rows["lowrank"]["added"] < rows["vanilla"]["added"] / 5
    # The real model's census (training log) agrees with the checkpoint's parameters.
    for name in ("dense", *MOE):
        assert rows[name]["census"]["total"] == rows[name]["parameters"], name
        assert len(rows[name]["peak_mib_ranks"]) == 2 and rows[name]["seconds_per_iter"] > 0
        assert rows[name]["state_mib"] > 0  # weights + grads + Adam, from the run's accounting line
    assert rows["lowrank"]["state_mib"] < rows["vanilla"]["state_mib"]
    for name in ("dense", *MOE, "compressed"):  # fine-tuning on the text helps every model
        assert rows[name]["heldout_loss"] < rows["pretrained"]["heldout_loss"], name
    assert rows["compressed"]["stored_bytes"] < rows["vanilla"]["stored_bytes"]
    assert rows["lowrank"]["parameters"] == dense + rows["lowrank"]["added"]


def test_sweep_and_table_score_the_same_models(job):
    """tools/analyze.py builds its model from the training args, the table from the
    exporter's ModelDims: same held-out windows, so the same losses (a check that a
    trained checkpoint's args round-trip, e.g. the norm epsilon)."""
    _, _, results = job
    rows = {r["name"]: r for r in results["rows"]}
    sweep = results["plots"]["sweep"]
    # fp32, identical weights and windows; only kernels' summation order may differ.
    assert sweep["baseline"] == pytest.approx(rows["vanilla"]["heldout_loss"], rel=1e-5)
    assert sweep["losses"]["dare:0.9"] == pytest.approx(rows["compressed"]["heldout_loss"], rel=1e-5)


def test_rerun_skips_every_step(job, tiny_llama):
    workdir, _, results = job
    result, seconds = main_job(workdir, tiny_llama)
    steps = re.findall(r"\] skipping (\S+) \(done\)", result.stdout)
    assert set(steps) == set(results["steps"]), result.stdout
    assert "| DeRS-LM (r=4) |" in result.stdout
    assert seconds < 60


def test_changed_codec_redoes_only_the_compressed_model(job, tiny_llama):
    workdir, _, _ = job
    result, _ = main_job(workdir, tiny_llama, "--moe-ders-codecs", "dare:0.5")
    redone = set(re.findall(r"\[\d+/\d+\] (?!skipping)(.*)", result.stdout))
    skipped = set(re.findall(r"\] skipping (\S+) \(done\)", result.stdout))
    assert {"compress", "eval-compressed", "export-compressed", "hf-check-compressed"}.isdisjoint(skipped)
    assert len(redone) == 4, redone
    assert {"train-vanilla", "eval-vanilla", "analyze-sweep"} <= skipped
    assert "compressed vanilla (dare:0.5, dense base)" in result.stdout


@pytest.mark.parametrize("flags, message", [
    (["--num-experts", "5"], "--expert-model-parallel-size 2 must divide --num-experts 5"),
    (["--global-batch-size", "3"], "--global-batch-size 3 must be a multiple"),
    (["--variants", "vanilla,lowrank"], "--variants must include dense"),
    (["--moe-router-topk", "1"], "--moe-router-topk 1"),
])
def test_bad_settings_stop_before_any_work(tmp_path, flags, message):
    result = subprocess.run([sys.executable, "-m", "ders_megatron.pipeline.main_job", "--workdir", str(tmp_path / "w"), *flags],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "w").exists()


def _alive(procs) -> list:
    """The processes still running (a zombie waiting for its reaper counts as ended)."""
    import psutil

    alive = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_sigterm_ends_the_running_step_and_every_process_it_started(tmp_path, tiny_llama):
    """SIGTERM while torchrun trains: the job exits 143, nothing it started lives on (torchrun's
    workers run in sessions of their own), and the step is not recorded as done."""
    import signal

    import psutil

    workdir = tmp_path / "w"
    cmd = [sys.executable, "-m", "ders_megatron.pipeline.main_job", "--hf-model", str(tiny_llama), "--workdir", str(workdir),
           *ARGS]
    with open(tmp_path / "job.log", "w") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env=dict(os.environ, TORCHDYNAMO_DISABLE="1"), start_new_session=True)
    tree = []
    try:
        deadline = time.monotonic() + 300
        while True:  # until the launcher and both ranks of the first fine-tuning run exist
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "job.log").read_text()[-3000:]
            tree = psutil.Process(proc.pid).children(recursive=True)
            trainers = [p for p in _alive(tree) if "pretrain_gpt_ders.py" in " ".join(p.cmdline())]
            if len(trainers) >= 3:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        psutil.wait_procs(tree, timeout=30)
        assert not _alive(tree), [p.cmdline() for p in _alive(tree)]
        assert not (workdir / "state" / "train-dense.json").exists()
    finally:  # whatever failed, leave no process behind to load the rest of the suite
        for p in _alive(tree):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        if proc.poll() is None:
            kill_tree(proc)
