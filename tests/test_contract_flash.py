"""Contract tests for `flash_attn` and `merge_partials`, written from DESIGN.md alone.

Every check compares against `reference_attention`, a naive softmax attention written here (not
imported from the library), run in float64 on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from ringattn import flash_attn, merge_partials
from tests._reference import bound as tolerance_bound

NEG_INF = float("-inf")


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive attention computed entirely in `dtype`.

    q: [B, Sq, Hq, D]; k, v: [B, Sk, Hkv, D]; key_mask: optional [Sk] bool, keys allowed.
    Causal is bottom-right aligned: query i sees key j iff j <= i + Sk - Sq.
    Returns out [B, Sq, Hq, D] and lse [B, Hq, Sq] (natural log), both in `dtype`; a query row
    that sees no key gets out 0 and lse -inf. Differentiable in q, k, v through `out`.
    """
    _, seq_q, heads_q, head_dim = q.shape
    seq_k, heads_kv = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    q, k, v = (t.to(dtype) for t in (q, k, v))
    k = k.repeat_interleave(heads_q // heads_kv, dim=2)  # [B, Sk, Hq, D]
    v = v.repeat_interleave(heads_q // heads_kv, dim=2)  # [B, Sk, Hq, D]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale  # [B, Hq, Sq, Sk]
    visible = torch.ones(seq_q, seq_k, dtype=torch.bool)  # [Sq, Sk]
    if causal:
        rows = torch.arange(seq_q)[:, None]
        cols = torch.arange(seq_k)[None, :]
        visible = cols <= rows + seq_k - seq_q
    if key_mask is not None:
        visible = visible & key_mask[None, :]
    scores = scores.masked_fill(~visible, NEG_INF)
    row_max = scores.amax(dim=-1, keepdim=True).detach()  # [B, Hq, Sq, 1]
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)  # masked keys -> exp(-inf) = 0
    denom = weights.sum(dim=-1, keepdim=True)  # [B, Hq, Sq, 1]
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, Sq, Hq, D]
    lse = (torch.log(denom.detach()) + row_max).squeeze(-1)  # [B, Hq, Sq]; log 0 = -inf
    return out, lse


# Tolerances: the suite's one table, tests/_reference.py (TOLERANCE, bound).
DTYPES_TESTED = (torch.float32, torch.float16, torch.bfloat16)


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs difference in float64; positions where both are -inf count as equal."""
    actual, expected = actual.double(), expected.double()
    both_inf = torch.isinf(actual) & torch.isinf(expected) & (actual == expected)
    diff = (actual - expected).abs().masked_fill(both_inf, 0.0)
    if diff.numel() == 0:
        return 0.0
    return diff.max().item()


def assert_within_policy(
    actual: torch.Tensor,
    expected: torch.Tensor,
    naive: torch.Tensor,
    dtype: torch.dtype,
    what: str,
) -> None:
    """Assert |actual - expected| <= the tolerance bound built from the naive error."""
    assert not torch.isnan(actual).any(), f"{what}: NaN in result"
    finite = expected[torch.isfinite(expected)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    naive_err = max_error(naive, expected)
    err = max_error(actual, expected)
    bound = tolerance_bound(dtype, "torch", naive_err, scale)
    assert err <= bound, f"{what}: max err {err:.3e} > bound {bound:.3e} (naive {naive_err:.3e})"


@dataclass(frozen=True)
class Case:
    batch: int
    seq_q: int
    seq_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    causal: bool

    @property
    def id(self) -> str:
        seq = f"S{self.seq_q}" if self.seq_q == self.seq_k else f"Sq{self.seq_q}-Sk{self.seq_k}"
        heads = (
            f"H{self.heads_q}"
            if self.heads_q == self.heads_kv
            else (f"H{self.heads_q}-Hkv{self.heads_kv}")
        )
        mask = "causal" if self.causal else "full"
        return f"B{self.batch}-{seq}-{heads}-D{self.head_dim}-{mask}"


CASES = [
    Case(2, 97, 97, 4, 4, 64, True),  # odd length, MHA
    Case(1, 33, 97, 4, 2, 40, True),  # Sq < Sk bottom-right, GQA
    Case(1, 97, 33, 4, 1, 96, True),  # Sq > Sk: the first 64 rows see no key; MQA
    Case(2, 64, 64, 2, 2, 128, False),
    Case(1, 17, 45, 6, 3, 40, False),  # Sq < Sk without mask, GQA
    Case(1, 45, 17, 4, 2, 59, False),  # Sq > Sk without mask, awkward head dim
    Case(1, 1025, 1025, 1, 1, 8, True),  # long, crosses any block boundary
    Case(1, 16, 16, 2, 1, 256, True),  # the largest allowed head dim
    Case(2, 1, 37, 4, 2, 64, True),  # one decode query: bottom-right causal sees every key
]
LOW_PRECISION_CASES = [CASES[0], CASES[1], CASES[2]]


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0):
    """Random q, k, v, dout in `dtype` (generated in float32, then rounded)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    q = randn(case.batch, case.seq_q, case.heads_q, case.head_dim)
    k = randn(case.batch, case.seq_k, case.heads_kv, case.head_dim)
    v = randn(case.batch, case.seq_k, case.heads_kv, case.head_dim)
    dout = randn(case.batch, case.seq_q, case.heads_q, case.head_dim)
    return q, k, v, dout


