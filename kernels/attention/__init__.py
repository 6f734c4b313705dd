"""The block-attention op: `(q, k, v, scale, causal offset) -> (out, lse)` and its backward.

Two implementations with one signature: `torch_impl` (CPU backend, readable reference) and
`triton_impl` (GPU; CPU too under TRITON_INTERPRET=1). `naive` is the dense test reference.
"""

from __future__ import annotations

import os

import torch

from . import torch_impl

BACKENDS = ("triton", "torch")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """`None` picks triton for CUDA tensors (and under TRITON_INTERPRET=1 is still torch on CPU)."""
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS} or None")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {device}) or TRITON_INTERPRET=1"
        )
    return backend


def _impl(backend: str):
    if backend == "triton":
        from . import triton_impl

        return triton_impl
    return torch_impl


def attention_fwd(q, k, v, *, scale, offset, out_dtype=None, backend="torch"):
    """See `torch_impl.attention_fwd`."""
    return _impl(backend).attention_fwd(q, k, v, scale=scale, offset=offset, out_dtype=out_dtype)


def attention_bwd(do, q, k, v, lse, delta, *, scale, offset, backend="torch"):
    """See `torch_impl.attention_bwd`."""
    return _impl(backend).attention_bwd(do, q, k, v, lse, delta, scale=scale, offset=offset)


def attention_delta(do, out, *, backend="torch"):
    """rowsum(dO * O): [B, S, H, D] -> [B, H, S] float32."""
    return _impl(backend).attention_delta(do, out)


__all__ = ["BACKENDS", "attention_bwd", "attention_delta", "attention_fwd", "resolve_backend"]
