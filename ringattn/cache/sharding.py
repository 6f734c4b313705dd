"""A paged KV cache whose sequences are spread over the W ranks of a group.

Cached keys are all visible to every later query, so their order inside the cache does not
matter: a sequence's tokens can sit on any rank, and attention over them is the LSE merge of
each rank's partial (`ringattn.cache.decode`). Where each token goes:

Prefill of a prompt of S tokens (`ShardedKVCache.begin_prefill`), in two parts:

    ring part    tokens [0, R), R = ring_prefill_len(S): ring attention over `layout`; rank r
                 caches the R / W tokens that the layout assigns to it.
    chunk part   tokens [R, S), 1 <= S - R <= m: fed as one chunk of new tokens (like decode,
                 Sq = S - R), placed by the decode policy below.

    R = m * floor((S - 1) / m),   m = required multiple of the layout (zigzag: 2W)

Holding back the tail makes any prompt length work without padding (the ring needs R % m == 0),
and the chunk's logits, the last prompt token's included, come out on every rank without a
broadcast. Prompts of different lengths are prefilled one call per length.

Decode (`ShardedKVCache.begin_step`): the tokens after the ring part, t = 0, 1, 2, ... (counted
from R), go page-interleaved round robin, a page's worth to each rank in turn:

    owner(t) = (t // page_size) % W

so after A such tokens, the tokens of the sequence that live on rank r are (closed form,
`tokens_on_rank`):

    R / W  +  page_size * (A // (page_size * W))  +  clamp(A % (page_size * W) - r * page_size,
                                                           0, page_size)

No two ranks differ by more than page_size tokens of one sequence, however long it grows.

Bookkeeping: every rank keeps R and A of every sequence (the same numbers on every rank, so a
bad sequence id raises on every rank before any collective) and its own `PageAllocator`. All
methods that change the cache are collective: every rank of the group calls them with the same
arguments.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ringattn.cache.allocator import CacheFull, UnknownSequence
from ringattn.cache.collectives import gather_ints
from ringattn.cache.pool import PagePool
from ringattn.layout import check_layout, group_rank_and_size, positions, required_multiple


def ring_prefill_len(prompt_len: int, *, layout: str, world_size: int) -> int:
    """R: how many leading prompt tokens go through ring attention (a multiple of the layout's
    multiple, leaving 1..multiple tokens for the chunk part)."""
    if prompt_len < 1:
        raise ValueError(f"prompt length must be >= 1, got {prompt_len}")
    multiple = required_multiple(layout, world_size)
    return (prompt_len - 1) // multiple * multiple


def decode_owner(t: int, *, world_size: int, page_size: int) -> int:
    """Rank that caches token t after the ring part (t counts from R)."""
    return (t // page_size) % world_size


def tokens_on_rank(
    ring_len: int, appended: int, rank: int, *, world_size: int, page_size: int
) -> int:
    """How many tokens of a sequence live on `rank`: closed form of the policy (module doc).

    Args:
        ring_len: R, tokens cached by ring prefill (a multiple of world_size).
        appended: A, tokens cached after them (prefill chunk, decode, speculative chunks).
        rank, world_size, page_size: the group and the pool's page size.
    """
    block = page_size * world_size
    partial = min(page_size, max(0, appended % block - rank * page_size))
    return ring_len // world_size + page_size * (appended // block) + partial


@dataclass
class _SeqInfo:
    ring_len: int  # R: tokens cached by ring prefill
    appended: int  # A: tokens cached after them, placed by `decode_owner`


@dataclass(frozen=True)
class PrefillPlan:
    """What `begin_prefill` decided for the ring part of B prompts (same length)."""

    seq_ids: tuple[Hashable, ...]
    ring_len: int  # R: tokens prefilled by ring attention; the caller feeds the rest as a chunk
    layout: str
    # positions: [local token i] -> global position, this rank's R / W tokens in layout order
    positions: torch.Tensor
    # slot mapping: [b, local token i] -> flat slot page * page_size + offset on this rank
    slots: torch.Tensor


@dataclass(frozen=True)
class StepPlan:
    """What `begin_step` decided for Sq new tokens of each of B sequences."""

    seq_ids: tuple[Hashable, ...]
    num_new: int  # Sq
    # positions: [b, j] -> global position of new token j of sequence b
    positions: torch.Tensor
    # block table: [b, logical page] -> physical page on this rank (int32, padded with page 0)
    block_tables: torch.Tensor
    # context lens: [b] -> tokens of sequence b cached on this rank before this step (int32)
    context_lens: torch.Tensor
    # write rows: [n] -> flat index b * Sq + j of each new token that this rank caches
    write_rows: torch.Tensor
    # write slots: [n] -> flat slot page * page_size + offset of that token on this rank
    write_slots: torch.Tensor


class ShardedKVCache:
    """The paged KV cache of a group: one `PagePool` per rank, sequences spread by the policy.

    Args:
        pool: this rank's pool.
        group: the ranks the cache spans (None: the world group, or a single process).
    """

    def __init__(self, pool: PagePool, *, group: dist.ProcessGroup | None = None) -> None:
        self.pool = pool
        self.group = group
        self.rank, self.world_size = group_rank_and_size(group)
        # sequences: seq_id -> (R, A), the same on every rank
        self._seqs: dict[Hashable, _SeqInfo] = {}

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        *,
        num_pages: int,
        page_size: int,
        group: dist.ProcessGroup | None = None,
    ) -> ShardedKVCache:
        """A cache shaped for a Llama-style `model` (config: n_layers, n_kv_heads, head_dim),
        in the dtype and on the device of its parameters; `num_pages` pages on each rank."""
        c, param = model.config, next(model.parameters())
        pool = PagePool(
            num_layers=c.n_layers,
            num_pages=num_pages,
            page_size=page_size,
            num_kv_heads=c.n_kv_heads,
            head_dim=c.head_dim,
            dtype=param.dtype,
            device=param.device,
        )
        return cls(pool, group=group)

    # ---- queries ------------------------------------------------------------------------------

    @property
    def sequences(self) -> tuple[Hashable, ...]:
        return tuple(self._seqs)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def seq_len(self, seq_id: Hashable) -> int:
        """Tokens of `seq_id` cached over all ranks (the position of its next token)."""
        info = self._get(seq_id)
        return info.ring_len + info.appended

    def split(self, seq_id: Hashable) -> tuple[int, int]:
        """(R, A): tokens of `seq_id` cached by ring prefill, and after them."""
        info = self._get(seq_id)
        return info.ring_len, info.appended

    def tokens_on_rank(self, seq_id: Hashable, rank: int) -> int:
        """Tokens of `seq_id` on `rank`, from the closed form (no communication)."""
        info = self._get(seq_id)
        return tokens_on_rank(
            info.ring_len,
            info.appended,
            rank,
            world_size=self.world_size,
            page_size=self.pool.page_size,
        )

    def local_tokens(self, seq_id: Hashable) -> int:
        """Tokens of `seq_id` that this rank's allocator holds."""
        self._get(seq_id)
        return self.pool.allocator.num_tokens(seq_id)

    # ---- collective operations ----------------------------------------------------------------

    def begin_prefill(
        self, seq_ids: Sequence[Hashable], prompt_len: int, *, layout: str = "zigzag"
    ) -> PrefillPlan:
        """Create `seq_ids` and allocate the ring part of their prompts (`prompt_len` tokens
        each) on every rank. Collective.

        The caller runs ring attention over the plan's positions, writes each layer's K/V at
        `plan.slots`, then feeds tokens [plan.ring_len, prompt_len) through `begin_step`.

        Raises:
            ValueError: a duplicate or existing sequence id, prompt_len < 1, unknown layout.
            CacheFull: some rank lacks pages (raised on every rank; nothing changed).
        """
        seq_ids = _unique(seq_ids)
        check_layout(layout)
        taken = [s for s in seq_ids if s in self._seqs]
        if taken:
            raise ValueError(f"sequences {taken} already exist")
        ring_len = ring_prefill_len(prompt_len, layout=layout, world_size=self.world_size)
        local = ring_len // self.world_size
        alloc = self.pool.allocator
        self._check_capacity(len(seq_ids) * -(-local // alloc.page_size), what="prefill")
        slots = []
        for s in seq_ids:
            slots.append(self.pool.flat_slots(alloc.allocate(s, local).slots))
            self._seqs[s] = _SeqInfo(ring_len, 0)
        if ring_len:
            pos = positions(ring_len, self.rank, self.world_size, layout)
        else:
            pos = torch.zeros(0, dtype=torch.int64)
        return PrefillPlan(
            seq_ids,
            ring_len,
            layout,
            pos.to(self.pool.device),
            torch.stack(slots),
        )

    def begin_step(self, seq_ids: Sequence[Hashable], num_new: int) -> StepPlan:
        """Place `num_new` new tokens of each sequence by the policy and allocate this rank's
        share (with copy-on-write copies done). Collective.

        The caller attends every new token to the plan's cached prefix (`block_tables`,
        `context_lens`) and to the new tokens, then writes each layer's new K/V of rows
        `write_rows` at `write_slots`.

        Raises:
            UnknownSequence: a sequence id that was never created or was freed.
            ValueError: duplicate sequence ids, num_new < 1.
            CacheFull: some rank lacks pages (raised on every rank; nothing changed).
        """
        seq_ids = _unique(seq_ids)
        if num_new < 1:
            raise ValueError(f"num_new must be >= 1, got {num_new}")
        infos = [self._get(s) for s in seq_ids]
        page, world, alloc = self.pool.page_size, self.world_size, self.pool.allocator
        mine = [
            [
                j
                for j in range(num_new)
                if decode_owner(info.appended + j, world_size=world, page_size=page) == self.rank
            ]
            for info in infos
        ]
        need = sum(alloc.pages_needed(s, len(m)) for s, m in zip(seq_ids, mine, strict=True))
        self._check_capacity(need, what="decode step")
        context_lens = [alloc.num_tokens(s) for s in seq_ids]
        pos = [[info.ring_len + info.appended + j for j in range(num_new)] for info in infos]
        rows, slots = [], []
        for b, (s, m, info) in enumerate(zip(seq_ids, mine, infos, strict=True)):
            result = alloc.append(s, len(m))
            self.pool.copy_pages(result.copies)
            rows += [b * num_new + j for j in m]
            slots += result.slots
            info.appended += num_new
        device = self.pool.device
        return StepPlan(
            seq_ids,
            num_new,
            torch.tensor(pos, dtype=torch.int64, device=device),
            self.pool.block_tables(seq_ids),
            torch.tensor(context_lens, dtype=torch.int32, device=device),
            torch.tensor(rows, dtype=torch.int64, device=device),
            self.pool.flat_slots(slots),
        )

    def fork(self, seq_id: Hashable, new_seq_id: Hashable) -> None:
        """`new_seq_id` continues from `seq_id`'s cache, sharing its pages on every rank until a
        write into a shared partial page copies it. No communication; call on every rank.

        Raises:
            UnknownSequence: `seq_id` does not exist.
            ValueError: `new_seq_id` exists.
        """
        info = self._get(seq_id)
        if new_seq_id in self._seqs:
            raise ValueError(f"cannot fork {seq_id!r} into existing sequence {new_seq_id!r}")
        self.pool.allocator.fork(seq_id, new_seq_id)
        self._seqs[new_seq_id] = _SeqInfo(info.ring_len, info.appended)

    def free(self, seq_id: Hashable) -> None:
        """Drop `seq_id` on this rank (call on every rank); its unshared pages become free.

        Raises:
            UnknownSequence: `seq_id` does not exist.
        """
        self._get(seq_id)
        self.pool.allocator.free(seq_id)
        del self._seqs[seq_id]

    # ---- internals ----------------------------------------------------------------------------

    def _get(self, seq_id: Hashable) -> _SeqInfo:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise UnknownSequence(
                f"unknown sequence {seq_id!r} (never prefilled, or freed)"
            ) from None

    def _check_capacity(self, pages_needed: int, *, what: str) -> None:
        """CacheFull on every rank unless every rank has `pages_needed` (its own) free pages."""
        free = self.pool.allocator.num_free
        every = gather_ints([pages_needed, free], group=self.group)
        short = [
            f"rank {r} needs {n} pages, has {f} free" for r, (n, f) in enumerate(every) if n > f
        ]
        if short:
            detail = ", ".join(short)
            raise CacheFull(f"{what}: {detail} (of {self.pool.num_pages} per rank)")


def _unique(seq_ids: Sequence[Hashable]) -> tuple[Hashable, ...]:
    seq_ids = tuple(seq_ids)
    if not seq_ids:
        raise ValueError("no sequence ids given")
    if len(set(seq_ids)) != len(seq_ids):
        raise ValueError(f"duplicate sequence ids in {seq_ids}")
    return seq_ids