def run_with_grads(fn, q, k, v, dout):
    """Call fn(q, k, v) -> (out, lse) on fresh leaves; return out, lse, dq, dk, dv."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves)
    (out * dout.to(out.dtype)).sum().backward()
    return (out.detach(), lse.detach(), *(t.grad for t in leaves))


def check_against_reference(case: Case, dtype: torch.dtype, **kwargs) -> None:
    q, k, v, dout = make_inputs(case, dtype)

    def ref64(*t):
        return reference_attention(*t, causal=case.causal, dtype=torch.float64, **kwargs)

    def naive_low(*t):
        return reference_attention(*t, causal=case.causal, dtype=dtype, **kwargs)

    def flash(*t):
        return flash_attn(*t, causal=case.causal, return_lse=True, **kwargs)

    expected = run_with_grads(ref64, q.double(), k.double(), v.double(), dout.double())
    naive = run_with_grads(naive_low, q, k, v, dout)
    actual = run_with_grads(flash, q, k, v, dout)

    out, lse = actual[0], actual[1]
    assert out.dtype == dtype
    assert out.shape == q.shape
    assert lse.dtype == torch.float32
    assert lse.shape == (case.batch, case.heads_q, case.seq_q)
    for name, a, e, n in zip(
        ("out", "lse", "dq", "dk", "dv"), actual, expected, naive, strict=True
    ):
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert_within_policy(a, e, n, dtype, name)
    # -inf must be exactly where the reference has it (rows with no visible key).
    assert torch.equal(torch.isneginf(lse), torch.isneginf(expected[1]))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_flash_attn_fp32_matches_float64(case: Case) -> None:
    check_against_reference(case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=lambda c: c.id)
def test_flash_attn_low_precision_within_twice_naive_error(case: Case, dtype: torch.dtype) -> None:
    check_against_reference(case, dtype)


def test_flash_attn_custom_softmax_scale() -> None:
    check_against_reference(CASES[1], torch.float32, softmax_scale=0.37)


def test_flash_attn_default_scale_is_inverse_sqrt_head_dim() -> None:
    q, k, v, _ = make_inputs(CASES[4], torch.float32)
    default = flash_attn(q, k, v)
    explicit = flash_attn(q, k, v, softmax_scale=CASES[4].head_dim ** -0.5)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    other = flash_attn(q, k, v, softmax_scale=1.0)
    assert not torch.allclose(default, other)


def test_flash_attn_returns_only_out_by_default() -> None:
    q, k, v, _ = make_inputs(CASES[4], torch.float16)
    out = flash_attn(q, k, v)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.float16 and out.shape == q.shape


def test_flash_attn_torch_backend_matches_default_on_cpu() -> None:
    q, k, v, _ = make_inputs(CASES[1], torch.float32)
    default_out, default_lse = flash_attn(q, k, v, causal=True, return_lse=True)
    torch_out, torch_lse = flash_attn(q, k, v, causal=True, return_lse=True, backend="torch")
    torch.testing.assert_close(default_out, torch_out)
    torch.testing.assert_close(default_lse, torch_lse)


def test_flash_attn_accepts_non_contiguous_bhsd_views() -> None:
    """Projections often come as [B, H, S, D]; a transposed view must give the same answer."""
    case = CASES[1]
    q, k, v, _ = make_inputs(case, torch.float32)
    q_v, k_v, v_v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not q_v.is_contiguous()
    out = flash_attn(q_v, k_v, v_v, causal=True)
    expected, _ = reference_attention(q, k, v, causal=True)
    assert max_error(out, expected) <= 2e-5  # fp32, same bound as the table's floor


def test_flash_attn_fully_masked_rows_are_zero_with_neg_inf_lse_and_finite_grads() -> None:
    case = Case(1, 12, 5, 2, 2, 16, True)  # rows 0..6 see no key (i + 5 - 12 < 0)
    q, k, v, dout = make_inputs(case, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = flash_attn(*leaves, causal=True, return_lse=True)
    empty = case.seq_q - case.seq_k
    assert torch.all(out[:, :empty] == 0)
    assert torch.all(torch.isneginf(lse[:, :, :empty]))
    assert torch.all(torch.isfinite(lse[:, :, empty:]))
    (out * dout).sum().backward()
    for name, t in zip("qkv", leaves, strict=True):
        assert torch.all(torch.isfinite(t.grad)), f"d{name} has NaN/inf"
    assert torch.all(leaves[0].grad[:, :empty] == 0)


def test_flash_attn_gradient_for_q_only() -> None:
    """Frozen k and v (requires_grad=False) must not break the backward."""
    case = CASES[1]
    q, k, v, dout = make_inputs(case, torch.float32)
    q_leaf = q.clone().requires_grad_()
    (flash_attn(q_leaf, k, v, causal=True) * dout).sum().backward()
    q64 = q.double().requires_grad_()
    (reference_attention(q64, k, v, causal=True)[0] * dout.double()).sum().backward()
    bound = 2e-5 * max(1.0, q64.grad.abs().max().item())  # fp32 entry of the table
    assert max_error(q_leaf.grad, q64.grad) <= bound


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_attn_no_keys_gives_empty_rows(causal: bool) -> None:
    """`any Sk`: with Sk = 0 every query row sees no key (out 0, lse -inf)."""
    q = torch.randn(1, 3, 2, 8)
    k = torch.randn(1, 0, 2, 8)
    out, lse = flash_attn(q, k, k.clone(), causal=causal, return_lse=True)
    assert out.shape == q.shape and lse.shape == (1, 2, 3)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def _bad_input_cases():
    f32 = torch.float32

    def shapes(qs, ks, vs, dtypes=(f32, f32, f32)):
        return tuple(torch.randn(*s).to(d) for s, d in zip((qs, ks, vs), dtypes, strict=True))

    return {
        # id: (q, k, v, kwargs, substrings the message must quote; a tuple lists alternatives)
        "qk-head-dim-16-vs-24": (
            *shapes((1, 8, 4, 16), (1, 8, 4, 24), (1, 8, 4, 24)),
            {},
            ["16", "24"],
        ),
        "kv-seq-11-vs-13": (
            *shapes((1, 8, 4, 16), (1, 11, 4, 16), (1, 13, 4, 16)),
            {},
            ["11", "13"],
        ),
        "batch-2-vs-3": (*shapes((2, 8, 4, 16), (3, 8, 4, 16), (3, 8, 4, 16)), {}, ["2", "3"]),
        "kv-heads-2-vs-4": (*shapes((1, 8, 4, 16), (1, 8, 2, 16), (1, 8, 4, 16)), {}, ["2", "4"]),
        "heads-6-not-multiple-of-4": (
            *shapes((1, 8, 6, 16), (1, 8, 4, 16), (1, 8, 4, 16)),
            {},
            ["6", "4"],
        ),
        "dtype-fp32-vs-fp16": (
            *shapes((1, 8, 4, 16), (1, 8, 4, 16), (1, 8, 4, 16), (f32, torch.float16, f32)),
            {},
            ["float16"],
        ),
        "head-dim-264": (
            *shapes((1, 8, 2, 264), (1, 8, 2, 264), (1, 8, 2, 264)),
            {},
            ["264", "256"],
        ),
        "q-ndim-3": (
            *shapes((8, 4, 16), (1, 8, 4, 16), (1, 8, 4, 16)),
            {},
            [("3-D", "(8, 4, 16)", "[8, 4, 16]")],
        ),
        "k-ndim-5": (
            *shapes((1, 8, 4, 16), (1, 1, 8, 4, 16), (1, 8, 4, 16)),
            {},
            [("5-D", "(1, 1, 8, 4, 16)", "[1, 1, 8, 4, 16]")],
        ),
        "backend-cuda-dnn": (
            *shapes((1, 8, 4, 16), (1, 8, 4, 16), (1, 8, 4, 16)),
            {"backend": "cudnn"},
            ["cudnn"],
        ),
    }


BAD_INPUTS = _bad_input_cases()


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_flash_attn_bad_input_raises_value_error_quoting_sizes(name: str) -> None:
    q, k, v, kwargs, quoted = BAD_INPUTS[name]
    with pytest.raises(ValueError) as info:
        flash_attn(q, k, v, **kwargs)
    message = str(info.value)
    for token in quoted:
        alternatives = (token,) if isinstance(token, str) else token  # any one spelling will do
        assert any(t in message for t in alternatives), f"{message!r} does not quote {token!r}"


# ---------------------------------------------------------------- merge_partials


def _partials(key_mask_a: torch.Tensor, *, causal: bool, seed: int = 1):
    """Two float64-reference partials over complementary key sets, plus the full answer."""
    case = Case(2, 10, 14, 4, 2, 16, causal)
    q, k, v, _ = make_inputs(case, torch.float64, seed=seed)
    out_a, lse_a = reference_attention(q, k, v, causal=causal, key_mask=key_mask_a)
    out_b, lse_b = reference_attention(q, k, v, causal=causal, key_mask=~key_mask_a)
    full = reference_attention(q, k, v, causal=causal)
    return (out_a.float(), lse_a.float(), out_b.float(), lse_b.float()), full


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("split", ["halves", "random"])
def test_merge_partials_equals_attention_over_union(split: str, causal: bool) -> None:
    if split == "halves":
        key_mask_a = torch.arange(14) < 7
    else:
        key_mask_a = torch.randperm(14, generator=torch.Generator().manual_seed(3)) < 6
    (out_a, lse_a, out_b, lse_b), (out_full, lse_full) = _partials(key_mask_a, causal=causal)
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == out_a.shape and lse.shape == lse_a.shape
    assert max_error(out, out_full) <= 1e-5  # fp32 inputs: a few roundings of ~1e-7
    assert max_error(lse, lse_full) <= 1e-5  # same
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


def test_merge_partials_is_order_independent() -> None:
    key_mask_a = torch.arange(14) % 3 == 0
    (out_a, lse_a, out_b, lse_b), _ = _partials(key_mask_a, causal=True)
    out_ab, lse_ab = merge_partials(out_a, lse_a, out_b, lse_b)
    out_ba, lse_ba = merge_partials(out_b, lse_b, out_a, lse_a)
    torch.testing.assert_close(out_ab, out_ba, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lse_ab, lse_ba, rtol=1e-6, atol=1e-7)


def test_merge_partials_two_empty_partials_stay_empty_without_nan() -> None:
    out = torch.zeros(1, 3, 2, 8)
    lse = torch.full((1, 2, 3), NEG_INF)
    merged_out, merged_lse = merge_partials(out, lse, out.clone(), lse.clone())
    assert not torch.isnan(merged_out).any()
    assert torch.all(merged_out == 0)
    assert torch.all(torch.isneginf(merged_lse))


def test_merge_partials_empty_plus_non_empty_is_the_non_empty() -> None:
    gen = torch.Generator().manual_seed(5)
    out_x = torch.randn(2, 5, 3, 8, generator=gen)
    lse_x = torch.randn(2, 3, 5, generator=gen)
    out_e = torch.zeros_like(out_x)
    lse_e = torch.full_like(lse_x, NEG_INF)
    for args in ((out_x, lse_x, out_e, lse_e), (out_e, lse_e, out_x, lse_x)):
        out, lse = merge_partials(*args)
        torch.testing.assert_close(out, out_x, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse, lse_x, rtol=1e-6, atol=1e-6)


def test_merge_partials_row_wise_mix_of_empty_rows() -> None:
    """Row 0 empty in a, row 1 empty in b, row 2 empty in both, row 3 in neither."""
    gen = torch.Generator().manual_seed(7)
    out_a = torch.randn(1, 4, 2, 8, generator=gen)
    out_b = torch.randn(1, 4, 2, 8, generator=gen)
    lse_a = torch.randn(1, 2, 4, generator=gen)
    lse_b = torch.randn(1, 2, 4, generator=gen)
    for rows, out_t, lse_t in (([0, 2], out_a, lse_a), ([1, 2], out_b, lse_b)):
        out_t[:, rows] = 0
        lse_t[:, :, rows] = NEG_INF
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out[:, 0], out_b[:, 0])
    torch.testing.assert_close(out[:, 1], out_a[:, 1])
    assert torch.all(out[:, 2] == 0) and torch.all(torch.isneginf(lse[:, :, 2]))
    weight_a = torch.sigmoid(lse_a[:, :, 3] - lse_b[:, :, 3])  # [B, H]
    expected = weight_a[..., None] * out_a[:, 3] + (1 - weight_a[..., None]) * out_b[:, 3]
    torch.testing.assert_close(out[:, 3], expected)
    torch.testing.assert_close(lse[:, :, 3], torch.logaddexp(lse_a[:, :, 3], lse_b[:, :, 3]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_merge_partials_low_precision_out_returns_float32(dtype: torch.dtype) -> None:
    key_mask_a = torch.arange(14) >= 5
    (out_a, lse_a, out_b, lse_b), (out_full, _) = _partials(key_mask_a, causal=False)
    out, lse = merge_partials(out_a.to(dtype), lse_a, out_b.to(dtype), lse_b)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    # Inputs were rounded to `dtype`: the error is about one rounding (eps / 2) of each partial.
    bound = torch.finfo(dtype).eps * max(1.0, out_full.abs().max().item())
    assert max_error(out, out_full) <= bound
