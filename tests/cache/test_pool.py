"""PagePool: one rank's K/V tensors for all layers, written at flat slots; bad K/V rejected."""

from __future__ import annotations

import copy

import pytest
import torch

from ringattn.cache.allocator import PageAllocator, PageCopy
from ringattn.cache.pool import PagePool


def make_pool(**overrides) -> PagePool:
    sizes = dict(num_layers=2, num_pages=6, page_size=4, num_kv_heads=2, head_dim=8)
    pool = PagePool(**{**sizes, **overrides})
    pool.k.normal_()  # defined contents, so "unchanged" can be checked exactly
    pool.v.normal_()
    return pool


def test_shape_is_layer_major_and_dtype_follows_the_model():
    pool = make_pool(dtype=torch.float16)
    assert pool.k.shape == pool.v.shape == (2, 6, 4, 2, 8)
    assert pool.k[1].is_contiguous()  # a layer is the [P, page, Hkv, D] pool paged attention takes
    assert pool.dtype == torch.float16
    assert pool.nbytes == 2 * 2 * 6 * 4 * 2 * 8 * 2


def test_write_puts_tokens_at_their_flat_slots_in_one_layer_only():
    pool = make_pool()
    before = pool.k.clone()
    slots = pool.flat_slots([(3, 1), (0, 2)])  # page 3 slot 1, page 0 slot 2
    k, v = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    pool.write(1, slots, k, v)
    assert slots.tolist() == [13, 2]
    assert torch.equal(pool.k[1, 3, 1], k[0]) and torch.equal(pool.v[1, 0, 2], v[1])
    before[1, 3, 1], before[1, 0, 2] = k[0], k[1]
    assert torch.equal(pool.k, before)  # nothing else moved, layer 0 untouched


def test_copy_pages_copies_the_prefix_of_a_page_in_every_layer():
    pool = make_pool()
    pool.copy_pages([PageCopy(src=2, dst=5, num_tokens=3)])
    assert torch.equal(pool.k[:, 5, :3], pool.k[:, 2, :3])
    assert torch.equal(pool.v[:, 5, :3], pool.v[:, 2, :3])
    assert not torch.equal(pool.k[:, 5, 3], pool.k[:, 2, 3])


def test_block_tables_are_padded_int32():
    pool = make_pool()
    pool.allocator.allocate("a", 9)  # 3 pages
    pool.allocator.allocate("b", 0)
    tables = pool.block_tables(["a", "b"])
    assert tables.dtype == torch.int32
    assert tables.tolist() == [pool.allocator.block_table("a"), [0, 0, 0]]
    assert pool.block_tables(["b"]).shape == (1, 1)  # never zero columns


@pytest.mark.parametrize(
    ("k_shape", "dtype", "match"),
    [
        ((3, 4, 8), torch.float32, r"shape \(3, 4, 8\).*num_kv_heads=2, head_dim=8"),
        ((3, 2, 6), torch.float32, r"shape \(3, 2, 6\).*num_kv_heads=2, head_dim=8"),
        ((3, 2, 8), torch.float16, r"dtype torch.float16/torch.float16, pool dtype torch.float32"),
    ],
    ids=["heads4", "headdim6", "fp16"],
)
def test_bad_kv_raises_quoting_sizes_and_changes_nothing(k_shape, dtype, match):
    pool = make_pool()
    before = (pool.k.clone(), pool.v.clone(), copy.deepcopy(vars(pool.allocator)))
    k = torch.randn(k_shape).to(dtype)
    with pytest.raises(ValueError, match=match):
        pool.write(0, pool.flat_slots([(0, 0), (0, 1), (0, 2)]), k, k.clone())
    assert torch.equal(pool.k, before[0]) and torch.equal(pool.v, before[1])
    assert vars(pool.allocator) == before[2]


@pytest.mark.parametrize(
    ("layer", "num_slots", "match"),
    [(2, 3, "layer 2 out of range"), (0, 2, r"\(2,\) slots for k/v of shape \(3, 2, 8\)")],
    ids=["layer", "slots"],
)
def test_bad_layer_or_slot_count_raises(layer, num_slots, match):
    pool = make_pool()
    before = pool.k.clone()
    k = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match=match):
        pool.write(layer, torch.arange(num_slots), k, k)
    assert torch.equal(pool.k, before)


def test_bad_pool_sizes_raise():
    with pytest.raises(ValueError, match="head_dim"):
        PagePool(num_layers=1, num_pages=4, page_size=4, num_kv_heads=2, head_dim=0)
    with pytest.raises(ValueError, match="num_pages=0"):
        PagePool(num_layers=1, num_pages=0, page_size=4, num_kv_heads=2, head_dim=8)


def test_pages_needed_predicts_append_including_copy_on_write():
    alloc = PageAllocator(16, 4)
    alloc.allocate("a", 6)  # 2 pages, the second half full
    alloc.fork("a", "b")
    for seq, n in (("a", 0), ("a", 2), ("a", 3), ("b", 1), ("b", 7)):
        predicted = alloc.pages_needed(seq, n)
        trial = copy.deepcopy(alloc)
        free = trial.num_free
        trial.append(seq, n)
        assert free - trial.num_free == predicted, (seq, n)
