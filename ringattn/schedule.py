"""Which block attentions a ring step computes, from the layouts' global positions.

At ring step t, rank r holds the K/V shard of rank src = (r - t) mod W. Its queries (segments of
global positions, `layout.segments`) meet the keys' segments pairwise. For one pair, with query
local i at position qs + i*st and key local j at ks + j*st, causal visibility is

    ks + j*st <= qs + i*st   <=>   j <= i + floor((qs - ks) / st)

so each pair is one block-attention call with that diagonal offset: skipped when the mask empties
it, unmasked (offset None) when the mask leaves it whole. Adjacent unmasked calls are fused. On
step 0 (a rank's own keys) positions increase along the shard, so the whole shard is causal with
offset 0. For zigzag this gives, on every rank and every step, exactly half a (S/W)^2 block:

    step 0:      q (both chunks) x k (both chunks), offset 0
    src < rank:  q (both chunks) x k (first chunk), unmasked
    src > rank:  q (second chunk) x k (both chunks), unmasked
"""

from __future__ import annotations

from typing import NamedTuple

from ringattn.layout import segments


class Task(NamedTuple):
    """One block-attention call: local query rows `q` against local key rows `k`."""

    q: slice
    k: slice
    offset: int | None  # causal diagonal offset; None: no mask


def _pair_offset(qs: int, ks: int, stride: int, len_q: int, len_k: int) -> tuple[bool, int | None]:
    """(skip, offset) for a causal pair of segments."""
    offset = (qs - ks) // stride
    if len_q - 1 + offset < 0:  # even the last query sees no key
        return True, None
    if offset >= len_k - 1:  # even the first query sees every key
        return False, None
    return False, offset


def _fuse(tasks: list[Task]) -> list[Task]:
    """Fuse unmasked tasks that share one side and are adjacent on the other."""
    fused: list[Task] = []
    for t in tasks:
        prev = fused[-1] if fused else None
        if prev is not None and prev.offset is None and t.offset is None:
            if prev.k == t.k and prev.q.stop == t.q.start:
                fused[-1] = Task(slice(prev.q.start, t.q.stop), t.k, None)
                continue
            if prev.q == t.q and prev.k.stop == t.k.start:
                fused[-1] = Task(t.q, slice(prev.k.start, t.k.stop), None)
                continue
        fused.append(t)
    return fused


def plan_step(
    seq_len: int, rank: int, src: int, world_size: int, layout: str, causal: bool
) -> list[Task]:
    """The block attentions that `rank`'s queries do against `src`'s keys."""
    local = seq_len // world_size
    if not causal:
        return [Task(slice(0, local), slice(0, local), None)]
    if src == rank:
        return [Task(slice(0, local), slice(0, local), 0)]
    tasks = []
    q0 = 0
    for sq in segments(seq_len, rank, world_size, layout):
        k0 = 0
        for sk in segments(seq_len, src, world_size, layout):
            skip, offset = _pair_offset(sq.start, sk.start, sq.stride, sq.length, sk.length)
            if not skip:
                tasks.append(Task(slice(q0, q0 + sq.length), slice(k0, k0 + sk.length), offset))
            k0 += sk.length
        q0 += sq.length
    tasks.sort(key=lambda t: (t.k.start, t.q.start))
    return _fuse(_fuse(tasks))
