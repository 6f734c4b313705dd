"""Paged attention: queries against K/V held in the pages of a pool (see `torch_impl`).

`paged_attention_fwd(q, k_pages, v_pages, block_tables, context_lens, *, scale, out_dtype=None,
backend="torch")` -> (out, lse). Backends: "torch" (twin, CPU) and "triton" (split-K kernel).
"""

from __future__ import annotations

from . import torch_impl


def paged_attention_fwd(
    q, k_pages, v_pages, block_tables, context_lens, *, scale, out_dtype=None, backend="torch"
):
    """See `torch_impl.paged_attention_fwd`."""
    if backend == "triton":
        from . import triton_impl as impl
    else:
        impl = torch_impl
    return impl.paged_attention_fwd(
        q, k_pages, v_pages, block_tables, context_lens, scale=scale, out_dtype=out_dtype
    )


__all__ = ["paged_attention_fwd"]
