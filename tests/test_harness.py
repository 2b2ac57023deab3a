"""The rank pool every multi-rank test runs on: failures, timeouts, worker recycling."""

import os
import threading
import time

import pytest

from ders_megatron.testing import distributed
from ders_megatron.testing.distributed import DistributedPool, RankFailure


def pid_and_rank():
    import torch.distributed as dist

    return os.getpid(), dist.get_rank()


def fail_on_rank_1():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("rank 1 says no")
    return "ok"


def sleep_forever():
    time.sleep(3600)


def start_idle_threads(count):
    stop = threading.Event()
    for _ in range(count):
        threading.Thread(target=stop.wait, daemon=True).start()
    return threading.active_count()


@pytest.fixture
def pool():
    pool = DistributedPool(world_size=2, timeout_s=60)
    yield pool
    pool.close(kill=True)


def test_failure_names_the_rank_and_the_pool_restarts(pool):
    first = pool.run(pid_and_rank)
    assert [rank for _, rank in first] == [0, 1]
    with pytest.raises(RankFailure, match=r"failed on rank\(s\) \[1\]") as err:
        pool.run(fail_on_rank_1)
    assert "rank 1 says no" in str(err.value)
    again = pool.run(pid_and_rank)  # fresh workers: a failed rank may be stuck in a collective
    assert {pid for pid, _ in again}.isdisjoint(pid for pid, _ in first)


def test_timeout_names_the_silent_ranks(pool):
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] did not finish within 2 s"):
        pool.run(sleep_forever, timeout_s=2)
    assert pool.run(pid_and_rank)[1][1] == 1


def test_workers_bloated_with_threads_are_recycled(pool, monkeypatch):
    monkeypatch.setattr(distributed, "MAX_WORKER_THREADS", 200)
    first = pool.run(pid_and_rank)
    assert pool.run(start_idle_threads, 20)[0] > 20
    assert pool.run(pid_and_rank) == first  # under the limit: same workers
    pool.run(start_idle_threads, 250)
    fresh = pool.run(pid_and_rank)
    assert {pid for pid, _ in fresh}.isdisjoint(pid for pid, _ in first)
