"""Attention against the sharded cache on W gloo ranks vs float64 attention over each sequence's
whole unsharded history: ring prefill, a batch of decode steps, chunks (Sq > 1), forks."""

from __future__ import annotations

import pytest
import torch

from ringattn.cache import (
    PagePool,
    ShardedKVCache,
    cached_attention,
    merge_across_ranks,
    prefill_attention,
)
from ringattn.layout import shard_sequence
from tests._harness import run_distributed
from tests._reference import TOLERANCE, max_err, reference_attention

HQ, HKV, D, LAYERS, PAGE = 4, 2, 12, 2, 4  # GQA, an awkward head dim, a small page
SCALE = D**-0.5
TOL = TOLERANCE[(torch.float32, "torch")]


class Session:
    """A cache on this rank plus each sequence's full K/V history per layer (float64)."""

    def __init__(self, seed: int):
        pool = PagePool(
            num_layers=LAYERS, num_pages=48, page_size=PAGE, num_kv_heads=HKV, head_dim=D
        )
        self.cache = ShardedKVCache(pool)
        self.gen = torch.Generator().manual_seed(seed)  # same draws on every rank
        # history: (seq, layer) -> (k, v) [1, tokens so far, Hkv, D] float64
        self.history: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.errors: list[tuple[str, float]] = []

    def qkv(self, b: int, s: int):
        """Random q [b, s, Hq, D], k/v [b, s, Hkv, D] (the same on every rank)."""
        return [torch.randn(b, s, h, D, generator=self.gen) for h in (HQ, HKV, HKV)]

    def check(self, what: str, seq, layer: int, q, k, v, out) -> None:
        """out: [1, Sq, Hq, D] for new tokens k/v of `seq` after its history; extend the history."""
        old_k, old_v = self.history.get((seq, layer), (k[:, :0].double(), v[:, :0].double()))
        full_k, full_v = torch.cat([old_k, k.double()], 1), torch.cat([old_v, v.double()], 1)
        offset = full_k.shape[1] - q.shape[1]  # causal, bottom-right
        ref, _, _ = reference_attention(q, full_k, full_v, scale=SCALE, offset=offset)
        self.errors.append((f"{what} {seq!r} layer {layer}", max_err(out, ref)))
        self.history[(seq, layer)] = (full_k, full_v)

    def prefill(self, seq, length: int) -> None:
        """Ring part through ring attention, the rest as one chunk; every output checked."""
        plan = self.cache.begin_prefill([seq], length)
        r = plan.ring_len
        full = {layer: self.qkv(1, length) for layer in range(LAYERS)}
        for layer, (q, k, v) in full.items():
            if r:
                shard = [shard_sequence(t[:, :r]) for t in (q, k, v)]
                out = prefill_attention(self.cache, plan, layer, *shard)
                ref, _, _ = reference_attention(q[:, :r], k[:, :r], v[:, :r], scale=SCALE, offset=0)
                self.errors.append(
                    (f"ring {seq!r} layer {layer}", max_err(out, shard_sequence(ref)))
                )
            self.history[(seq, layer)] = (k[:, :r].double(), v[:, :r].double())
        step = self.cache.begin_step([seq], length - r)
        for layer, (q, k, v) in full.items():
            tail = [t[:, r:] for t in (q, k, v)]
            self.check("chunk", seq, layer, *tail, cached_attention(self.cache, step, layer, *tail))

    def step(self, seqs: list, sq: int) -> None:
        """Sq new tokens for each of `seqs` (one batch), every layer checked per sequence."""
        plan = self.cache.begin_step(seqs, sq)
        for layer in range(LAYERS):
            q, k, v = self.qkv(len(seqs), sq)
            out = cached_attention(self.cache, plan, layer, q, k, v)
            for b, seq in enumerate(seqs):
                one = [t[b : b + 1] for t in (q, k, v, out)]
                self.check(f"step Sq={sq}", seq, layer, *one)


