"""The CPU runtime is explicit: without it a CPU-only machine gets the fix, not a crash."""

import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-mode hint only applies without CUDA")
def test_entry_point_without_cpu_mode_names_the_flag():
    code = "from ders_megatron.layers.runtime import select_runtime; select_runtime(cpu=False)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "pass --cpu" in result.stderr and "enable_cpu_runtime()" in result.stderr


def test_cpu_mode_is_a_function_and_idempotent():
    code = (
        "import torch\n"
        "from ders_megatron.layers.runtime import select_runtime, cpu_runtime_enabled, enable_cpu_runtime\n"
        "device = select_runtime(cpu=True)\n"
        "assert enable_cpu_runtime() == (not torch.cuda.is_available())\n"
        "assert cpu_runtime_enabled() == (not torch.cuda.is_available())\n"
        "x = torch.ones(2, device='cuda' if not torch.cuda.is_available() else 'cpu')\n"
        "print(device.type, x.device.type)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = "cuda cpu" if torch.cuda.is_available() else "cpu cpu"
    assert result.stdout.split()[-2:] == expected.split()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU runtime is off where CUDA is present")
def test_cpu_runtime_says_no_cuda_under_nvml_based_check():
    """accelerate (a peft dependency) sets PYTORCH_NVML_BASED_CUDA_CHECK=1 in os.environ on import;
    torch then answers is_available() from device_count(), which the runtime patches to 1: the
    test ranks spawned afterwards picked nccl and failed ("ProcessGroupNCCL is only supported with
    GPUs")."""
    import os

    code = (
        "import torch\n"
        "from ders_megatron.layers.runtime import distributed_backend, enable_cpu_runtime\n"
        "enable_cpu_runtime()\n"
        "print(torch.cuda.is_available(), distributed_backend())\n"
    )
    env = dict(os.environ, PYTORCH_NVML_BASED_CUDA_CHECK="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "gloo"]


def test_collective_tensors_live_where_the_backend_reduces(monkeypatch):
    """NCCL reduces CUDA tensors only: every GPU launch crashed at model build when the
    parameter census all-reduced a CPU tensor (issue 16). The census builds its tensor on
    ``collective_device()``; here the backend is faked, no GPU needed."""
    import torch.distributed as dist

    from ders_megatron.layers import runtime

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert runtime.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert runtime.collective_device() == torch.device("cpu")


def census_reduces_on_the_collective_device():
    import torch.distributed as dist

    from ders_megatron.training import utils

    reduced = []
    real = dist.all_reduce
    dist.all_reduce = lambda tensor, *a, **k: (reduced.append(tensor.device), real(tensor, *a, **k))[1]
    try:
        census = utils.parameter_census([torch.nn.Linear(3, 4)])
    finally:
        dist.all_reduce = real
    return census["total"], reduced, utils.collective_device()


def test_parameter_census_reduces_on_the_collective_device(dist2):
    for total, reduced, device in dist2.run(census_reduces_on_the_collective_device):
        assert reduced == [device] and total == 2 * 16  # each rank's Linear(3, 4), summed over 2 ranks


def loss_check_results():
    from ders_megatron.training.utils import check_loss

    outcomes = {}
    for name, value, check in (("nan", float("nan"), True), ("inf", float("inf"), True), ("finite", 2.5, True),
                               ("nan-unchecked", float("nan"), False)):
        try:
            check_loss(torch.tensor(value), check_nan=check, check_spiky=False)
            outcomes[name] = "ok"
        except RuntimeError as err:
            outcomes[name] = str(err)
    return outcomes


def test_training_loss_gets_megatrons_nan_checks(dist1):
    """The entry script's loss runs Megatron-LM pretrain_gpt.py's checks through megatron-core's
    rerun state machine (issue 16: they were skipped): NaN and Inf stop the run."""
    outcomes = dist1.run(loss_check_results)[0]
    assert "found NaN in local forward loss" in outcomes["nan"]
    assert "found Inf in local forward loss" in outcomes["inf"]
    assert outcomes["finite"] == "ok" and outcomes["nan-unchecked"] == "ok"


TOOL_ON_A_CUDA_MACHINE = """
import torch
torch.cuda.is_available = lambda: True  # a CUDA machine, as far as the tool can tell
from ders_megatron.convert.compress.calibration import evaluate
from ders_megatron.io.session import single_rank_megatron
from ders_megatron.pipeline.launch import device_flags
from ders_megatron.testing.models import build_gpt, tiny_batch, tiny_config
with single_rank_megatron():
    model = build_gpt(tiny_config())
    loss = evaluate(model, [tiny_batch()])["loss"]  # the compress/analyze tools' forward
    print(model.rotary_pos_emb.inv_freq.device.type, next(model.parameters()).device.type,
          loss == loss, device_flags())
"""


def test_tools_compute_on_cpu_on_a_cuda_machine():
    """The single-process tools build their models on the CPU; on a CUDA machine the CPU
    runtime was a no-op, so megatron's CUDA path moved RoPE's inv_freq (and its masks and
    router statistics) to the GPU under a CPU model (issue 16). Here torch.cuda.is_available
    answers True on this CPU-only torch, which is the trigger: before the fix the tool
    reached torch.cuda and failed; now it computes on the CPU, and a launcher still sees
    the machine's CUDA (no --cpu for its training children)."""
    result = subprocess.run([sys.executable, "-c", TOOL_ON_A_CUDA_MACHINE], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-4:] == ["cpu", "cpu", "True", "[]"]
