"""Damaged input never becomes a silently wrong output (issue 19, items 2-5).

Each case takes a tiny golden checkpoint (``tests/data/golden``) or a few-line
text file, damages a copy (cut a file, plant a NaN, fill the disk, ...) and runs
the tool as a user would (its ``main`` in a 1-rank worker, as
``tests/test_safe_checkpoint.py``): one line ``PROG: error: ...`` naming the file
and the problem, exit status 2, no traceback (unless ``--debug``), and no output,
not even a temporary one; an existing output is left as it was.
"""

import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from test_safe_checkpoint import PAYLOAD_GLOBAL, Payload, run_tool

from ders_megatron.pipeline.launch import TINY_MODEL, device_flags

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "data" / "golden"
PRETRAIN = ROOT / "examples" / "pretrain_gpt_ders.py"

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def one_error_line(stderr: str, prog: str) -> str:
    """The error line; asserts it is the only one and that no traceback was printed."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def nothing_written(out: Path) -> bool:
    """No output and no temporary of it in its parent."""
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# --------------------------------------------------------------------------- #
# Damaged checkpoints: copies of the goldens
# --------------------------------------------------------------------------- #
def truncated(tmp_path: Path, case: str) -> tuple[Path, Path]:
    root = tmp_path / f"cut-{case}"
    shutil.copytree(GOLDEN / case, root)
    distcp = root / "release" / "__0_0.distcp"
    distcp.write_bytes(distcp.read_bytes()[: distcp.stat().st_size // 2])
    return root, distcp


def without_metadata(tmp_path: Path, case: str) -> Path:
    root = tmp_path / f"nometa-{case}"
    shutil.copytree(GOLDEN / case, root)
    (root / "release" / ".metadata").unlink()
    return root


def with_value(tmp_path: Path, case: str, key: str, value: float) -> tuple[Path, Path]:
    """A copy whose tensor ``key`` has its first element replaced by ``value`` (float32
    bytes patched in the .distcp: torch's reader checks no checksum)."""
    from ders_megatron.io.reader import CheckpointReader

    root = tmp_path / f"bad-{case}"
    shutil.copytree(GOLDEN / case, root)
    reader = CheckpointReader(root)
    tensor = reader.read([key])[key] if key in reader.metadata else None
    assert tensor is not None and tensor.dtype == torch.float32, key
    raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    distcp = root / "release" / "__0_0.distcp"
    data = bytearray(distcp.read_bytes())
    at = data.find(raw[:64])
    assert at >= 0 and data.find(raw[:64], at + 1) < 0, "the tensor's bytes are not unique in the file"
    data[at:at + 4] = struct.pack("<f", value)
    distcp.write_bytes(bytes(data))
    return root, distcp


UPCYCLE = ["--num-experts", "4", "--moe-ders", "lowrank", "--moe-ders-rank", "2"]


@pytest.mark.parametrize("tool", ["upcycle", "convert_hf export"])
def test_truncated_distcp_is_named(dist1, tmp_path, tool):
    case = "dense" if tool == "upcycle" else "lowrank"
    root, distcp = truncated(tmp_path, case)
    out = tmp_path / "out"
    argv = (["--load", root, "--save", out, *UPCYCLE] if tool == "upcycle" else
            ["export", "--checkpoint", root, "--output", out, "--format", "ders", "--no-progress"])
    code, _, stderr = dist1.run(run_tool, tool.split()[0], [str(a) for a in argv])[0]
    assert code == 2
    line = one_error_line(stderr, tool)
    assert f"{distcp} is truncated" in line and "re-copy" in line
    assert nothing_written(out)


def test_missing_metadata_is_named(dist1, tmp_path):
    root = without_metadata(tmp_path, "dense")
    out = tmp_path / "out"
    code, _, stderr = dist1.run(run_tool, "upcycle", [str(a) for a in ["--load", root, "--save", out, *UPCYCLE]])[0]
    assert code == 2
    assert f"{root / 'release'} has no .metadata" in one_error_line(stderr, "upcycle")
    assert nothing_written(out)


def test_debug_prints_the_traceback(dist1, tmp_path):
    root, distcp = truncated(tmp_path, "dense")
    argv = [str(a) for a in ["--load", root, "--save", tmp_path / "out", *UPCYCLE, "--debug"]]
    code, _, stderr = dist1.run(run_tool, "upcycle", argv)[0]
    assert code == 2 and "Traceback" in stderr and f"upcycle: error: checkpoint file {distcp}" in stderr


# --------------------------------------------------------------------------- #
# NaN / Inf in what the tools write
# --------------------------------------------------------------------------- #
NAN_CASES = {  # tool: (golden case, tensor to spoil, argv given (root, out))
    "upcycle": ("dense", "decoder.layers.mlp.linear_fc1.weight",
                lambda root, out: ["--load", root, "--save", out, *UPCYCLE]),
    "compress": ("vanilla", "decoder.layers.mlp.experts.experts.linear_fc1.weight",
                 lambda root, out: ["--load", root, "--save", out, "--moe-ders-codecs", "dare:0.9",
                                                 "--base", "mean", "--max-delta-norm", "inf"]),  # random experts
    "convert_hf export ders": ("lowrank", "decoder.layers.mlp.experts.linear_fc2.weight",
                               lambda root, out: ["export", "--checkpoint", root, "--output", out, "--format",
                                                  "ders", "--no-progress"]),
    "convert_hf export mixtral": ("lowrank", "decoder.layers.mlp.experts.linear_fc2.weight",
                                  lambda root, out: ["export", "--checkpoint", root, "--output", out, "--format",
                                                     "mixtral", "--no-progress"]),
}


def _spoilt_run(tmp_path, name, value, extra=()):
    case, key, argv = NAN_CASES[name]
    root, distcp = with_value(tmp_path, case, key, value)
    out = tmp_path / "out"
    return root, distcp, out, [str(a) for a in [*argv(root, out), *extra]]


@pytest.mark.parametrize("name", sorted(NAN_CASES))
def test_nan_weights_are_named_and_nothing_written(dist1, tmp_path, name):
    _, distcp, out, argv = _spoilt_run(tmp_path, name, float("nan"))
    tool = name.split()[0]
    code, _, stderr = dist1.run(run_tool, tool, argv)[0]
    assert code == 2
    line = one_error_line(stderr, " ".join(name.split()[:2]))
    assert "1 NaN and 0 Inf" in line and str(distcp) in line and NAN_CASES[name][1] in line
    assert nothing_written(out)


def test_export_names_a_value_its_dtype_cannot_hold(dist1, tmp_path):
    """fp16 tops out at 65504: a weight of 1e6 becomes Inf when written as float16."""
    _, distcp, out, argv = _spoilt_run(tmp_path, "convert_hf export ders", 1e6, ["--dtype", "float16"])
    code, _, stderr = dist1.run(run_tool, "convert_hf", argv)[0]
    assert code == 2
    line = one_error_line(stderr, "convert_hf export")
    assert "0 NaN and 1 Inf" in line and "torch.float32 written as torch.float16" in line and str(distcp) in line
    assert nothing_written(out)
    code, _, stderr = dist1.run(run_tool, "convert_hf", argv[:-2])[0]  # in float32 it is a legal value
    assert code == 0, stderr[-2000:]


# --------------------------------------------------------------------------- #
# A full disk
# --------------------------------------------------------------------------- #
class FullDisk:
    """A file open for writing whose disk fills after ``budget`` bytes: ENOSPC, as the OS
    says it; everything else is the real file's."""

    def __init__(self, inner, budget: int):
        self.inner, self.budget = inner, budget

    def write(self, data) -> int:
        size = len(memoryview(data).cast("B"))
        if size > self.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= size
        return self.inner.write(data)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.inner.close()
        return False


def upcycle_on_full_disk(argv):
    """``upcycle`` with torch.distributed.checkpoint's files on a disk that fills after 4 KiB."""
    import contextlib

    from torch.distributed.checkpoint.filesystem import FileSystem

    plain = FileSystem.create_stream

    @contextlib.contextmanager
    def filling(self, path, mode):
        with plain(self, path, mode) as stream:
            yield FullDisk(stream, 4096) if "w" in mode else stream

    FileSystem.create_stream = filling
    try:
        return run_tool("upcycle", argv)
    finally:
        FileSystem.create_stream = plain


def test_full_disk_during_upcycle(tmp_path):
    """In a worker of its own: torch's zip writer, failed mid-file, is left in a state whose
    destruction later crashed the shared worker with SIGSEGV (seen when a later test's
    import triggered a garbage collection; not yet understood)."""
    from ders_megatron.testing.distributed import DistributedPool

    out = tmp_path / "out"
    argv = [str(a) for a in ["--load", GOLDEN / "dense", "--save", out, *UPCYCLE]]
    pool = DistributedPool(world_size=1)
    try:
        code, _, stderr = pool.run(upcycle_on_full_disk, argv)[0]
    finally:
        pool.close()
    assert code == 2
    assert f"disk full writing {out}" in one_error_line(stderr, "upcycle")
    assert nothing_written(out)


def export_on_full_disk(argv):
    """``convert_hf export`` whose shard writer finds the disk full: the OS's ENOSPC from the
    spill file every tensor is written to as it is made (io/safetensors_writer.py)."""
    import errno

    from ders_megatron.io.safetensors_writer import SafetensorsFileWriter

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    plain, SafetensorsFileWriter.add = SafetensorsFileWriter.add, full
    try:
        return run_tool("convert_hf", argv)
    finally:
        SafetensorsFileWriter.add = plain


def test_full_disk_during_export(dist1, tmp_path):
    out = tmp_path / "out"
    code, _, stderr = dist1.run(export_on_full_disk, ["export", "--checkpoint", str(GOLDEN / "lowrank"), "--output",
                                                      str(out), "--format", "ders", "--no-progress"])[0]
    assert code == 2
    assert f"disk full writing {out}" in one_error_line(stderr, "convert_hf export")
    assert nothing_written(out)


# --------------------------------------------------------------------------- #
# preprocess_data: all or nothing
# --------------------------------------------------------------------------- #
def preprocess(*argv: str):
    """tools/preprocess_data.py's main in this process: (exit status, stderr)."""
    import contextlib
    import io

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import preprocess_data
    finally:
        sys.path.remove(str(ROOT / "tools"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = preprocess_data.main([*map(str, argv), "--quiet"])
    return code, err.getvalue()


def dataset(tmp_path: Path) -> tuple[Path, dict]:
    """A prefix preprocessed from a clean text, and its three files' bytes."""
    text = tmp_path / "good.txt"
    text.write_text("In the beginning.\n\nAnd the earth was without form.\n")
    prefix = tmp_path / "data" / "corpus"
    assert preprocess("--input", text, "--output-prefix", prefix)[0] == 0
    return prefix, {s: Path(f"{prefix}{s}").read_bytes() for s in (".bin", ".idx", ".json")}


def unchanged(prefix: Path, before: dict) -> bool:
    files = sorted(p.name for p in prefix.parent.iterdir())
    return files == sorted(prefix.name + s for s in before) and all(
        Path(f"{prefix}{s}").read_bytes() == data for s, data in before.items())


def test_preprocess_undecodable_input_is_named_and_the_old_dataset_kept(tmp_path):
    """The second input fails after the first was tokenized: the old prefix stays whole."""
    prefix, before = dataset(tmp_path)
    other = tmp_path / "more.txt"
    other.write_text("Other text, long enough to change every file of the prefix.\n\n" * 50)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("first line\nsecond line: caf\u00e9\n".encode("latin-1"))
    code, stderr = preprocess("--input", other, bad, "--output-prefix", prefix)
    assert code == 2
    line = one_error_line(stderr, "preprocess_data")
    assert f"{bad} is not UTF-8 text: byte 27 (line 2)" in line
    assert unchanged(prefix, before)


def test_preprocess_undecodable_jsonl_names_the_line(tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    code, stderr = preprocess("--input", bad, "--output-prefix", tmp_path / "out" / "rows")
    assert code == 2
    assert f"{bad} is not UTF-8 text: byte 30 (line 2)" in one_error_line(stderr, "preprocess_data")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_preprocess_empty_input_is_an_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    code, stderr = preprocess("--input", empty, "--output-prefix", tmp_path / "out" / "empty")
    assert code == 2
    assert f"--input {empty} holds no text" in one_error_line(stderr, "preprocess_data")
    assert not list((tmp_path / "out").glob("empty*"))


def test_preprocess_full_disk_keeps_the_old_dataset(tmp_path, monkeypatch, capsys):
    """megatron's IndexedDatasetBuilder writes the .bin through ``maybe_msc.open`` (plain
    ``open`` for local paths): its disk fills."""
    from megatron.core.datasets import indexed_dataset

    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import preprocess_data

    prefix, before = dataset(tmp_path)
    text = tmp_path / "long.txt"
    text.write_text("Many words to tokenize, more than the disk holds.\n\n" * 200)

    def filling_open(path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        return FullDisk(handle, 1000) if "w" in mode else handle

    class FillingStorage:  # megatron's storage helper, its disk filling
        open = staticmethod(filling_open)

        def __getattr__(self, name):
            return getattr(plain_storage, name)

    plain_storage = indexed_dataset.maybe_msc
    monkeypatch.setattr(indexed_dataset, "maybe_msc", FillingStorage())
    assert preprocess_data.main(["--input", str(text), "--output-prefix", str(prefix), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err, "preprocess_data")
    assert line.startswith(f"preprocess_data: error: disk full writing {prefix.parent}/{{corpus.json,corpus.bin,corpus.idx}}")
    assert unchanged(prefix, before)


def test_preprocess_replaces_all_three_files(tmp_path):
    prefix, before = dataset(tmp_path)
    other = tmp_path / "other.txt"
    other.write_text("Something else entirely.\n")
    assert preprocess("--input", other, "--output-prefix", prefix)[0] == 0
    after = {s: Path(f"{prefix}{s}").read_bytes() for s in before}
    assert all(after[s] != before[s] for s in before)
    assert sorted(p.name for p in prefix.parent.iterdir()) == sorted(prefix.name + s for s in before)


# --------------------------------------------------------------------------- #
# Temporaries of killed runs
# --------------------------------------------------------------------------- #
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_killed_runs_are_removed(tmp_path, capsys):
    from ders_megatron.io.atomic import atomic_output_dir, atomic_output_files

    host = socket.gethostname()
    killed = tmp_path / f".model.tmp-{host}-{dead_pid()}-abcd1234"
    killed_files = tmp_path / f".corpus.json.tmp-{host}-{dead_pid()}-efgh5678"
    alive = tmp_path / f".other.tmp-{host}-{os.getppid()}-ijkl9012"  # a run still writing
    elsewhere = tmp_path / f".model.tmp-another-host-{dead_pid()}-mnop3456"
    for path in (killed, killed_files, alive, elsewhere):
        (path / "release").mkdir(parents=True)
    with atomic_output_dir(tmp_path / "model") as tmp:
        (tmp / "done").write_text("x")
    assert not killed.exists() and not killed_files.exists()
    assert alive.exists() and elsewhere.exists()
    err = capsys.readouterr().err
    assert f"removed {killed}" in err and f"rm -rf '{elsewhere}'" in err and str(alive) not in err
    with atomic_output_files([tmp_path / "a.json", tmp_path / "a.bin"]) as (j, b):
        j.write_text("{}")
        b.write_bytes(b"\0")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["a.bin", "a.json", "model"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted([alive.name, elsewhere.name])


# --------------------------------------------------------------------------- #
# Truncated safetensors (HF import)
# --------------------------------------------------------------------------- #
def test_truncated_safetensors_is_named(dist1, tmp_path):
    from ders_megatron.testing.hf import save_tiny_hf

    source = tmp_path / "hf"
    save_tiny_hf("llama", source)
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    code, _, stderr = dist1.run(run_tool, "convert_hf", ["import", "--hf-dir", str(source), "--output", str(out)])[0]
    assert code == 2
    line = one_error_line(stderr, "convert_hf import")
    assert f"{weights} is truncated or damaged" in line and "re-download" in line
    assert nothing_written(out)


# --------------------------------------------------------------------------- #
# Exports carry no custom code of the source
# --------------------------------------------------------------------------- #
def test_export_drops_the_sources_auto_map(dist1, tmp_path):
    from ders_megatron.testing.hf import tiny_tokenizer

    tokenizer = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tokenizer)
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    (tokenizer / "generation_config.json").write_text(json.dumps({"custom_pipelines": {"x": {"impl": "evil.P"}}}))
    out = tmp_path / "out"
    code, _, stderr = dist1.run(run_tool, "convert_hf", ["export", "--checkpoint", str(GOLDEN / "lowrank"), "--output",
                                                         str(out), "--format", "ders", "--tokenizer", str(tokenizer),
                                                         "--no-progress"])[0]
    assert code == 0, stderr[-2000:]
    exported = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in exported and exported["eos_token"] == config["eos_token"]
    assert "custom_pipelines" not in json.loads((out / "generation_config.json").read_text())
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    modules = {ref.split(".")[0] for ref in auto_map.values()}
    assert modules == {"configuration_ders_moe", "modeling_ders_moe"}  # our own, shipped in the folder
    assert all((out / f"{m}.py").is_file() for m in modules)
    assert not [p for p in out.iterdir() if p.suffix == ".py" and p.stem not in modules]


# --------------------------------------------------------------------------- #
# DeepSpeed and legacy megatron checkpoints: weights_only
# --------------------------------------------------------------------------- #
def deepspeed_dir(tmp_path: Path, extra: dict) -> Path:
    """A DeepSpeed checkpoint's main file as DeepSpeed 0.19 writes one (module, config dict,
    shapes, counters), plus ``extra``; an expert file."""
    from collections import OrderedDict

    folder = tmp_path / "ds" / "t1"
    folder.mkdir(parents=True)
    (tmp_path / "ds" / "latest").write_text("t1")
    module = OrderedDict({"blocks.0.moe.ders_base.linear_fc1.weight": torch.ones(4, 2)})
    main = {"module": module, "buffer_names": [], "optimizer": None, "param_shapes": [OrderedDict(w=torch.Size([4, 2]))],
            "ds_config": {"train_batch_size": 2, "zero_optimization": {"stage": 1}}, "ds_version": "0.19.8",
            "global_steps": 1, "dp_world_size": 1, "mp_world_size": 1, **extra}
    torch.save(main, folder / "mp_rank_00_model_states.pt")
    expert = {"blocks.0.moe.deepspeed_moe.experts.deepspeed_experts.0.deltas.fc1.values": torch.zeros(1, 3)}
    torch.save(expert, folder / "layer_0_expert_0_mp_rank_00_model_states.pt")
    return tmp_path / "ds"


def test_deepspeed_checkpoint_is_read_as_data(tmp_path):
    from ders_megatron.convert.deepspeed import read_deepspeed_checkpoint
    from ders_megatron.io.safe_load import UnsafeCheckpointError, trust_checkpoints

    clean = read_deepspeed_checkpoint(str(deepspeed_dir(tmp_path / "clean", {})))
    assert sorted(clean) == ["blocks.0.moe.deepspeed_moe.experts.deepspeed_experts.0.deltas.fc1.values",
                             "blocks.0.moe.ders_base.linear_fc1.weight"]
    marker = tmp_path / "MARKER"
    hostile = deepspeed_dir(tmp_path / "hostile", {"client": Payload(marker)})
    with pytest.raises(UnsafeCheckpointError, match=f"mp_rank_00_model_states.pt holds {PAYLOAD_GLOBAL}"):
        read_deepspeed_checkpoint(str(hostile))
    assert not marker.exists()
    with warnings.catch_warnings(), trust_checkpoints():
        read_deepspeed_checkpoint(str(hostile))  # the opt-out is DeepSpeed's own full unpickle
    assert marker.exists()


def legacy_checkpoint(root: Path, marker: Path | None) -> Path:
    """megatron's --ckpt-format torch layout: iter_*/mp_rank_00/model_optim_rng.pt."""
    from argparse import Namespace

    folder = root / "iter_0000001" / "mp_rank_00"
    folder.mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("1")
    state = {"args": Namespace(num_layers=2), "iteration": 1, "checkpoint_version": 3.0,
             "model": {"embedding.word_embeddings.weight": torch.zeros(4, 2)}}
    if marker is not None:
        state["planted"] = Payload(marker)
    torch.save(state, folder / "model_optim_rng.pt")
    return folder / "model_optim_rng.pt"


def test_legacy_checkpoint_scan(tmp_path):
    from ders_megatron.io.errors import CheckpointError
    from ders_megatron.io.safe_load import UnsafeCheckpointError, vet_legacy_checkpoint

    legacy_checkpoint(tmp_path / "clean", None)
    vet_legacy_checkpoint(tmp_path / "clean" / "iter_0000001")
    planted = legacy_checkpoint(tmp_path / "hostile", tmp_path / "MARKER")
    with pytest.raises(UnsafeCheckpointError, match=f"{planted} holds {PAYLOAD_GLOBAL}"):
        vet_legacy_checkpoint(tmp_path / "hostile" / "iter_0000001")
    planted.write_bytes(planted.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="is truncated or damaged"):
        vet_legacy_checkpoint(tmp_path / "hostile" / "iter_0000001")
    assert not (tmp_path / "MARKER").exists()


def test_training_legacy_load_refuses_planted_payload(tmp_path):
    """megatron 0.19.2 itself refuses this file (torch's default weights_only) but exits 0
    (checkpointing.py:1740-1743); training refuses it by name, exit 2, before any work."""
    marker = tmp_path / "MARKER"
    planted = legacy_checkpoint(tmp_path / "legacy", marker)
    flags = [*TINY_MODEL, *device_flags(), "--mock-data", "--train-iters", "6", "--ckpt-format", "torch",
             "--load", tmp_path / "legacy"]
    result = subprocess.run([sys.executable, str(PRETRAIN), *map(str, flags)], capture_output=True, text=True,
                            timeout=120, cwd=ROOT, env=dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONPATH=str(ROOT)))
    assert not marker.exists()
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"checkpoint {planted} holds {PAYLOAD_GLOBAL}" in result.stderr
    assert "initializing torch distributed" not in result.stdout


# --------------------------------------------------------------------------- #
# --trust-checkpoint says so once, on rank 0
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("rank", ["0", "1"])
def test_trust_warning_once_on_rank_0(monkeypatch, capsys, rank):
    from ders_megatron.io.safe_load import trust_checkpoints

    monkeypatch.setenv("RANK", rank)
    # torchrun's RANK is what decides here: a process group left by an earlier test would say 0
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with trust_checkpoints(), trust_checkpoints():
        pass
    warnings_printed = capsys.readouterr().err.count("WARNING: --trust-checkpoint")
    assert warnings_printed == (1 if rank == "0" else 0)