def _decode_session(rank, world):
    """Three prompts: 3 tokens (shorter than a page; at W >= 2 ranks 1.. hold nothing of it),
    13 and 30 tokens; batched steps with Sq = 1 and chunks of 3 and 5 (crossing owner ranks);
    then a fork whose two continuations each match their own history."""
    s = Session(seed=0)
    for seq, length in (("short", 3), ("mid", 13), ("long", 30)):
        s.prefill(seq, length)
    for sq in (1, 1, 1, 3, 1, 5, 1):
        s.step(["short", "mid", "long"], sq)
    s.cache.fork("long", "long-b")
    for layer in range(LAYERS):
        s.history[("long-b", layer)] = s.history[("long", layer)]
    copies = []
    copy_pages = s.cache.pool.copy_pages
    s.cache.pool.copy_pages = lambda c: (copies.extend(c), copy_pages(c))
    for sq in (1, 2, 1, 1, 3):  # the first write into the shared partial page copies it
        s.step(["long", "long-b", "short"], sq)
    s.cache.pool.allocator.check_invariants()
    return s.errors, len(copies)


@pytest.mark.parametrize("world", [1, 2, 3], ids=lambda w: f"W{w}")
def test_decode_matches_full_history_attention(world):
    results = run_distributed(_decode_session, world)
    assert sum(copies for _, copies in results) >= 1  # the fork took the copy-on-write path
    for errors, _ in results:
        assert len(errors) > 50
        worst = max(errors, key=lambda e: e[1])
        assert worst[1] < TOL, worst


def _empty_rank_session(rank, world):
    """A sequence of 3 tokens on 3 ranks: ranks 1 and 2 hold none of it before and after."""
    s = Session(seed=1)
    s.prefill("tiny", 3)
    s.step(["tiny"], 1)
    return s.errors, s.cache.local_tokens("tiny")


def test_rank_holding_nothing_contributes_an_empty_partial():
    results = run_distributed(_empty_rank_session, 3)
    assert [tokens for _, tokens in results] == [4, 0, 0]
    for errors, _ in results:
        assert max(e for _, e in errors) < TOL, errors


def _merge_empty(rank, world):
    """Rows where every rank is empty merge to out 0, lse -inf; others ignore empty ranks."""
    out = torch.zeros(1, 2, 1, 3)
    lse = torch.full((1, 1, 2), float("-inf"))
    if rank == 1:  # only rank 1 has keys for row 1
        out[0, 1] = 1.0
        lse[0, 0, 1] = 0.5
    merged, merged_lse = merge_across_ranks(out, lse, group=None)
    return merged, merged_lse


def test_merge_across_ranks_is_nan_free_for_empty_partials():
    for merged, lse in run_distributed(_merge_empty, 2):
        assert torch.equal(merged[0, 0], torch.zeros(1, 3))
        assert torch.equal(merged[0, 1], torch.ones(1, 3))
        assert lse[0, 0].tolist() == [float("-inf"), 0.5]


def _bad_kv(rank, world):
    """Wrong K/V for the pool raise ValueError on every rank before any collective."""
    s = Session(seed=2)
    s.prefill("a", 6)
    plan = s.cache.begin_step(["a"], 1)
    pool = s.cache.pool
    before = (pool.k.clone(), pool.v.clone())  # compared bitwise: unwritten slots may be NaN
    q, k, v = s.qkv(1, 1)
    bad = {
        "heads": (q, torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)),
        "head dim": (q[..., :8], k[..., :8], v[..., :8]),
        "dtype": (q.double(), k.double(), v.double()),
        "tokens": (*(t.expand(1, 2, -1, -1) for t in (q, k, v)),),
    }
    messages = {}
    for name, (bq, bk, bv) in bad.items():
        with pytest.raises(ValueError) as info:
            cached_attention(s.cache, plan, 0, bq, bk, bv)
        messages[name] = str(info.value)
    bits = lambda t: t.view(torch.int32)  # noqa: E731
    same = all(torch.equal(bits(a), bits(b)) for a, b in zip(before, (pool.k, pool.v), strict=True))
    return messages, same


def test_bad_kv_raises_on_every_rank_and_leaves_the_pool_unchanged():
    for messages, same in run_distributed(_bad_kv, 2):
        assert same
        assert "num_kv_heads=2, head_dim=12" in messages["heads"]
        assert "num_kv_heads=2, head_dim=12" in messages["head dim"]
        assert "pool dtype torch.float32" in messages["dtype"]
        assert "[batch, tokens] = [1, 1]" in messages["tokens"]
