"""The Triton block-attention kernels against their torch twin and a float64 naive reference.

On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py), float32 and float16 only:
the interpreter's bf16 `tl.dot` is broken, so bf16 is covered by benchmarks/gpu_flash.py.
Interpreter tiles: forward/dQ 32 x 64, dK/dV 64 x 32 (BLOCK_M x BLOCK_N), so the lengths below
give several blocks, partial tail blocks, and blocks that straddle the diagonal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from ringattn.kernels.attention import torch_impl
from ringattn.kernels.attention.naive import naive_attention
from tests._reference import assert_within_policy

pytestmark = pytest.mark.triton

triton_impl = pytest.importorskip("ringattn.kernels.attention.triton_impl")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tolerances: the suite's one table, tests/_reference.py (TOLERANCE, bound).
DTYPES_TESTED = (torch.float32, torch.float16)
DTYPES = [pytest.param(dt, id=str(dt).removeprefix("torch.")) for dt in DTYPES_TESTED]


@dataclass(frozen=True)
class Case:
    b: int
    sq: int
    sk: int
    hq: int
    hkv: int
    d: int
    offset: int | None
    strided: bool = False  # inputs are [B, H, S, D] memory viewed as BSHD (non-contiguous)

    def __str__(self) -> str:
        s = f"B{self.b}-Sq{self.sq}-Sk{self.sk}-H{self.hq}-{self.hkv}-D{self.d}-off{self.offset}"
        return s + ("-strided" if self.strided else "")


CASES = [
    Case(1, 37, 37, 4, 2, 40, 0),  # GQA, D 40 padded to 64, top-left causal
    Case(2, 65, 130, 2, 1, 16, 65, strided=True),  # MQA, bottom-right (Sk - Sq), strided inputs
    Case(2, 65, 130, 2, 1, 16, None),  # no mask, Sk tail block
    Case(1, 37, 37, 4, 2, 40, -1),  # negative offset: row 0 sees no key
    Case(1, 50, 40, 2, 2, 96, -40),  # D 96; rows 0..39, the whole first query block, see nothing
    Case(1, 33, 17, 4, 1, 16, -16),  # MQA, Sk < Sq bottom-right: rows 0..15 see nothing
]
CASE_PARAMS = [pytest.param(c, id=str(c)) for c in CASES]


def _randn(b: int, s: int, h: int, d: int, dtype, gen, strided: bool) -> torch.Tensor:
    if strided:
        return torch.randn(b, h, s, d, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    return torch.randn(b, s, h, d, generator=gen).to(DEVICE, dtype)


def _inputs(case: Case, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    q = _randn(case.b, case.sq, case.hq, case.d, dtype, gen, case.strided)
    k = _randn(case.b, case.sk, case.hkv, case.d, dtype, gen, case.strided)
    v = _randn(case.b, case.sk, case.hkv, case.d, dtype, gen, case.strided)
    do = _randn(case.b, case.sq, case.hq, case.d, dtype, gen, case.strided)
    return q, k, v, do


def _naive(q, k, v, do, *, scale, offset, dtype):
    """Naive attention computed on CPU in `dtype`: out, lse, (dq, dk, dv)."""
    leaves = [t.detach().cpu().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = naive_attention(*leaves, scale=scale, offset=offset, dtype=dtype)
    out.backward(do.cpu().to(dtype))
    return out.detach(), lse.detach(), tuple(t.grad for t in leaves)


def _visible(sq: int, sk: int, offset: int | None) -> torch.Tensor:
    """[Sq, Sk] True where query row i sees key j."""
    rows, cols = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
    return torch.ones(sq, sk, dtype=torch.bool) if offset is None else cols <= rows + offset


def _assert_close(name: str, actual, ref64, naive_lowp, dtype) -> None:
    assert_within_policy(name, actual, ref64, naive_lowp, dtype, "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_forward(case: Case, dtype: torch.dtype) -> None:
    q, k, v, _ = _inputs(case, dtype)
    scale = case.d**-0.5
    out, lse = triton_impl.attention_fwd(q, k, v, scale=scale, offset=case.offset)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (case.b, case.hq, case.sq) and lse.dtype == torch.float32
    twin_out, twin_lse = torch_impl.attention_fwd(q, k, v, scale=scale, offset=case.offset)
    do = torch.zeros_like(q)
    ref_out, ref_lse, _ = _naive(q, k, v, do, scale=scale, offset=case.offset, dtype=torch.float64)
    low_out, low_lse, _ = _naive(q, k, v, do, scale=scale, offset=case.offset, dtype=dtype)
    for impl, (o, lse_) in {"triton": (out, lse), "torch": (twin_out, twin_lse)}.items():
        _assert_close(f"{impl} out", o, ref_out, low_out, dtype)
        _assert_close(f"{impl} lse", lse_, ref_lse, low_lse, dtype)

    blind = ~_visible(case.sq, case.sk, case.offset).any(1)  # [Sq] rows that see no key
    out, lse = out.cpu(), lse.cpu()
    assert torch.all(out[:, blind] == 0)
    assert torch.all(lse[:, :, blind] == -math.inf)
    assert torch.isfinite(lse[:, :, ~blind]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_backward(case: Case, dtype: torch.dtype) -> None:
    """attention_bwd with the block's own lse and delta is the exact backward."""
    q, k, v, do = _inputs(case, dtype)
    scale, offset = case.d**-0.5, case.offset
    out, lse = triton_impl.attention_fwd(q, k, v, scale=scale, offset=offset)
    delta = triton_impl.attention_delta(do, out)
    # delta: one fp32 row sum of D products per row, in a different order than torch's.
    torch.testing.assert_close(delta, torch_impl.attention_delta(do, out), rtol=1e-5, atol=1e-5)
    grads = triton_impl.attention_bwd(do, q, k, v, lse, delta, scale=scale, offset=offset)

    twin_out, twin_lse = torch_impl.attention_fwd(q, k, v, scale=scale, offset=offset)
    twin_delta = torch_impl.attention_delta(do, twin_out)
    twin = torch_impl.attention_bwd(do, q, k, v, twin_lse, twin_delta, scale=scale, offset=offset)
    *_, ref = _naive(q, k, v, do, scale=scale, offset=offset, dtype=torch.float64)
    *_, low = _naive(q, k, v, do, scale=scale, offset=offset, dtype=dtype)
    for name, g, t, r, lo, like in zip(
        ("dq", "dk", "dv"), grads, twin, ref, low, (q, k, v), strict=True
    ):
        assert g.shape == like.shape and g.dtype == torch.float32
        _assert_close(f"triton {name}", g, r, lo, dtype)
        _assert_close(f"torch {name}", t, r, lo, dtype)

    vis = _visible(case.sq, case.sk, offset)
    dq, dk, dv = (g.cpu() for g in grads)
    assert torch.all(dq[:, ~vis.any(1)] == 0)  # rows that see no key
    assert torch.all(dk[:, ~vis.any(0)] == 0) and torch.all(dv[:, ~vis.any(0)] == 0)


