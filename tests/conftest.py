"""Shared fixtures: the CPU runtime, and a pool of 2 gloo ranks reused across tests."""

import os
import sys

import pytest

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ders_megatron.testing.distributed import DistributedPool  # noqa: E402


@pytest.fixture(scope="session")
def dist2():
    """Two persistent gloo ranks; a test body runs on both via ``dist2.run(fn, ...)``."""
    pool = DistributedPool(world_size=2)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def dist1():
    """One gloo rank in a subprocess (world size 1, same code path as the 2-rank runs)."""
    pool = DistributedPool(world_size=1)
    yield pool
    pool.close()
