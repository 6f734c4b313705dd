"""Page allocator of the paged KV cache: pages managed like virtual memory.

A fixed pool of ``num_pages`` physical pages, each holding ``page_size`` tokens. Every sequence
owns a block table (logical page -> physical page). Pages are reference counted so that forks and
identical prompt prefixes share memory:

* ``fork`` shares every page; the first append that would write into a shared, partially filled
  last page gets a private copy of it first (copy-on-write) and reports the copy to the caller.
* ``allocate(..., token_ids=...)`` reuses full pages whose contents are already cached, found by
  a chained content hash and confirmed by comparing tokens (hash collisions never alias pages).

Plain Python: no torch, no ``torch.distributed``. The allocator only decides *where* K/V go; the
caller moves the data, using the ``(page, slot)`` positions and page copies it returns::

    alloc = PageAllocator(num_pages=64, page_size=16)
    prefill = alloc.allocate("a", 40, token_ids=prompt)
    write_kv(prefill.slots[prefill.num_cached_tokens:])   # skip tokens already cached
    alloc.fork("a", "b")
    step = alloc.append("b")                               # COW of the shared partial page
    for c in step.copies:
        copy_kv(c.src, c.dst, c.num_tokens)
    write_kv(step.slots)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

# (hash of the previous page or None for the first page, tokens of this page) -> page hash
HashFn = Callable[[int | None, tuple[int, ...]], int]


def chained_hash(parent_hash: int | None, tokens: tuple[int, ...]) -> int:
    """Content hash of a full page, chained to the hash of the page before it."""
    return hash((parent_hash, tokens))


class CacheFull(RuntimeError):  # noqa: N818 -- name fixed by the cache API
    """Not enough free pages; the failing call changed nothing."""


class UnknownSequence(ValueError):  # noqa: N818 -- name fixed by the cache API
    """The sequence id was never allocated or has been freed."""


@dataclass(frozen=True)
class PageCopy:
    """Copy the first ``num_tokens`` slots of K/V from page ``src`` to page ``dst``."""

    src: int
    dst: int
    num_tokens: int


@dataclass(frozen=True)
class Allocation:
    """Result of `PageAllocator.allocate`.

    Attributes:
        slots: ``(physical page, slot)`` of every token of the new sequence, in order.
        num_cached_tokens: how many leading tokens already sit in reused prefix pages; prefill
            writes K/V only for ``slots[num_cached_tokens:]``. It can equal the prompt length;
            a caller that needs the last token's logits then recomputes that token.
    """

    slots: tuple[tuple[int, int], ...]
    num_cached_tokens: int


@dataclass(frozen=True)
class AppendResult:
    """Result of `PageAllocator.append`.

    Attributes:
        slots: ``(physical page, slot)`` of each appended token, in order.
        copies: page copies to perform *before* writing ``slots`` (copy-on-write).
    """

    slots: tuple[tuple[int, int], ...]
    copies: tuple[PageCopy, ...]


class _CachedPage(NamedTuple):
    """What the prefix cache knows about a full page."""

    hash: int
    tokens: tuple[int, ...]
    parent: int | None  # physical page holding the previous logical page; None for page 0


@dataclass
class _Sequence:
    # block table: logical page i -> physical page
    table: list[int] = field(default_factory=list)
    num_tokens: int = 0  # tokens stored; the table holds ceil(num_tokens / page_size) pages
    # token ids of every token so far; None once any token arrived without its id
    token_ids: list[int] | None = None
    # chained content hash of logical page i, for the leading full pages with known tokens
    hashes: list[int] = field(default_factory=list)


class PageAllocator:
    """Reference-counted page allocator with copy-on-write forks and prefix sharing.

    Args:
        num_pages: size of the physical page pool.
        page_size: tokens per page.
        hash_fn: chained page hash, ``hash_fn(parent_hash, page_tokens) -> int``; injectable so
            tests can force collisions.

    Every method either succeeds or raises and leaves the allocator unchanged.
    """

    def __init__(self, num_pages: int, page_size: int, *, hash_fn: HashFn = chained_hash) -> None:
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(
                f"num_pages and page_size must be positive, got num_pages={num_pages}, "
                f"page_size={page_size}"
            )
        self.num_pages = num_pages
        self.page_size = page_size
        self._hash_fn = hash_fn
        # free list: physical pages with refcount 0, popped from the end (page 0 first)
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        # refcount: physical page -> number of block-table entries pointing at it
        self._refcount: list[int] = [0] * num_pages
        # sequences: seq_id -> block table, token count and token ids
        self._seqs: dict[Hashable, _Sequence] = {}
        # prefix cache: chained page hash -> physical page holding that full page
        self._cached: dict[int, int] = {}
        # reverse prefix cache: physical page -> its entry (hash, tokens, parent page)
        self._page_info: dict[int, _CachedPage] = {}

    # ---- counters and accessors ---------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Pages on the free list."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Pages referenced by at least one sequence."""
        return self.num_pages - len(self._free)

    @property
    def num_shared(self) -> int:
        """Pages referenced by two or more block-table entries."""
        return sum(count >= 2 for count in self._refcount)

    @property
    def sequences(self) -> tuple[Hashable, ...]:
        """Ids of the live sequences."""
        return tuple(self._seqs)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def refcount(self, page: int) -> int:
        """Number of block-table entries that point at physical ``page``."""
        return self._refcount[page]

    def num_tokens(self, seq_id: Hashable) -> int:
        """Tokens stored for ``seq_id``."""
        return self._get(seq_id).num_tokens

    def block_table(self, seq_id: Hashable) -> list[int]:
        """Physical page of each logical page of ``seq_id`` (a copy)."""
        return list(self._get(seq_id).table)

    def tokens_on_last_page(self, seq_id: Hashable) -> int:
        """Tokens on the last page of ``seq_id``: ``page_size`` if full, 0 if it has no pages."""
        n = self._get(seq_id).num_tokens
        return (n - 1) % self.page_size + 1 if n else 0

    def slots(
        self, seq_id: Hashable, start: int = 0, stop: int | None = None
    ) -> list[tuple[int, int]]:
        """``(physical page, slot)`` of tokens ``start:stop`` of ``seq_id`` (default: all)."""
        seq = self._get(seq_id)
        stop = seq.num_tokens if stop is None else min(stop, seq.num_tokens)
        size = self.page_size
        return [(seq.table[i // size], i % size) for i in range(start, stop)]

    def pages_needed(self, seq_id: Hashable, num_tokens: int) -> int:
        """Free pages that ``append(seq_id, num_tokens)`` would take, counting a copy-on-write.

        Read-only, so a caller can check capacity (e.g. on every rank of a group) before it
        commits to an append.

        Raises:
            UnknownSequence: ``seq_id`` does not exist.
            ValueError: ``num_tokens < 0``.
        """
        seq = self._get(seq_id)
        self._check_tokens(num_tokens, None)
        cow = num_tokens > 0 and self._last_page_shared_partial(seq)
        return self._num_pages_for(seq.num_tokens + num_tokens) - len(seq.table) + cow

    def slot_mapping(self, seq_id: Hashable) -> list[int]:
        """Flat slot ``page * page_size + slot`` of every token of ``seq_id`` (vLLM's layout)."""
        return [page * self.page_size + slot for page, slot in self.slots(seq_id)]

    # ---- operations ---------------------------------------------------------------------------

    def allocate(
        self, seq_id: Hashable, num_tokens: int, token_ids: Sequence[int] | None = None
    ) -> Allocation:
        """Create ``seq_id`` holding ``num_tokens`` tokens.

        With ``token_ids``, leading full pages whose contents are already cached are shared
        instead of allocated, and the new full pages become cache entries.

        Raises:
            ValueError: ``seq_id`` exists, ``num_tokens < 0`` or ``len(token_ids) != num_tokens``.
            CacheFull: fewer free pages than the uncached pages needed.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already exists")
        self._check_tokens(num_tokens, token_ids)
        hits = self._cached_prefix(token_ids) if token_ids is not None else []
        num_cached = len(hits) * self.page_size
        self._reserve(seq_id, self._num_pages_for(num_tokens) - len(hits))
        for page in hits:
            self._refcount[page] += 1
        seq = _Sequence(table=hits, token_ids=[])
        self._seqs[seq_id] = seq
        self._grow(seq, num_tokens, token_ids)
        return Allocation(tuple(self.slots(seq_id)), num_cached)

    def append(
        self, seq_id: Hashable, num_tokens: int = 1, token_ids: Sequence[int] | None = None
    ) -> AppendResult:
        """Add ``num_tokens`` tokens to ``seq_id``, taking a page only when the last one is full.

        If the last page is partial and shared, it is first replaced by a private copy, reported
        in ``copies``; full shared pages are never copied.

        Raises:
            UnknownSequence: ``seq_id`` does not exist.
            ValueError: ``num_tokens < 0`` or ``token_ids`` has the wrong length.
            CacheFull: fewer free pages than needed (counting the copy).
        """
        seq = self._get(seq_id)
        self._check_tokens(num_tokens, token_ids)
        cow = num_tokens > 0 and self._last_page_shared_partial(seq)
        new_pages = self._num_pages_for(seq.num_tokens + num_tokens) - len(seq.table)
        self._reserve(seq_id, new_pages + cow)
        copies = (self._copy_last_page(seq),) if cow else ()
        start = seq.num_tokens
        self._grow(seq, num_tokens, token_ids)
        return AppendResult(tuple(self.slots(seq_id, start)), copies)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Create ``child_id`` sharing every page of ``parent_id`` (no pages are allocated).

        Raises:
            UnknownSequence: ``parent_id`` does not exist.
            ValueError: ``child_id`` already exists.
        """
        parent = self._get(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"cannot fork {parent_id!r} into existing sequence {child_id!r}")
        for page in parent.table:
            self._refcount[page] += 1
        token_ids = None if parent.token_ids is None else list(parent.token_ids)
        self._seqs[child_id] = _Sequence(
            list(parent.table), parent.num_tokens, token_ids, list(parent.hashes)
        )

    def free(self, seq_id: Hashable) -> None:
        """Drop ``seq_id``; each page returns to the free list when no sequence refers to it.

        Raises:
            UnknownSequence: ``seq_id`` does not exist.
        """
        seq = self._get(seq_id)
        del self._seqs[seq_id]
        for page in reversed(seq.table):
            self._release(page)

    def check_invariants(self) -> None:
        """Verify the bookkeeping from scratch; raise `RuntimeError` naming the first violation."""
        references = [0] * self.num_pages
        for seq_id, seq in self._seqs.items():
            self._check_sequence(seq_id, seq)
            for page in seq.table:
                references[page] += 1
        _require(
            references == self._refcount,
            f"refcounts {self._refcount} != block-table references {references}",
        )
        free, used = set(self._free), {page for page, n in enumerate(references) if n}
        _require(len(free) == len(self._free), f"free list holds a page twice: {self._free}")
        _require(not free & used, f"pages both free and in use: {sorted(free & used)}")
        _require(len(free) + len(used) == self.num_pages, f"pages lost: {free=} {used=}")
        _require(len(self._page_info) == len(self._cached), "prefix cache and reverse map differ")
        for page_hash, page in self._cached.items():
            info = self._page_info.get(page)
            live = page in used and info is not None and info.hash == page_hash
            _require(live, f"prefix cache entry {page_hash} -> page {page} is stale")

    def _check_sequence(self, seq_id: Hashable, seq: _Sequence) -> None:
        pages = self._num_pages_for(seq.num_tokens)
        _require(len(seq.table) == pages, f"{seq_id!r}: {seq.table} for {seq.num_tokens} tokens")
        _require(len(set(seq.table)) == pages, f"{seq_id!r} holds a page twice: {seq.table}")
        full = seq.num_tokens // self.page_size
        if seq.token_ids is not None:
            _require(len(seq.token_ids) == seq.num_tokens, f"{seq_id!r}: token ids out of step")
            _require(len(seq.hashes) == full, f"{seq_id!r}: {len(seq.hashes)} hashes, {full} full")
        _require(len(seq.hashes) <= full, f"{seq_id!r}: hash for a partial page")

    # ---- internals ----------------------------------------------------------------------------

    def _get(self, seq_id: Hashable) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise UnknownSequence(
                f"unknown sequence {seq_id!r} (never allocated or freed)"
            ) from None

    def _num_pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _check_tokens(self, num_tokens: int, token_ids: Sequence[int] | None) -> None:
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        if token_ids is not None and len(token_ids) != num_tokens:
            raise ValueError(f"got {len(token_ids)} token_ids for num_tokens={num_tokens}")

    def _reserve(self, seq_id: Hashable, pages_needed: int) -> None:
        if pages_needed > len(self._free):
            raise CacheFull(
                f"sequence {seq_id!r} needs {pages_needed} pages but only {len(self._free)} of "
                f"{self.num_pages} are free"
            )

    def _cached_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Physical pages of the longest cached run of leading full pages (read-only)."""
        pages: list[int] = []
        parent_hash: int | None = None
        for i in range(len(token_ids) // self.page_size):
            tokens = tuple(token_ids[i * self.page_size : (i + 1) * self.page_size])
            parent_hash = self._hash_fn(parent_hash, tokens)
            page = self._cached.get(parent_hash)
            parent = pages[-1] if pages else None
            # token-equality guard: a hash hit alone never aliases two different prefixes
            if page is None or self._page_info[page] != (parent_hash, tokens, parent):
                break
            pages.append(page)
        return pages

    def _last_page_shared_partial(self, seq: _Sequence) -> bool:
        partial = seq.num_tokens % self.page_size != 0
        return partial and self._refcount[seq.table[-1]] >= 2

    def _copy_last_page(self, seq: _Sequence) -> PageCopy:
        src, dst = seq.table[-1], self._free.pop()
        self._refcount[src] -= 1
        self._refcount[dst] = 1
        seq.table[-1] = dst
        return PageCopy(src, dst, seq.num_tokens % self.page_size)

    def _grow(self, seq: _Sequence, num_tokens: int, token_ids: Sequence[int] | None) -> None:
        """Record ``num_tokens`` more tokens; pages were reserved by the caller."""
        seq.num_tokens += num_tokens
        while len(seq.table) < self._num_pages_for(seq.num_tokens):
            page = self._free.pop()
            self._refcount[page] = 1
            seq.table.append(page)
        if token_ids is None:
            if num_tokens:
                seq.token_ids = None  # history unknown from here on: no more prefix caching
        elif seq.token_ids is not None:
            seq.token_ids.extend(token_ids)
        self._index_full_pages(seq)

    def _index_full_pages(self, seq: _Sequence) -> None:
        """Hash newly full pages of ``seq`` and enter them in the prefix cache if new."""
        if seq.token_ids is None:
            return
        size = self.page_size
        for i in range(len(seq.hashes), seq.num_tokens // size):
            tokens = tuple(seq.token_ids[i * size : (i + 1) * size])
            page_hash = self._hash_fn(seq.hashes[-1] if i else None, tokens)
            seq.hashes.append(page_hash)
            page = seq.table[i]
            if page_hash not in self._cached and page not in self._page_info:
                self._cached[page_hash] = page
                self._page_info[page] = _CachedPage(
                    page_hash, tokens, seq.table[i - 1] if i else None
                )

    def _release(self, page: int) -> None:
        self._refcount[page] -= 1
        if self._refcount[page] == 0:
            info = self._page_info.pop(page, None)
            if info is not None:
                del self._cached[info.hash]
            self._free.append(page)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise RuntimeError(f"page allocator invariant violated: {message}")
