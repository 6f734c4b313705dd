"""The distributed test harness itself: failures are fast and complete, hangs are killed."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from tests._harness import DistributedTestError, run_distributed


def _ranks(rank, world):
    t = torch.tensor([rank])
    dist.all_reduce(t)
    return rank, world, int(t)


def test_runs_on_every_rank():
    assert run_distributed(_ranks, 3) == [(r, 3, 3) for r in range(3)]


def _raise_on_one(rank, world):
    if rank == 1:
        raise RuntimeError("rank one broke")
    dist.barrier()  # rank 0 would wait here forever
    return rank


def test_raising_rank_fails_fast_with_its_traceback():
    run_distributed(_ranks, 2)  # warm pool: time only the failure
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_raise_on_one, 2, timeout=60)
    assert time.monotonic() - start < 10
    assert "rank one broke" in str(info.value) and "rank 1 failed" in str(info.value)
    assert "killed after another rank failed" in str(info.value)


def _hang(rank, world):
    if rank == 0:
        time.sleep(600)
    return rank


def test_hanging_rank_is_killed_at_the_timeout():
    run_distributed(_ranks, 2)
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"still running: timed out after 3"):
        run_distributed(_hang, 2, timeout=3)
    assert time.monotonic() - start < 8
    assert run_distributed(_ranks, 2) == [(0, 2, 1), (1, 2, 1)]  # a fresh pool afterwards


def _die(rank, world):
    if rank == 1:
        import os

        os._exit(3)
    return rank


def test_dead_process_is_reported():
    with pytest.raises(DistributedTestError, match="exit code 3"):
        run_distributed(_die, 2, timeout=30)
