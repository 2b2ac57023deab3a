"""Files are data: no code runs from a checkpoint (issue 19).

A torch_dist checkpoint holds two pickles: ``.metadata`` and the byte objects in
its ``.distcp`` files (megatron's common state with the args). Each test copies a
golden checkpoint (``tests/data/golden``, tiny, with args) and plants a payload in
one of them: an object whose unpickling runs ``touch MARKER`` (``os.system``).
First, that the plant is live: megatron's and torch's own readers run it (and so
does a tool under ``--trust-checkpoint``). Then every tool and the training
``--load`` refuse the checkpoint with exit status 2, name the file and the global,
and the marker never appears. Untouched checkpoints read as megatron reads them.
"""

import contextlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ders_megatron.pipeline.launch import TINY_MODEL, device_flags

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "data" / "golden"
REGRESSION = ROOT / "tests" / "data" / "regression"
PRETRAIN = ROOT / "examples" / "pretrain_gpt_ders.py"
COMMON_KEY = "common_state/shard_0_1"  # megatron's ShardedObject("common_state", ...).unique_key
PAYLOAD_GLOBAL = f"{os.system.__module__}.system"  # how pickle names os.system: posix.system

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


class Payload:
    """Unpickling this runs ``touch marker``: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


# --------------------------------------------------------------------------- #
# Planting (on our own copies, so the plain pickle module may read them)
# --------------------------------------------------------------------------- #
def plant_in_metadata(release: Path, marker: Path) -> Path:
    """The payload as an extra attribute of the Metadata: plain readers run it and
    then read the checkpoint normally. Returns the file holding it."""
    meta = pickle.loads((release / ".metadata").read_bytes())
    meta.planted = Payload(marker)
    (release / ".metadata").write_bytes(pickle.dumps(meta))
    return release / ".metadata"


def plant_in_common_state(release: Path, marker: Path) -> Path:
    """The payload as an extra key of the common state, stored at the end of its
    ``.distcp`` file (``.metadata`` updated to point there). Returns that file."""
    meta = pickle.loads((release / ".metadata").read_bytes())
    index = next(i for i in meta.storage_data if i.fqn == COMMON_KEY)
    info = meta.storage_data[index]
    distcp = release / info.relative_path
    with open(distcp, "rb") as f:
        f.seek(info.offset)
        common = torch.load(io.BytesIO(f.read(info.length)), weights_only=False)
    common[0]["planted"] = Payload(marker)
    blob = io.BytesIO()
    torch.save(common, blob)
    info.offset, info.length = distcp.stat().st_size, len(blob.getvalue())
    with open(distcp, "ab") as f:
        f.write(blob.getvalue())
    (release / ".metadata").write_bytes(pickle.dumps(meta))
    return distcp


PLANTS = {"metadata": plant_in_metadata, "common_state": plant_in_common_state}


def hostile_copy(tmp_path: Path, case: str, place: str):
    """(checkpoint root, file with the payload, marker) for golden ``case``."""
    root = tmp_path / f"hostile-{case}"
    shutil.copytree(GOLDEN / case, root)
    marker = tmp_path / "MARKER"
    return root, PLANTS[place](root / "release", marker), marker


# --------------------------------------------------------------------------- #
# The plant is live: plain megatron / torch readers run it
# --------------------------------------------------------------------------- #
PLAIN_READS = """
import sys, warnings
warnings.filterwarnings("ignore")
from megatron.core.dist_checkpointing import load_common_state_dict
from torch.distributed.checkpoint import FileSystemReader
FileSystemReader(sys.argv[1]).read_metadata()  # filesystem.py:938, pickle.load
load_common_state_dict(sys.argv[2])  # serialization.py:228-237, default planner's torch.load
"""


def test_planted_payloads_run_in_megatrons_own_readers(tmp_path):
    """Not vacuous: the same plants execute through megatron-core's and torch's readers."""
    meta_root, _, _ = hostile_copy(tmp_path / "a", "dense", "metadata")
    common_root, _, _ = hostile_copy(tmp_path / "b", "dense", "common_state")
    result = subprocess.run([sys.executable, "-c", PLAIN_READS, meta_root / "release", common_root / "release"],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "a" / "MARKER").exists(), "the .metadata payload did not run in torch's reader"
    assert (tmp_path / "b" / "MARKER").exists(), "the common-state payload did not run in megatron's reader"


# --------------------------------------------------------------------------- #
# Every tool refuses
# --------------------------------------------------------------------------- #
def run_tool(tool: str, argv: list[str]):
    """A tool's ``main`` in this process: (exit status, stdout, stderr)."""
    import importlib

    main = importlib.import_module(f"ders_megatron.cli.{tool}").main
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = main(argv)
        except SystemExit as exit_:  # convert_hf exits through argparse
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


