"""ring_attention and flash_attn with backend="triton" (under the interpreter on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

import ringattn
from tests._harness import run_distributed
from tests._reference import max_err, reference_attention
from tests.test_ring import full_problem, ring_errors

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
        reason="needs CUDA or TRITON_INTERPRET=1",
    ),
]


def _ring_triton(rank, world, layout):
    q, k, v, do = full_problem(24, 4, 2, 16, seed=5, batch=1)
    return max(ring_errors(q, k, v, do, causal=True, layout=layout, backend="triton"))


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_ring_with_triton_backend_matches_float64(layout):
    for err in run_distributed(_ring_triton, 2, layout, timeout=180):
        assert err < 2e-5, err  # fp32 with IEEE dots: as tight as the torch twin


def test_flash_attn_triton_backend_public_api():
    q, k, v, do = full_problem(19, 4, 1, 24, seed=6, batch=1)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = ringattn.flash_attn(qg, kg, vg, causal=True, return_lse=True, backend="triton")
    out.backward(do)
    ref = reference_attention(q, k, v, scale=24**-0.5, offset=0, do=do)
    assert max_err(out, ref[0]) < 2e-5 and max_err(lse, ref[1]) < 2e-5
    for got, want in zip((qg.grad, kg.grad, vg.grad), ref[2], strict=True):
        assert max_err(got, want) < 2e-5
