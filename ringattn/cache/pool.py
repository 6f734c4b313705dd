"""One rank's page pool: the K and V of every layer in two preallocated tensors.

    k, v: [num_layers, num_pages, page_size, num_kv_heads, head_dim]

Layer-major, so `k[layer]` is a contiguous `[num_pages, page_size, Hkv, D]` pool: exactly what
`paged_attention_fwd` takes, without a copy. All layers share one `PageAllocator`: a token has
the same (page, slot) in every layer, so pages are allocated once per token rather than once per
layer, and a copy-on-write copies a page in all layers at once. Positions are passed around as
flat slots, `page * page_size + slot`, which index `k[layer].flatten(0, 1)` (vLLM's slot
mapping).

The tensors come from `torch.empty`: a slot is read only after it was written, and the paged
kernels never read past a sequence's cached length.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import torch

from ringattn.cache.allocator import PageAllocator, PageCopy


class PagePool:
    """K/V storage of one rank plus the allocator that hands out its pages.

    Args:
        num_layers, num_pages, page_size, num_kv_heads, head_dim: the pool's shape.
        dtype, device: of the K/V tensors (the model's).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        sizes = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)
        bad = {name: n for name, n in sizes.items() if n <= 0}
        if bad:
            raise ValueError(f"pool sizes must be positive, got {bad}")
        self.allocator = PageAllocator(num_pages, page_size)
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        # k[l, p, s]: key of the token in slot s of physical page p, layer l (v: its value)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[3]

    @property
    def head_dim(self) -> int:
        return self.k.shape[4]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the K and V tensors."""
        return 2 * self.k.numel() * self.k.element_size()

    def check_kv(self, k: torch.Tensor, v: torch.Tensor, *, what: str) -> None:
        """ValueError, quoting the sizes, unless k and v are [..., num_kv_heads, head_dim] of the
        pool's dtype and device, with equal shapes."""
        if k.shape != v.shape:
            raise ValueError(f"{what}: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
        expected = (self.num_kv_heads, self.head_dim)
        if k.dim() < 2 or tuple(k.shape[-2:]) != expected:
            raise ValueError(
                f"{what}: k/v of shape {tuple(k.shape)} do not fit the pool: expected "
                f"[..., num_kv_heads={expected[0]}, head_dim={expected[1]}]"
            )
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise ValueError(f"{what}: k/v dtype {k.dtype}/{v.dtype}, pool dtype {self.dtype}")
        if k.device != self.device or v.device != self.device:
            raise ValueError(f"{what}: k/v on {k.device}, pool on {self.device}")

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V of N tokens of `layer` at flat `slots`.

        Args:
            layer: layer index.
            slots: [N] int64, flat slot `page * page_size + slot` of each token.
            k, v: [N, num_kv_heads, head_dim].

        Raises:
            ValueError: bad layer, sizes, dtype or device (quoting them); nothing is written.
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range for a pool of {self.num_layers} layers")
        self.check_kv(k, v, what="PagePool.write")
        if slots.shape != (k.shape[0],) or k.dim() != 3:
            raise ValueError(
                f"PagePool.write: {tuple(slots.shape)} slots for k/v of shape {tuple(k.shape)}; "
                "expected slots [N] and k/v [N, num_kv_heads, head_dim]"
            )
        # [num_pages, page_size, Hkv, D] -> [num_pages * page_size, Hkv, D], a view of the pool
        self.k[layer].flatten(0, 1).index_copy_(0, slots, k)
        self.v[layer].flatten(0, 1).index_copy_(0, slots, v)

    def copy_pages(self, copies: Iterable[PageCopy]) -> None:
        """Perform the allocator's copy-on-write copies, in every layer."""
        for c in copies:
            self.k[:, c.dst, : c.num_tokens] = self.k[:, c.src, : c.num_tokens]
            self.v[:, c.dst, : c.num_tokens] = self.v[:, c.src, : c.num_tokens]

    def flat_slots(self, slots: Sequence[tuple[int, int]]) -> torch.Tensor:
        """[N] int64 on the pool's device: `page * page_size + slot` of each (page, slot)."""
        flat = [page * self.page_size + slot for page, slot in slots]
        return torch.tensor(flat, dtype=torch.int64, device=self.device)

    def block_tables(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        """[B, max_pages] int32 on the pool's device: the block tables of `seq_ids` on this rank,
        for `paged_attention_fwd`. At least one column; rows are padded with page 0, which the
        kernel never reads past a sequence's length."""
        tables = [self.allocator.block_table(s) for s in seq_ids]
        width = max([1] + [len(t) for t in tables])
        # block table: [batch, logical page] -> physical page on this rank
        block_tables = torch.zeros(len(tables), width, dtype=torch.int32)
        for b, table in enumerate(tables):
            block_tables[b, : len(table)] = torch.tensor(table, dtype=torch.int32)
        return block_tables.to(self.device)