def _merge(o1, lse1, o2, lse2):
    """Merge two partial attentions over disjoint key sets: [B, S, H, D] fp32, [B, H, S]."""
    lse = torch.logaddexp(lse1, lse2)  # -inf for rows that see neither part
    safe = torch.where(torch.isinf(lse), 0.0, lse)
    w1 = torch.exp(lse1 - safe).transpose(1, 2)[..., None]  # [B, S, H, 1]
    w2 = torch.exp(lse2 - safe).transpose(1, 2)[..., None]
    return o1 * w1 + o2 * w2, lse


EXTERNAL_CASES = [pytest.param(c, id=str(c)) for c in (CASES[0], CASES[1], CASES[4])]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", EXTERNAL_CASES)
def test_backward_external_lse(case: Case, dtype: torch.dtype) -> None:
    """Split the keys in two halves, as a two-step ring would: with the merged lse and
    delta = rowsum(dO * O_merged), the halves' dq sum to the full dq and their dk/dv concatenate
    to the full dk/dv."""
    q, k, v, do = _inputs(case, dtype)
    scale, offset, half = case.d**-0.5, case.offset, case.sk // 2
    parts = [
        (k[:, :half], v[:, :half], offset),
        (k[:, half:], v[:, half:], None if offset is None else offset - half),  # keys from half
    ]
    partials = [
        triton_impl.attention_fwd(q, kp, vp, scale=scale, offset=off, out_dtype=torch.float32)
        for kp, vp, off in parts
    ]
    out, lse = _merge(*partials[0], *partials[1])
    delta = triton_impl.attention_delta(do, out)
    grads = [
        triton_impl.attention_bwd(do, q, kp, vp, lse, delta, scale=scale, offset=off)
        for kp, vp, off in parts
    ]
    dq = grads[0][0] + grads[1][0]
    dk = torch.cat([grads[0][1], grads[1][1]], dim=1)
    dv = torch.cat([grads[0][2], grads[1][2]], dim=1)

    *_, ref = _naive(q, k, v, do, scale=scale, offset=offset, dtype=torch.float64)
    *_, low = _naive(q, k, v, do, scale=scale, offset=offset, dtype=dtype)
    for name, g, r, lo in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, low, strict=True):
        assert not g.isnan().any(), f"{name} has NaN"
        _assert_close(f"split {name}", g, r, lo, dtype)


def test_head_dim_over_256_raises() -> None:
    q = torch.zeros(1, 4, 1, 264, device=DEVICE)
    with pytest.raises(ValueError, match="256"):
        triton_impl.attention_fwd(q, q, q, scale=1.0, offset=None)
