"""Float64 references and the one tolerance table of the test suite.

Policy (DESIGN.md): a result's error vs the float64 reference is at most 2 x the error that the
same naive computation makes in that dtype, plus a small floor (TOLERANCE) for the cases where
the naive error happens to be tiny.
"""

from __future__ import annotations

import torch

from ringattn.kernels.attention.naive import naive_attention

# The one tolerance table: (dtype, backend) -> floor. A result may differ from the float64
# reference by at most NAIVE_MULTIPLE x (the error of the same naive computation in that dtype)
# + floor x max(1, largest finite |reference|).
NAIVE_MULTIPLE = 2.0  # DESIGN.md: <= 2 x the naive error in the same dtype
TOLERANCE = {
    # fp32 block-wise accumulation sums in another order than the reference: ~1e-6 rounding.
    (torch.float32, "torch"): 2e-5,
    # Triton fp32 dots are IEEE (input_precision="ieee"): the same bound as the torch twin.
    (torch.float32, "triton"): 2e-5,
    # fp16: the floor (~1/10 ulp at 1.0) only guards elements that naive fp16 rounds exactly.
    (torch.float16, "torch"): 1e-4,
    (torch.float16, "triton"): 1e-4,
    # bf16 keeps 8 mantissa bits: the floor is ~1/4 ulp at 1.0, for the same reason.
    (torch.bfloat16, "torch"): 1e-3,
    (torch.bfloat16, "triton"): 1e-3,
}


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |actual - expected|, treating matching infinities (-inf lse rows) as equal; NaN or a
    mismatched infinity gives inf."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    if not torch.equal(torch.isinf(a), torch.isinf(e)):
        return float("inf")
    same_inf = torch.isinf(a) & (a == e)
    diff = torch.where(same_inf, 0.0, a - e).abs().nan_to_num(float("inf"))
    return float(diff.max()) if diff.numel() else 0.0


def bound(dtype: torch.dtype, backend: str, naive_err: float = 0.0, scale: float = 1.0) -> float:
    """The allowed error for a result in `dtype` by `backend`; `scale` is the reference's largest
    finite magnitude (see `magnitude`)."""
    return NAIVE_MULTIPLE * naive_err + TOLERANCE[(dtype, backend)] * max(1.0, scale)


def magnitude(ref: torch.Tensor) -> float:
    """Largest finite |ref| (0 for an all-infinite or empty tensor)."""
    finite = ref[torch.isfinite(ref)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def assert_within_policy(
    name: str, actual, ref64, naive_lowp, dtype: torch.dtype, backend: str
) -> None:
    """Error vs the float64 reference within `bound` (scaled by the reference's magnitude)."""
    err, naive_err = max_err(actual, ref64), max_err(naive_lowp, ref64)
    allowed = bound(dtype, backend, naive_err, magnitude(ref64))
    assert err <= allowed, f"{name}: error {err:.3g} > bound {allowed:.3g} (naive {naive_err:.3g})"


def reference_attention(q, k, v, *, scale, offset, do=None, dtype=torch.float64):
    """Naive attention in `dtype` (with autograd): (out, lse, (dq, dk, dv) or None)."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = naive_attention(q, k, v, scale=scale, offset=offset, dtype=dtype)
    grads = None
    if do is not None:
        out.backward(do.to(dtype))
        grads = (q.grad, k.grad, v.grad)
    return out.detach(), lse.detach(), grads
