"""The per-step block plan: exact visibility, skipped blocks, and causal load balance."""

from __future__ import annotations

import pytest
import torch

from ringattn.layout import LAYOUTS, positions
from ringattn.schedule import plan_step


def visible_pairs(tasks, n):
    """The (query, key) local index pairs the tasks compute, as a boolean [n, n] matrix."""
    seen = torch.zeros(n, n, dtype=torch.int)
    for t in tasks:
        rows = torch.arange(t.q.start, t.q.stop)[:, None]
        cols = torch.arange(t.k.start, t.k.stop)[None, :]
        mask = torch.ones(len(rows), cols.shape[1], dtype=torch.bool)
        if t.offset is not None:
            mask = (cols - t.k.start) <= (rows - t.q.start) + t.offset
        seen[t.q, t.k] += mask.int()
    return seen


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5], ids=lambda w: f"W{w}")
def test_plan_covers_exactly_the_causal_pairs(layout, world):
    seq_len = 2 * world * 3
    n = seq_len // world
    for rank in range(world):
        pq = positions(seq_len, rank, world, layout)
        for src in range(world):
            pk = positions(seq_len, src, world, layout)
            seen = visible_pairs(plan_step(seq_len, rank, src, world, layout, True), n)
            assert seen.max() <= 1, "a pair computed twice"
            assert torch.equal(seen.bool(), pk[None, :] <= pq[:, None])


def block_flops(tasks):
    """Score entries computed: a diagonal (masked) block costs about half of a full one."""
    total = 0.0
    for t in tasks:
        area = (t.q.stop - t.q.start) * (t.k.stop - t.k.start)
        total += area / 2 if t.offset is not None else area
    return total


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
@pytest.mark.parametrize("world", [2, 3, 4, 8], ids=lambda w: f"W{w}")
def test_balanced_layouts_do_equal_work_every_step(layout, world):
    seq_len = 2 * world * 64
    n = seq_len // world
    for step in range(world):
        work = [
            block_flops(plan_step(seq_len, r, (r - step) % world, world, layout, True))
            for r in range(world)
        ]
        # Every rank does half a block per step (one block of S/W x S/W scores = n*n).
        assert max(work) - min(work) <= n, (step, work)
        assert abs(work[0] - n * n / 2) <= n


def test_zigzag_plan_is_one_call_per_step():
    for rank in range(4):
        for src in range(4):
            tasks = plan_step(64, rank, src, 4, "zigzag", True)
            assert len(tasks) == 1
            t = tasks[0]
            if src < rank:  # all queries, first key chunk, unmasked
                assert (t.q, t.k, t.offset) == (slice(0, 16), slice(0, 8), None)
            elif src > rank:  # second query chunk, all keys, unmasked
                assert (t.q, t.k, t.offset) == (slice(8, 16), slice(0, 16), None)


def test_contiguous_skips_future_blocks():
    assert plan_step(32, 0, 3, 4, "contiguous", True) == []
    assert plan_step(32, 3, 0, 4, "contiguous", True)[0].offset is None
    assert plan_step(32, 3, 0, 4, "contiguous", False)[0].offset is None
