"""flash_attn and ring_attention are torch.library ops: torch.compile traces them whole."""

from __future__ import annotations

import torch

import ringattn


def test_flash_attn_compiles_without_graph_breaks():
    def f(q, k, v):
        out, lse = ringattn.flash_attn(q, k, v, causal=True, return_lse=True)
        return (out * 2).sum() + lse.sum()

    # fullgraph=True fails on any graph break; aot_eager traces forward and backward graphs
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    q, k, v = (torch.randn(1, 20, h, 8, requires_grad=True) for h in (4, 2, 2))
    eager_val = f(q, k, v)
    eager_grads = torch.autograd.grad(eager_val, (q, k, v))
    val = compiled(q, k, v)
    grads = torch.autograd.grad(val, (q, k, v))
    torch.testing.assert_close(val, eager_val)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e)


def test_ring_attention_single_rank_compiles():
    def f(q, k, v):
        return ringattn.ring_attention(q, k, v, causal=True).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    q, k, v = (torch.randn(1, 16, 2, 8, requires_grad=True) for _ in range(3))
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))
