"""The GPU check kit (issue 16): what CPU runs cannot show. Marked ``gpu``; every test is
skipped, with the reason, where CUDA is absent. ``scripts/gpu_check.sh`` runs it and the
layer benchmark on CUDA in one timed go and prints one table.

* drop-in and fused DeRS layers vs the synthesized-weight reference (megatron's
  SequentialMLP with W_e = W_base + Δ_e) on CUDA, fp32 and bf16, every delta kind:
  outputs, input gradients and every expert weight gradient;
* Transformer Engine base linears vs the local ones (same weights);
* one Megatron training run of a tiny DeRS GPT on 1 GPU (TE where installed, bf16):
  the loss falls and no NaN/spike check fires;
* the single-process tools compute on the CPU beside a real GPU (model, RoPE's
  ``inv_freq`` and megatron's own tensors on one device).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU kit needs CUDA (none on this machine)"),
]
REPO = Path(__file__).resolve().parents[2]
# fp32: same products in another order on GPU (TF32 off below): ~1e-6 relative. bf16: 8
# mantissa bits, errors ~4e-3 relative per GEMM, summed over a few: 3e-2 keeps margin and
# still fails on a wrong delta (O(1) relative).
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
KINDS = ("lowrank", "sparse", "dense")


@pytest.fixture(scope="module", autouse=True)
def one_gpu_session():
    from ders_megatron.io.session import single_rank_megatron

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with single_rank_megatron():
        yield


def _ders(kind, impl="dropin"):
    from ders_megatron.core.config import DeRSConfig, DenseDeltaConfig, LowRankDeltaConfig, SparseDeltaConfig

    delta = {"lowrank": LowRankDeltaConfig(rank=4), "sparse": SparseDeltaConfig(drop_rate=0.9),
             "dense": DenseDeltaConfig()}[kind]
    return DeRSConfig(delta=delta, impl=impl)


def _run(layer, x, upstream):
    x = x.clone().requires_grad_(True)
    out, _ = layer(x)
    (out.float() * upstream).sum().backward()
    return out.float(), x.grad.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["dropin", "fused"])
@pytest.mark.parametrize("kind", KINDS)
def test_ders_layer_equals_reference_on_cuda(kind, impl, dtype):
    from ders_megatron.testing.models import tiny_config
    from ders_megatron.testing.reference import build_moe_layers, expected_grads, load_synthesized, randomize_deltas

    config = tiny_config(params_dtype=dtype, bf16=dtype == torch.bfloat16, use_cpu_initialization=True)
    ders_layer, vanilla = build_moe_layers(config, _ders(kind, impl))
    randomize_deltas(ders_layer)
    load_synthesized(ders_layer, vanilla)
    ders_layer, vanilla = ders_layer.cuda(), vanilla.cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(64, 2, config.hidden_size, device="cuda", generator=gen).to(dtype)
    upstream = torch.randn(x.shape, device="cuda", generator=gen)
    got, want = _run(ders_layer, x, upstream), _run(vanilla, x, upstream)
    for what, a, b in zip(("output", "input grad"), got, want):
        torch.testing.assert_close(a, b, **TOLERANCE[dtype], msg=lambda m: f"{kind} {impl} {what}: {m}")
    for name, grad in expected_grads(ders_layer, vanilla).items():
        param = dict(ders_layer.named_parameters())[name]
        torch.testing.assert_close(param.grad.float(), grad.float(), **TOLERANCE[dtype],
                                   msg=lambda m: f"{kind} {impl} grad {name}: {m}")


@pytest.mark.parametrize("impl", ["dropin", "fused"])
def test_transformer_engine_base_equals_local(impl):
    pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")
    from ders_megatron.layers.specs import ders_moe_spec
    from ders_megatron.testing.models import tiny_config

    config = tiny_config(use_cpu_initialization=False)
    layers = [ders_moe_spec(_ders("lowrank", impl), use_te=te)(config=config).cuda() for te in (False, True)]
    for layer in layers:
        layer.set_layer_number(1)
    layers[1].load_state_dict(layers[0].state_dict(), strict=False)
    x = torch.randn(64, 2, config.hidden_size, device="cuda")
    upstream = torch.randn(x.shape, device="cuda")
    local, te = (_run(layer, x, upstream) for layer in layers)
    for a, b in zip(local, te):
        torch.testing.assert_close(a, b, **TOLERANCE[torch.float32])


def test_tiny_ders_gpt_trains_on_one_gpu(tmp_path):
    from ders_megatron.pipeline.launch import TINY_MODEL
    from ders_megatron.training.utils import read_loss_log

    try:
        import transformer_engine.pytorch  # noqa: F401

        impl = "transformer_engine"
    except ImportError:
        impl = "local"
    log = tmp_path / "loss.jsonl"
    flags = [*TINY_MODEL, "--mock-data", "--bf16", "--transformer-impl", impl, "--moe-ders", "lowrank",
             "--train-iters", "20", "--ders-loss-log", str(log)]
    env = {**os.environ, "CUDA_DEVICE_MAX_CONNECTIONS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                             str(REPO / "examples" / "pretrain_gpt_ders.py"), *flags],
                            capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    losses = read_loss_log(log)
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < first and all(v == v for v in losses.values()), losses
    print(f"\n[gpu-kit] tiny DeRS GPT ({impl}, bf16): loss {first:.3f} -> {last:.3f} in {len(losses)} iterations")


def test_tools_compute_on_cpu_beside_cuda():
    """The single-process tools (compress, analyze, import, upcycle) force the CPU runtime
    where CUDA is present: a CPU model's forward no longer meets RoPE's inv_freq moved to
    the GPU (issue 16). tests/test_runtime_mode.py simulates this on CPU; here CUDA is real.
    In a subprocess: the forced runtime patches torch.cuda for the rest of its process."""
    from tests.test_runtime_mode import TOOL_ON_A_CUDA_MACHINE

    script = "\n".join(line for line in TOOL_ON_A_CUDA_MACHINE.splitlines() if "lambda: True" not in line)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-4:] == ["cpu", "cpu", "True", "[]"]