# name: (tool, the golden case made hostile, argv given {case: root} and the output dir)
TOOLS = {
    "upcycle": ("upcycle", "dense", lambda c, out: [
        "--load", c["dense"], "--save", out, "--num-experts", "4", "--moe-ders", "lowrank", "--moe-ders-rank", "2"]),
    "compress --load": ("compress", "vanilla", lambda c, out: [
        "--load", c["vanilla"], "--save", out, "--moe-ders-codecs", "dare:0.9", "--base", "mean"]),
    "compress --dense": ("compress", "dense", lambda c, out: [
        "--load", c["vanilla"], "--save", out, "--moe-ders-codecs", "dare:0.9", "--base", "dense", "--dense", c["dense"]]),
    "convert_hf export": ("convert_hf", "lowrank", lambda c, out: [
        "export", "--checkpoint", c["lowrank"], "--output", out, "--format", "ders", "--no-progress"]),
    "convert_hf adapter": ("convert_hf", "lowrank", lambda c, out: [
        "adapter", "--checkpoint", c["lowrank"], "--output", out, "--no-progress"]),
    "analyze similarity --load": ("analyze", "vanilla", lambda c, out: [
        "similarity", "--load", c["vanilla"], "--dense", c["dense"], "--out", f"{out}.png"]),
    "analyze similarity --dense": ("analyze", "dense", lambda c, out: [
        "similarity", "--load", c["vanilla"], "--dense", c["dense"], "--out", f"{out}.png"]),
}


def tool_argv(name: str, hostile_root: Path, out: Path) -> tuple[str, list[str]]:
    tool, case, argv = TOOLS[name]
    roots = {c: GOLDEN / c for c in ("dense", "vanilla", "lowrank")}
    roots[case] = hostile_root
    return tool, [str(a) for a in argv(roots, out)]


@pytest.mark.parametrize("place", sorted(PLANTS))
@pytest.mark.parametrize("name", sorted(TOOLS))
def test_tool_refuses_planted_payload(dist1, tmp_path, name, place):
    root, planted, marker = hostile_copy(tmp_path, TOOLS[name][1], place)
    out = tmp_path / "out"
    code, _, stderr = dist1.run(run_tool, *tool_argv(name, root, out))[0]
    assert not marker.exists(), f"{name}: the payload in {place} ran"
    assert code == 2, stderr[-2000:]
    assert f"checkpoint {planted}" in stderr and PAYLOAD_GLOBAL in stderr, stderr[-2000:]
    assert "--trust-checkpoint" in stderr and "Traceback" not in stderr
    assert not out.exists() and not Path(f"{out}.png").exists()


def test_trust_checkpoint_reads_plainly_and_says_so(dist1, tmp_path):
    """The opt-out is the plain reader: the payload runs, the tool succeeds, a warning says so."""
    root, _, marker = hostile_copy(tmp_path, "dense", "common_state")
    tool, argv = tool_argv("upcycle", root, tmp_path / "out")
    code, _, stderr = dist1.run(run_tool, tool, [*argv, "--trust-checkpoint"])[0]
    assert code == 0, stderr[-2000:]
    assert "WARNING: --trust-checkpoint" in stderr and "can run any code" in stderr
    assert marker.exists()


# --------------------------------------------------------------------------- #
# Training --load refuses
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("place", sorted(PLANTS))
def test_training_load_refuses_planted_payload(tmp_path, place):
    """examples/pretrain_gpt_ders.py as one process (tests/test_training.py::_entry_point):
    refused before megatron reads the checkpoint, before process groups or work."""
    root, planted, marker = hostile_copy(tmp_path, "lowrank", place)
    flags = [*TINY_MODEL, *device_flags(), "--mock-data", "--moe-ders", "lowrank", "--moe-ders-rank", "2",
             "--moe-ders-alpha", "4", "--train-iters", "6", "--load", root]
    result = subprocess.run([sys.executable, str(PRETRAIN), *map(str, flags)], capture_output=True, text=True,
                            timeout=120, cwd=ROOT, env=dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONPATH=str(ROOT)))
    assert not marker.exists(), f"training --load: the payload in {place} ran"
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"checkpoint {planted}" in result.stderr and PAYLOAD_GLOBAL in result.stderr, result.stderr[-2000:]
    assert "--trust-checkpoint" in result.stderr
    assert "initializing torch distributed" not in result.stdout


# --------------------------------------------------------------------------- #
# Untouched checkpoints read as before
# --------------------------------------------------------------------------- #
def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if type(a).__name__ == "Namespace":
        return _same(vars(a), vars(b))
    return a == b


@pytest.mark.parametrize("release", sorted(str(p.parent) for p in [*GOLDEN.glob("*/release/.metadata"),
                                                                    *REGRESSION.glob("*/release/.metadata")]))
def test_untouched_checkpoints_pass_and_read_as_megatron_reads_them(release):
    from megatron.core.dist_checkpointing import load_common_state_dict
    from torch.distributed.checkpoint import FileSystemReader

    from ders_megatron.io.safe_load import common_state, read_metadata, vet_checkpoint

    vet_checkpoint(release)
    assert _same(common_state(release), load_common_state_dict(release))  # our own files: plain reads are fine
    ours, plain = read_metadata(release), FileSystemReader(release).read_metadata()
    assert ours.state_dict_metadata == plain.state_dict_metadata and ours.storage_data == plain.storage_data
