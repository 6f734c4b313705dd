"""Float64 references and the one tolerance table of the test suite.

Policy (DESIGN.md): float32 results must be within an absolute bound of the float64 reference;
float16/bfloat16 results within 2 x the error that the same naive computation makes in that
dtype, plus a small floor for the cases where the naive error happens to be tiny.
"""

from __future__ import annotations

import torch

from ringattn.kernels.attention.naive import naive_attention

# (dtype, backend) -> absolute bound (float32) or floor added to 2 x naive error (fp16/bf16).
TOLERANCE = {
    # fp32 block-wise accumulation over a few hundred keys of unit-scale values: ~1e-6 rounding.
    (torch.float32, "torch"): 2e-5,
    # Triton fp32 dots are IEEE (input_precision="ieee"), so the same bound as the torch twin.
    (torch.float32, "triton"): 2e-5,
    # fp16 inputs, fp32 accumulation: only the final cast to fp16 is lossy; floor = 1 fp16 ulp at 1.
    (torch.float16, "torch"): 1e-3,
    (torch.float16, "triton"): 1e-3,
    # bf16 keeps 8 mantissa bits: floor = 1 bf16 ulp at magnitude 1.
    (torch.bfloat16, "torch"): 8e-3,
    (torch.bfloat16, "triton"): 8e-3,
}


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |actual - expected|, treating matching infinities (-inf lse rows) as equal."""
    a, e = actual.detach().double(), expected.detach().double()
    if not torch.equal(torch.isinf(a), torch.isinf(e)):
        return float("inf")
    same_inf = torch.isinf(a) & (a == e)
    diff = torch.where(same_inf, 0.0, a - e).abs()
    return float(diff.max()) if diff.numel() else 0.0


def bound(dtype: torch.dtype, backend: str, naive_lowp_err: float | None = None) -> float:
    """The allowed error for a result in `dtype` computed by `backend`."""
    floor = TOLERANCE[(dtype, backend)]
    if dtype == torch.float32:
        return floor
    assert naive_lowp_err is not None, "fp16/bf16 bounds are relative to the naive error"
    return 2 * naive_lowp_err + floor


def reference_attention(q, k, v, *, scale, offset, do=None, dtype=torch.float64):
    """Naive attention in `dtype` (with autograd): (out, lse, (dq, dk, dv) or None)."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = naive_attention(q, k, v, scale=scale, offset=offset, dtype=dtype)
    grads = None
    if do is not None:
        out.backward(do.to(dtype))
        grads = (q.grad, k.grad, v.grad)
    return out.detach(), lse.detach(), grads
