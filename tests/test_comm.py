"""RingComm: ring order over group ranks, host staging, and stuck peers turned into errors."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import ringattn
from ringattn.comm import RingComm, RingTimeoutError
from tests._harness import DistributedTestError, run_distributed


def _pass_around(rank, world, members, staged):
    group = dist.new_group(members)
    if rank not in members:
        return None
    comm = RingComm(group, stage_through_host=staged)
    x = torch.full((2, 3), float(rank))
    got = comm.send_recv(x)
    comm.commit()
    comm.wait()
    return comm.prev_rank, comm.next_rank, float(got[0, 0])


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "host-staged"])
def test_receives_from_previous_global_rank(staged):
    members = [2, 0, 3]  # new_group sorts: group rank -> global rank is 0->0, 1->2, 2->3
    results = run_distributed(_pass_around, 4, members, staged)
    assert results[1] is None
    prev = {0: 3, 2: 0, 3: 2}
    nxt = {0: 2, 2: 3, 3: 0}
    for g in members:
        assert results[g] == (prev[g], nxt[g], float(prev[g]))


def _ring_staged(rank, world):
    # The ring's own traffic through the staging path (as for CUDA tensors on gloo).
    from ringattn import comm as comm_module

    real = comm_module.RingComm.__init__

    def staged_init(self, group=None, **kw):
        real(self, group, stage_through_host=True)

    comm_module.RingComm.__init__ = staged_init
    try:
        q = torch.randn(1, 8, 2, 4, generator=torch.Generator().manual_seed(rank))
        q.requires_grad_()
        out = ringattn.ring_attention(q, q, q, causal=True)
        out.sum().backward()
        return out.detach(), q.grad
    finally:
        comm_module.RingComm.__init__ = real


def test_staged_ring_equals_direct_ring():
    staged = run_distributed(_ring_staged, 2)
    for out, grad in staged:
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    direct = run_distributed(_ring_direct, 2)
    for (a, ga), (b, gb) in zip(staged, direct, strict=True):
        assert torch.equal(a, b) and torch.equal(ga, gb)


def _ring_direct(rank, world):
    q = torch.randn(1, 8, 2, 4, generator=torch.Generator().manual_seed(rank))
    q.requires_grad_()
    out = ringattn.ring_attention(q, q, q, causal=True)
    out.sum().backward()
    return out.detach(), q.grad


def _one_rank_absent(rank, world):
    if rank == 1:
        return None  # never joins the ring
    x = torch.randn(1, 4, 2, 8)
    start = time.monotonic()
    try:
        ringattn.ring_attention(x, x, x)
    except RingTimeoutError as err:
        return str(err), time.monotonic() - start
    return "no error", 0.0


def test_stuck_peer_becomes_error_naming_it(monkeypatch):
    monkeypatch.setenv("RINGATTN_COMM_TIMEOUT", "2")
    message, waited = run_distributed(_one_rank_absent, 2, timeout=30)[0]
    assert "rank 1" in message and "2s timeout" in message, message
    assert waited < 10


def _raise_mid_ring(rank, world):
    if rank == 2:
        raise RuntimeError("rank 2 lost its data")
    x = torch.randn(1, 6, 2, 8)
    return ringattn.ring_attention(x, x, x, causal=True)


def test_rank_raising_mid_ring_fails_the_others_quickly(monkeypatch):
    monkeypatch.setenv("RINGATTN_COMM_TIMEOUT", "3")
    run_distributed(_pass_around, 3, [0, 1, 2], False)  # warm pool
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match="rank 2 lost its data"):
        run_distributed(_raise_mid_ring, 3, timeout=60)
    assert time.monotonic() - start < 15
