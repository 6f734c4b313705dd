"""Placement policy of the sharded cache: the closed form against the allocators of W gloo ranks,
and bad input (unknown, freed or duplicate sequences; a full rank) raising on every rank with
nothing changed."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.distributed as dist

from ringattn.cache import (
    CacheFull,
    PagePool,
    ShardedKVCache,
    UnknownSequence,
    decode_owner,
    ring_prefill_len,
    tokens_on_rank,
)
from tests._harness import run_distributed


def make_cache(num_pages=32, page_size=4, num_layers=1) -> ShardedKVCache:
    pool = PagePool(
        num_layers=num_layers, num_pages=num_pages, page_size=page_size, num_kv_heads=2, head_dim=8
    )
    return ShardedKVCache(pool)


# ---- the policy on its own ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt_len", "layout", "world", "expected"),
    [
        (1, "zigzag", 2, 0),
        (4, "zigzag", 2, 0),  # a multiple of 2W still leaves its last 2W tokens as the chunk
        (5, "zigzag", 2, 4),
        (30, "zigzag", 3, 24),
        (512, "zigzag", 2, 508),
        (512, "striped", 2, 510),
        (7, "contiguous", 1, 6),
    ],
)
def test_ring_prefill_len_leaves_one_to_multiple_tokens(prompt_len, layout, world, expected):
    assert ring_prefill_len(prompt_len, layout=layout, world_size=world) == expected


def test_ring_prefill_len_rejects_empty_prompt():
    with pytest.raises(ValueError, match="prompt length must be >= 1, got 0"):
        ring_prefill_len(0, layout="zigzag", world_size=2)


@pytest.mark.parametrize(("world", "page"), [(1, 4), (2, 1), (3, 4), (4, 16)])
def test_closed_form_counts_the_policy(world, page):
    for ring_len, appended in itertools.product((0, world * 5), range(3 * world * page + 3)):
        owners = [decode_owner(t, world_size=world, page_size=page) for t in range(appended)]
        for r in range(world):
            expected = ring_len // world + owners.count(r)
            got = tokens_on_rank(ring_len, appended, r, world_size=world, page_size=page)
            assert got == expected, (ring_len, appended, r)
        counts = [
            tokens_on_rank(0, appended, r, world_size=world, page_size=page) for r in range(world)
        ]
        assert max(counts) - min(counts) <= page  # balanced however long it grows


# ---- closed form vs the allocators of W ranks --------------------------------------------------


def _grow(rank, world):
    """Prefills of awkward lengths, decode steps and chunks of several sizes, forks and a free;
    after each step, every rank's allocator count of every sequence vs the closed form."""
    cache = make_cache(num_pages=64, page_size=4)
    mismatches = []

    def check(when):
        for s in cache.sequences:
            local = torch.tensor([cache.local_tokens(s)])
            every = [torch.zeros_like(local) for _ in range(world)]
            dist.all_gather(every, local)
            actual = [int(x) for x in every]
            closed = [cache.tokens_on_rank(s, r) for r in range(world)]
            if actual != closed or sum(actual) != cache.seq_len(s):
                mismatches.append((when, s, actual, closed, cache.seq_len(s)))
        cache.pool.allocator.check_invariants()

    for s, length in (("a", 3), ("b", 13), ("c", 30)):
        plan = cache.begin_prefill([s], length)
        cache.begin_step([s], length - plan.ring_len)
        check(f"prefill {s}")
    for step, sq in enumerate((1, 1, 3, 1, 5, 2, 1, 7)):
        cache.begin_step(["a", "b", "c"], sq)
        check(f"step {step}")
    cache.fork("c", "c2")
    cache.free("b")
    for step, sq in enumerate((1, 4, 1)):
        cache.begin_step(["c", "c2", "a"], sq)
        check(f"after fork {step}")
    return mismatches


@pytest.mark.parametrize("world", [1, 2, 3], ids=lambda w: f"W{w}")
def test_closed_form_matches_allocator_state(world):
    for mismatches in run_distributed(_grow, world):
        assert mismatches == []


# ---- bad input: every rank raises, nothing changes ---------------------------------------------


def _state(cache: ShardedKVCache):
    return copy.deepcopy(vars(cache.pool.allocator)), copy.deepcopy(cache._seqs)


def _raises(fn, error, match):
    with pytest.raises(error, match=match):
        fn()


def _bad_input(rank, world):
    # 13 tokens: W=1 caches them all (4 pages of 5); W=2 caches 7 on rank 0 and 6 on rank 1
    # (2 pages of 3 each): one page free per rank either way.
    cache = make_cache(num_pages=5 if world == 1 else 3, page_size=4)
    plan = cache.begin_prefill(["a"], 13)
    cache.begin_step(["a"], 13 - plan.ring_len)
    cache.begin_prefill(["gone"], 2)
    cache.free("gone")
    before = _state(cache)
    _raises(lambda: cache.begin_step(["gone"], 1), UnknownSequence, "'gone'.*freed")
    _raises(lambda: cache.begin_step(["a", "nope"], 1), UnknownSequence, "'nope'")
    _raises(lambda: cache.begin_step(["a", "a"], 1), ValueError, "duplicate")
    _raises(lambda: cache.begin_step(["a"], 0), ValueError, "num_new must be >= 1, got 0")
    _raises(lambda: cache.begin_prefill(["a"], 8), ValueError, r"\['a'\] already exist")
    _raises(lambda: cache.fork("nope", "x"), UnknownSequence, "'nope'")
    _raises(lambda: cache.fork("a", "a"), ValueError, "existing sequence 'a'")
    _raises(lambda: cache.free("gone"), UnknownSequence, "'gone'")
    # 12 more tokens: at W=2 rank 0 gets 7 of them (2 pages) and rank 1 gets 5 (1 page), so
    # only rank 0 is short, yet every rank raises and no rank allocates.
    short = "rank 0 needs 3 pages, has 1 free" if world == 1 else "rank 0 needs 2 pages, has 1 free"
    _raises(lambda: cache.begin_step(["a"], 12), CacheFull, rf"decode step: {short} \(of")
    _raises(lambda: cache.begin_prefill(["big"], 80), CacheFull, "prefill: rank 0 needs")
    assert _state(cache) == before
    cache.pool.allocator.check_invariants()
    return True


@pytest.mark.parametrize("world", [1, 2], ids=lambda w: f"W{w}")
def test_bad_input_raises_on_every_rank_and_changes_nothing(world):
    assert all(run_distributed(_bad_input, world))
