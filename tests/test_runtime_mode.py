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
