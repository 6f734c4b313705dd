"""Page allocator: unit tests per behaviour, then a stateful property test against a model."""

from __future__ import annotations

import copy
import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ringattn.cache.allocator import (
    CacheFull,
    PageAllocator,
    PageCopy,
    UnknownSequence,
    chained_hash,
)


def snapshot(alloc: PageAllocator) -> dict:
    """Deep copy of every piece of allocator state, to prove a failing call changed nothing."""
    return copy.deepcopy(vars(alloc))


# ---- construction, allocate, append ------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_pages", "page_size"), [(0, 4), (8, 0), (8, -1)], ids=["P0-S4", "P8-S0", "P8-Sneg"]
)
def test_bad_pool_sizes_raise(num_pages, page_size):
    with pytest.raises(ValueError, match=f"num_pages={num_pages}, page_size={page_size}"):
        PageAllocator(num_pages, page_size)


def test_allocate_takes_ceil_pages_and_reports_slots():
    alloc = PageAllocator(8, 4)
    result = alloc.allocate("a", 6)
    assert alloc.block_table("a") == [0, 1]
    assert result.slots == ((0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1))
    assert result.num_cached_tokens == 0
    assert alloc.slots("a") == list(result.slots)
    assert alloc.slot_mapping("a") == [0, 1, 2, 3, 4, 5]
    assert (alloc.num_tokens("a"), alloc.tokens_on_last_page("a")) == (6, 2)
    assert (alloc.num_free, alloc.num_used, alloc.num_shared) == (6, 2, 0)
    alloc.check_invariants()


def test_append_takes_a_page_only_when_the_last_is_full():
    alloc = PageAllocator(8, 4)
    alloc.allocate("a", 3)
    step = alloc.append("a")
    assert step.slots == ((0, 3),) and step.copies == ()
    assert alloc.num_free == 7 and alloc.tokens_on_last_page("a") == 4
    step = alloc.append("a")
    assert step.slots == ((1, 0),)
    assert alloc.num_free == 6 and alloc.tokens_on_last_page("a") == 1
    alloc.check_invariants()


def test_append_many_tokens_spans_pages():
    alloc = PageAllocator(8, 2)
    alloc.allocate("a", 1)
    step = alloc.append("a", 4)
    assert step.slots == ((0, 1), (1, 0), (1, 1), (2, 0))
    assert alloc.block_table("a") == [0, 1, 2]


def test_empty_sequence_owns_no_pages_until_append():
    alloc = PageAllocator(4, 4)
    assert alloc.allocate("a", 0).slots == ()
    assert alloc.block_table("a") == [] and alloc.tokens_on_last_page("a") == 0
    assert alloc.append("a", 0).slots == ()
    assert alloc.num_free == 4
    assert alloc.append("a").slots == ((0, 0),)


# ---- errors leave state unchanged ----------------------------------------------------------------


def test_cache_full_on_allocate_changes_nothing():
    alloc = PageAllocator(4, 4)
    alloc.allocate("a", 8)
    before = snapshot(alloc)
    with pytest.raises(CacheFull, match="needs 3 pages but only 2 of 4 are free"):
        alloc.allocate("b", 9, token_ids=list(range(9)))
    assert snapshot(alloc) == before
    assert "b" not in alloc
    assert issubclass(CacheFull, RuntimeError)


def test_cache_full_on_append_counts_the_cow_copy():
    alloc = PageAllocator(3, 4)
    alloc.allocate("a", 6)
    alloc.fork("a", "b")
    alloc.allocate("c", 4)  # pool is now exhausted
    before = snapshot(alloc)
    with pytest.raises(CacheFull, match="needs 1 pages but only 0"):
        alloc.append("b")  # no new page needed, but the shared partial page must be copied
    assert snapshot(alloc) == before


@pytest.mark.parametrize("op", ["append", "free", "fork", "num_tokens", "block_table", "slots"])
def test_unknown_sequence_is_named_and_quotes_the_id(op):
    alloc = PageAllocator(4, 4)
    alloc.allocate("gone", 3)
    alloc.free("gone")
    before = snapshot(alloc)
    args = ("gone", "child") if op == "fork" else ("gone",)
    with pytest.raises(UnknownSequence, match="'gone'"):
        getattr(alloc, op)(*args)
    assert snapshot(alloc) == before
    assert issubclass(UnknownSequence, ValueError)


