"""The launch scripts in examples/: what they hand to torchrun, checked without a GPU
by a stand-in python that prints its arguments."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
FAKE_PYTHON = """#!/usr/bin/env bash
# python -c ...: "import transformer_engine" fails here unless FAKE_TE=1
if [ "$1" = "-c" ]; then [ "${FAKE_TE:-0}" = 1 ]; exit $?; fi
echo "CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS-unset}"
printf '%s\\n' "$@"
"""


@pytest.fixture
def fake_python(tmp_path):
    path = tmp_path / "python"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return path


def launch(script, fake_python, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "RDZV_ID", "CPU",
                                                               "CUDA_DEVICE_MAX_CONNECTIONS", "TRANSFORMER_IMPL")}
    return subprocess.run(["bash", str(EXAMPLES / script)], capture_output=True, text=True, timeout=60,
                          env={**clean, "PYTHON": str(fake_python), "NPROC": "1", **env})


def test_multi_node_rendezvous_id_comes_from_the_job(fake_python):
    """Every node must agree on the id: the job's, never the date (nodes started on
    either side of midnight never met)."""
    result = launch("train_multi_node.sh", fake_python, MASTER_ADDR="node0", NNODES="2", SLURM_JOB_ID="4242")
    assert result.returncode == 0, result.stderr
    args = result.stdout.splitlines()
    assert args[args.index("--rdzv-id") + 1] == "ders-4242"
    result = launch("train_multi_node.sh", fake_python, MASTER_ADDR="node0", NNODES="2", RDZV_ID="run7")
    assert "run7" in result.stdout.splitlines()


def test_multi_node_without_a_job_id_asks_for_one(fake_python):
    result = launch("train_multi_node.sh", fake_python, MASTER_ADDR="node0", NNODES="2")
    assert result.returncode != 0 and "set RDZV_ID" in result.stderr


def test_gpu_launch_sets_what_megatron_asserts_and_picks_the_installed_impl(fake_python):
    result = launch("train_single_node.sh", fake_python)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in lines  # megatron/training/arguments.py:1413-1439 for TP > 1
    assert lines[lines.index("--transformer-impl") + 1] == "local"  # TE not installed
    te = launch("train_single_node.sh", fake_python, FAKE_TE="1").stdout.splitlines()
    assert te[te.index("--transformer-impl") + 1] == "transformer_engine"
    fsdp = launch("train_single_node.sh", fake_python, CUDA_DEVICE_MAX_CONNECTIONS="").stdout
    assert "CUDA_DEVICE_MAX_CONNECTIONS=unset" in fsdp


def test_cpu_launch_leaves_cuda_settings_alone(fake_python):
    result = launch("train_single_node.sh", fake_python, CPU="1")
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and "--cpu" in lines and "--transformer-impl" not in lines
    assert "CUDA_DEVICE_MAX_CONNECTIONS=unset" in lines
