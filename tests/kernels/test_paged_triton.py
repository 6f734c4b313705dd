"""The Triton paged decode kernel against its torch twin and a float64 dense reference.

On CPU the kernels run under TRITON_INTERPRET=1, float32 and float16 only (the interpreter's bf16
`tl.dot` is broken: bf16 is covered by benchmarks/gpu_decode.py). Under the interpreter a key
tile is 16 keys, so page size 4 takes the one-page-per-key path, 16 the tile-inside-a-page path
and 12 the path where tiles straddle pages. Every batch holds a sequence longer than a page by
far (150 keys: several splits, a partial last tile), one shorter than a page and one with no
cached key. The pool is NaN outside the sequences' keys (unused pages, slots past a sequence's
end, block-table entries past its last page), so reading a key that is not cached shows up.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch

from ringattn.kernels.attention.naive import naive_attention
from ringattn.kernels.paged import torch_impl
from tests._reference import assert_within_policy

pytestmark = pytest.mark.triton

if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

triton_impl = pytest.importorskip("ringattn.kernels.paged.triton_impl")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LONG = 150  # keys of the long sequence: 38 pages of 4, 10 of 16, 13 of 12

# Tolerances: the suite's one table, tests/_reference.py (TOLERANCE, bound).
DTYPES_TESTED = (torch.float32, torch.float16)
DTYPES = [pytest.param(dt, id=str(dt).removeprefix("torch.")) for dt in DTYPES_TESTED]


@dataclass(frozen=True)
class Case:
    hq: int
    hkv: int
    sq: int
    d: int
    page_size: int

    def __str__(self) -> str:
        return f"H{self.hq}-{self.hkv}-Sq{self.sq}-D{self.d}-P{self.page_size}"


CASES = [
    Case(4, 2, 1, 16, 4),  # GQA decode, pages smaller than a tile
    Case(4, 2, 3, 40, 16),  # GQA speculative, D 40 padded to 64, tiles inside a page
    Case(4, 1, 3, 16, 4),  # MQA, 12 tile rows
    Case(4, 1, 1, 40, 16),  # MQA decode
    Case(4, 2, 3, 40, 12),  # odd page size: tiles straddle pages
]
CASE_PARAMS = [pytest.param(c, id=str(c)) for c in CASES]


def _inputs(case: Case, dtype: torch.dtype, lens=(0, None, LONG)):
    """q, k_pages, v_pages, block_tables, context_lens for 3 sequences; None = page_size - 1."""
    gen = torch.Generator().manual_seed(0)
    lens = [case.page_size - 1 if n is None else n for n in lens]
    ps, hkv, d = case.page_size, case.hkv, case.d
    max_pages = -(-max(lens) // ps) + 1  # one spare column past the longest sequence
    num_pages = len(lens) * max_pages + 1
    k_pages = torch.randn(num_pages, ps, hkv, d, generator=gen)
    v_pages = torch.randn(num_pages, ps, hkv, d, generator=gen)
    # Random, non-contiguous page assignment; the last page is poison, also used as padding.
    order = torch.randperm(num_pages - 1, generator=gen)
    poison = num_pages - 1
    block_tables = torch.full((len(lens), max_pages), poison, dtype=torch.int32)
    used = torch.zeros(num_pages, ps, dtype=torch.bool)
    taken = 0
    for i, n in enumerate(lens):
        pages = order[taken : taken + -(-n // ps)]
        taken += len(pages)
        block_tables[i, : len(pages)] = pages.int()
        used[pages] = (torch.arange(len(pages) * ps) < n).view(-1, ps)
    k_pages[~used] = math.nan
    v_pages[~used] = math.nan
    q = torch.randn(len(lens), case.sq, case.hq, d, generator=gen)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    tensors = (q, k_pages, v_pages, block_tables, context_lens)
    return tuple(t.to(DEVICE, dtype) if t.is_floating_point() else t.to(DEVICE) for t in tensors)


def _dense(q, k_pages, v_pages, block_tables, context_lens, *, scale, dtype):
    """Gather each sequence's K/V through its block table, then naive attention in `dtype`."""
    q, k_pages, v_pages = (t.cpu() for t in (q, k_pages, v_pages))
    b, sq, hq, d = q.shape
    ps = k_pages.shape[1]
    out = torch.zeros(b, sq, hq, d, dtype=dtype)
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # as naive_attention
    lse = torch.full((b, hq, sq), -math.inf, dtype=lse_dtype)
    for i, n in enumerate(context_lens.tolist()):
        if n == 0:
            continue
        pages = block_tables[i, : -(-n // ps)].cpu().long()
        k = k_pages[pages].flatten(0, 1)[:n]  # [n, Hkv, D]
        v = v_pages[pages].flatten(0, 1)[:n]
        o, l = naive_attention(
            q[i : i + 1], k[None], v[None], scale=scale, offset=None, dtype=dtype
        )
        out[i], lse[i] = o[0], l[0]
    return out, lse


def _assert_close(name: str, actual, ref64, naive_lowp, dtype) -> None:
    assert_within_policy(name, actual, ref64, naive_lowp, dtype, "triton")


def _check(inputs, dtype, config=None) -> None:
    scale = inputs[0].shape[-1] ** -0.5
    out, lse = triton_impl.paged_attention_fwd(*inputs, scale=scale, config=config)
    q = inputs[0]
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    twin_out, twin_lse = torch_impl.paged_attention_fwd(*inputs, scale=scale)
    ref_out, ref_lse = _dense(*inputs, scale=scale, dtype=torch.float64)
    low_out, low_lse = _dense(*inputs, scale=scale, dtype=dtype)
    for impl, (o, l) in {"triton": (out, lse), "torch": (twin_out, twin_lse)}.items():
        _assert_close(f"{impl} out", o, ref_out, low_out, dtype)
        _assert_close(f"{impl} lse", l, ref_lse, low_lse, dtype)
    empty = (inputs[4] == 0).cpu()
    assert torch.all(out[empty].cpu() == 0) and torch.all(lse[empty].cpu() == -math.inf)
    assert torch.isfinite(lse[~empty].cpu()).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_paged_decode(case: Case, dtype: torch.dtype) -> None:
    inputs = _inputs(case, dtype)
    if triton_impl._INTERPRET:  # the interpreter's default splits these sequences (GPU: not)
        assert triton_impl.decode_config(*inputs[:2], inputs[3]).num_splits > 1
    _check(inputs, dtype)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(triton_impl.DecodeConfig(block_n=32, num_splits=1), id="N32-splits1"),
        pytest.param(triton_impl.DecodeConfig(block_n=16, num_splits=7), id="N16-splits7"),
    ],
)
def test_split_counts(config) -> None:
    """One split (the kernel writes out/lse itself) and more splits than some sequences have
    tiles (empty splits merge to nothing, never NaN)."""
    case = Case(4, 2, 3, 40, 16)
    _check(_inputs(case, torch.float32, lens=(LONG, 0, 40)), torch.float32, config)


def test_split_heuristic() -> None:
    """The documented choices on a 132-SM GPU, and no split of a context shorter than the
    minimum split length."""
    assert triton_impl._num_splits(8 * 8, 131072, 132) == 6
    assert triton_impl._num_splits(1 * 8, 1 << 20, 132) == 33
    assert triton_impl._num_splits(1, triton_impl._MIN_SPLIT_KEYS, 132) == 1


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((1, 1, 6, 16), (4, 4, 4, 16)), "Hq % Hkv"),
        (((1, 1, 4, 264), (4, 4, 4, 264)), "256"),
        (((1, 1, 4, 16), (4, 4, 2, 32)), "head dims"),
    ],
    ids=["heads", "head-dim-256", "head-dim-mismatch"],
)
def test_bad_input_raises(shapes, match) -> None:
    q, pages = (torch.zeros(s, device=DEVICE) for s in shapes)
    tables = torch.zeros(1, 2, dtype=torch.int32, device=DEVICE)
    lens = torch.ones(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        triton_impl.paged_attention_fwd(q, pages, pages, tables, lens, scale=1.0)