def test_existing_ids_are_rejected():
    alloc = PageAllocator(4, 4)
    alloc.allocate("a", 3)
    alloc.allocate("b", 3)
    before = snapshot(alloc)
    with pytest.raises(ValueError, match="'a' already exists"):
        alloc.allocate("a", 1)
    with pytest.raises(ValueError, match="existing sequence 'b'"):
        alloc.fork("a", "b")
    assert snapshot(alloc) == before


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda a: a.allocate("b", -1), "num_tokens must be >= 0, got -1"),
        (lambda a: a.append("a", -2), "num_tokens must be >= 0, got -2"),
        (lambda a: a.allocate("b", 3, token_ids=[1, 2]), "got 2 token_ids for num_tokens=3"),
        (lambda a: a.append("a", 1, token_ids=[1, 2]), "got 2 token_ids for num_tokens=1"),
    ],
    ids=["allocate-negative", "append-negative", "allocate-ids", "append-ids"],
)
def test_bad_arguments_raise_value_error_and_change_nothing(call, message):
    alloc = PageAllocator(4, 4)
    alloc.allocate("a", 3, token_ids=[7, 8, 9])
    before = snapshot(alloc)
    with pytest.raises(ValueError, match=message):
        call(alloc)
    assert snapshot(alloc) == before


# ---- fork, copy-on-write, free -------------------------------------------------------------------


def test_fork_shares_every_page_without_allocating():
    alloc = PageAllocator(8, 4)
    alloc.allocate("a", 6)
    alloc.fork("a", "b")
    assert alloc.block_table("b") == alloc.block_table("a") == [0, 1]
    assert alloc.slots("b") == alloc.slots("a")
    assert [alloc.refcount(p) for p in (0, 1)] == [2, 2]
    assert (alloc.num_free, alloc.num_used, alloc.num_shared) == (6, 2, 2)
    alloc.check_invariants()


@pytest.mark.parametrize("writer", ["child", "parent"])
def test_cow_copies_exactly_the_shared_partial_last_page(writer):
    alloc = PageAllocator(8, 4)
    alloc.allocate("parent", 6)
    alloc.fork("parent", "child")
    other = "parent" if writer == "child" else "child"
    step = alloc.append(writer)
    assert step.copies == (PageCopy(src=1, dst=2, num_tokens=2),)
    assert step.slots == ((2, 2),)
    assert alloc.block_table(writer) == [0, 2] and alloc.block_table(other) == [0, 1]
    assert [alloc.refcount(p) for p in (0, 1, 2)] == [2, 1, 1]
    # the other sequence now owns page 1 alone: it writes in place, no copy
    step = alloc.append(other)
    assert step.copies == () and step.slots == ((1, 2),)
    alloc.check_invariants()


def test_full_shared_pages_are_never_copied():
    alloc = PageAllocator(8, 4)
    alloc.allocate("a", 8)
    alloc.fork("a", "b")
    step = alloc.append("b", 5)
    assert step.copies == ()
    assert alloc.block_table("b") == [0, 1, 2, 3]
    assert alloc.num_shared == 2  # pages 0 and 1 stay shared
    alloc.check_invariants()


def test_zero_token_append_does_not_copy():
    alloc = PageAllocator(8, 4)
    alloc.allocate("a", 2)
    alloc.fork("a", "b")
    assert alloc.append("b", 0).copies == ()
    assert alloc.num_shared == 1


def test_free_returns_pages_only_when_the_count_reaches_zero():
    alloc = PageAllocator(8, 4)
    alloc.allocate("a", 6)
    alloc.fork("a", "b")
    alloc.append("b", 3)  # b: shared page 0, private copy 2, new page 3
    alloc.free("a")
    assert alloc.num_free == 5  # page 1 (a's private partial page) came back, page 0 did not
    assert alloc.refcount(0) == 1
    alloc.free("b")
    assert alloc.num_free == 8 and alloc.num_shared == 0
    alloc.check_invariants()


# ---- prefix sharing ------------------------------------------------------------------------------


def test_prefix_hit_reuses_full_pages_and_reports_cached_tokens():
    alloc = PageAllocator(8, 4)
    alloc.allocate("a", 10, token_ids=list(range(10)))
    result = alloc.allocate("b", 11, token_ids=[*range(8), 50, 51, 52])
    assert result.num_cached_tokens == 8
    assert alloc.block_table("b")[:2] == alloc.block_table("a")[:2]
    assert alloc.block_table("b")[2] not in alloc.block_table("a")
    assert alloc.num_shared == 2 and alloc.num_used == 4
    alloc.check_invariants()


def test_a_whole_cached_prompt_is_reported_as_cached():
    alloc = PageAllocator(8, 4)
    alloc.allocate("a", 8, token_ids=list(range(8)))
    assert alloc.allocate("b", 8, token_ids=list(range(8))).num_cached_tokens == 8
    assert alloc.num_used == 2


def test_prefix_miss_when_an_earlier_page_differs():
    alloc = PageAllocator(8, 4)
    alloc.allocate("a", 8, token_ids=list(range(8)))
    # page 1 holds the same tokens, but after a different page 0: its K/V differ
    result = alloc.allocate("b", 8, token_ids=[9, 9, 9, 9, 4, 5, 6, 7])
    assert result.num_cached_tokens == 0 and alloc.num_shared == 0


def test_partial_pages_and_unknown_tokens_are_not_cached():
    alloc = PageAllocator(8, 4)
    alloc.allocate("a", 3, token_ids=[1, 2, 3])
    alloc.allocate("b", 4)  # no token ids: nothing to hash
    assert alloc.allocate("c", 3, token_ids=[1, 2, 3]).num_cached_tokens == 0


def test_appending_with_token_ids_caches_pages_as_they_fill():
    alloc = PageAllocator(8, 4)
    alloc.allocate("a", 2, token_ids=[1, 2])
    alloc.append("a", 2, token_ids=[3, 4])
    assert alloc.allocate("b", 4, token_ids=[1, 2, 3, 4]).num_cached_tokens == 4
    alloc.allocate("c", 2, token_ids=[5, 6])
    alloc.append("c", 2)  # ids unknown from here on: the page is not cached
    assert alloc.allocate("d", 4, token_ids=[5, 6, 7, 8]).num_cached_tokens == 0


def test_pages_leave_the_prefix_cache_when_freed():
    alloc = PageAllocator(8, 4)
    alloc.allocate("a", 4, token_ids=[1, 2, 3, 4])
    alloc.fork("a", "b")
    alloc.free("a")
    assert alloc.allocate("c", 4, token_ids=[1, 2, 3, 4]).num_cached_tokens == 4
    alloc.free("b")
    alloc.free("c")
    assert alloc.allocate("d", 4, token_ids=[1, 2, 3, 4]).num_cached_tokens == 0
    alloc.check_invariants()


def test_hash_collision_never_aliases_different_tokens():
    alloc = PageAllocator(8, 2, hash_fn=lambda parent, tokens: 0)
    alloc.allocate("a", 2, token_ids=[1, 2])
    assert alloc.allocate("b", 2, token_ids=[3, 4]).num_cached_tokens == 0
    assert alloc.block_table("a") != alloc.block_table("b")
    assert alloc.allocate("c", 2, token_ids=[1, 2]).num_cached_tokens == 2  # equal tokens still hit
    alloc.check_invariants()


def test_hash_collision_on_the_parent_never_aliases_a_later_page():
    def first_pages_collide(parent, tokens):
        return 0 if parent is None else chained_hash(parent, tokens)

    alloc = PageAllocator(8, 2, hash_fn=first_pages_collide)
    alloc.allocate("b", 2, token_ids=[5, 5])  # cache: hash 0 -> b's page 0
    alloc.allocate("a", 4, token_ids=[1, 1, 7, 7])  # a's page 1 is cached, after a's own page 0
    # c's page 0 is b's; its page 1 has a's tokens and chained hash but follows another page
    result = alloc.allocate("c", 4, token_ids=[5, 5, 7, 7])
    assert result.num_cached_tokens == 2
    assert alloc.block_table("c")[1] not in alloc.block_table("a")


# ---- the invariant checker itself ----------------------------------------------------------------


def test_check_invariants_catches_corruption():
    alloc = PageAllocator(4, 2)
    alloc.allocate("a", 3)
    alloc._refcount[0] += 1
    with pytest.raises(RuntimeError, match="refcounts"):
        alloc.check_invariants()
    alloc._refcount[0] -= 1
    alloc._free.append(alloc.block_table("a")[0])
    with pytest.raises(RuntimeError, match="free list|both free and in use"):
        alloc.check_invariants()


# ---- stateful property test ----------------------------------------------------------------------


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate/append/fork/free against a model that simulates the K/V memory.

    Every token's "K/V" is the tuple of its whole prefix (as real K/V depend on it). The machine
    writes what the allocator says to write and performs the copies it reports; after each step,
    reading every live sequence back through ``slots`` must give its own prefixes. That catches
    lost writes, writes into shared pages, missed copies and wrongly reused prefix pages.
    """

    hash_fn = staticmethod(chained_hash)

    @initialize(num_pages=st.integers(8, 16), page_size=st.integers(1, 4))
    def setup(self, num_pages, page_size):
        self.alloc = PageAllocator(num_pages, page_size, hash_fn=type(self).hash_fn)
        self.tokens: dict[int, list] = {}  # model: seq id -> its tokens
        self.memory: dict[tuple[int, int], tuple] = {}  # (page, slot) -> K/V stored there
        self.freed: list[int] = []
        self.ids = itertools.count()
        self.unknown = itertools.count()  # tokens the allocator is not told about are unique

    def new_tokens(self, ids, with_ids):
        return list(ids) if with_ids else [("u", next(self.unknown)) for _ in ids]

    def write(self, seq, slots, start):
        for i, position in enumerate(slots, start):
            self.memory[position] = tuple(self.tokens[seq][: i + 1])

    @rule(ids=st.lists(st.integers(0, 2), max_size=12), with_ids=st.booleans())
    def allocate(self, ids, with_ids):
        seq, before, free = next(self.ids), snapshot(self.alloc), self.alloc.num_free
        pages = -(-len(ids) // self.alloc.page_size)
        try:
            result = self.alloc.allocate(seq, len(ids), ids if with_ids else None)
        except CacheFull:
            assert pages > self.alloc.num_free and snapshot(self.alloc) == before
            return
        cached = result.num_cached_tokens
        assert cached % self.alloc.page_size == 0 and (with_ids or cached == 0)
        assert self.alloc.num_free == free - pages + cached // self.alloc.page_size
        self.tokens[seq] = self.new_tokens(ids, with_ids)
        self.write(seq, result.slots[cached:], cached)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), ids=st.lists(st.integers(0, 2), max_size=6), with_ids=st.booleans())
    def append(self, data, ids, with_ids):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        alloc, before, free = self.alloc, snapshot(self.alloc), self.alloc.num_free
        n0, size = alloc.num_tokens(seq), alloc.page_size
        last = alloc.block_table(seq)[-1] if n0 else None
        cow = bool(ids) and n0 % size != 0 and alloc.refcount(last) >= 2
        needed = -(-(n0 + len(ids)) // size) - -(-n0 // size) + cow
        try:
            step = alloc.append(seq, len(ids), ids if with_ids else None)
        except CacheFull:
            assert needed > alloc.num_free and snapshot(alloc) == before
            return
        assert alloc.num_free == free - needed
        if cow:  # the old last page went to a fresh private copy, listed for the caller
            copy_page = alloc.block_table(seq)[(n0 - 1) // size]
            assert step.copies == (PageCopy(last, copy_page, n0 % size),)
        else:
            assert step.copies == ()
        for c in step.copies:
            for slot in range(c.num_tokens):
                self.memory[(c.dst, slot)] = self.memory[(c.src, slot)]
        assert all(alloc.refcount(page) == 1 for page, _ in step.slots)  # never write shared
        self.tokens[seq] += self.new_tokens(ids, with_ids)
        self.write(seq, step.slots, n0)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent, child = data.draw(st.sampled_from(sorted(self.tokens))), next(self.ids)
        free = self.alloc.num_free
        self.alloc.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])
        assert self.alloc.num_free == free

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.alloc.free(seq)
        del self.tokens[seq]
        self.freed.append(seq)

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def use_freed_sequence(self, data):
        seq, before = data.draw(st.sampled_from(self.freed)), snapshot(self.alloc)
        with pytest.raises(UnknownSequence, match=repr(seq)):
            self.alloc.append(seq)
        assert snapshot(self.alloc) == before

    @invariant()
    def bookkeeping_is_consistent(self):
        alloc = self.alloc
        alloc.check_invariants()
        assert alloc.num_free + alloc.num_used == alloc.num_pages
        assert set(alloc.sequences) == set(self.tokens)
        owners: dict[int, int] = {}
        for seq in self.tokens:
            for page in alloc.block_table(seq):
                owners[page] = owners.get(page, 0) + 1
        assert alloc.num_used == len(owners)
        assert alloc.num_shared == sum(n >= 2 for n in owners.values())
        assert all(alloc.refcount(page) == n for page, n in owners.items())

    @invariant()
    def every_sequence_reads_back_its_own_kv(self):
        for seq, tokens in self.tokens.items():
            slots = self.alloc.slots(seq)
            assert len(set(slots)) == len(slots) == len(tokens)
            stored = [self.memory.get(position) for position in slots]
            assert stored == [tuple(tokens[: i + 1]) for i in range(len(tokens))]

    @invariant()
    def shared_slots_hold_one_prefix(self):
        """Two sequences map a token to the same (page, slot) only if their prefixes agree."""
        holder: dict[tuple[int, int], tuple] = {}
        for seq, tokens in self.tokens.items():
            for i, position in enumerate(self.alloc.slots(seq)):
                prefix = tuple(tokens[: i + 1])
                assert holder.setdefault(position, prefix) == prefix


class CollidingHashMachine(AllocatorMachine):
    """Same machine with a hash that collides across contents and ignores the chain."""

    hash_fn = staticmethod(lambda parent, tokens: sum(map(hash, tokens)) % 3)


_MACHINE_SETTINGS = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = _MACHINE_SETTINGS
TestCollidingHashMachine = CollidingHashMachine.TestCase
TestCollidingHashMachine.settings = _MACHINE_SETTINGS
