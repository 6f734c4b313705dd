"""flash_attn (torch backend) against float64: outputs, lse, gradients, masking, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from ringattn import flash_attn
from ringattn.kernels.attention import torch_impl
from ringattn.kernels.attention.naive import naive_attention
from tests._reference import bound, magnitude, max_err, reference_attention

# (B, Sq, Sk, Hq, Hkv, D): odd lengths, Sq != Sk both ways, GQA, MQA, head dims off powers of 2.
SHAPES = [
    (2, 97, 97, 4, 2, 40),
    (1, 64, 64, 2, 2, 64),
    (1, 33, 130, 4, 1, 96),
    (1, 130, 33, 2, 1, 128),
    (1, 1025, 1025, 1, 1, 16),
]


def shape_id(shape):
    b, sq, sk, hq, hkv, d = shape
    return f"B{b}-Sq{sq}-Sk{sk}-H{hq}-{hkv}-D{d}"


def make_inputs(shape, dtype, seed=0):
    b, sq, sk, hq, hkv, d = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, s, h, d, generator=g) for s, h in ((sq, hq), (sk, hkv), (sk, hkv)))
    do = torch.randn(b, sq, hq, d, generator=g)
    return [t.to(dtype) for t in (q, k, v, do)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_flash_matches_float64(shape, dtype, causal):
    if dtype != torch.float32 and shape[1] > 512:
        pytest.skip("long low-precision case: covered in float32")
    q, k, v, do = make_inputs(shape, dtype)
    scale = shape[-1] ** -0.5
    offset = shape[2] - shape[1] if causal else None
    ref = reference_attention(q, k, v, scale=scale, offset=offset, do=do)
    low = reference_attention(q, k, v, scale=scale, offset=offset, do=do, dtype=dtype)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = flash_attn(qg, kg, vg, causal=causal, return_lse=True)
    out.backward(do)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert lse.shape == (shape[0], shape[3], shape[1])
    pairs = [(out, ref[0], low[0]), (lse, ref[1], low[1])]
    pairs += list(zip((qg.grad, kg.grad, vg.grad), ref[2], low[2], strict=True))
    for name, (got, want, naive) in zip(["out", "lse", "dq", "dk", "dv"], pairs, strict=True):
        allowed = bound(dtype, "torch", max_err(naive, want), magnitude(want))
        assert max_err(got, want) <= allowed, f"{name}: {max_err(got, want):.3e} > {allowed:.3e}"


def test_fully_masked_rows_are_empty_not_nan():
    # Sq > Sk, causal bottom-right: the first Sq - Sk rows see no key at all.
    q, k, v, do = make_inputs((1, 9, 4, 2, 1, 8), torch.float32)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = flash_attn(qg, kg, vg, causal=True, return_lse=True)
    out.backward(do)
    assert torch.equal(out[:, :5], torch.zeros_like(out[:, :5]))
    assert torch.isneginf(lse[:, :, :5]).all() and torch.isfinite(lse[:, :, 5:]).all()
    for g in (qg.grad, kg.grad, vg.grad):
        assert torch.isfinite(g).all()
    assert torch.equal(qg.grad[:, :5], torch.zeros_like(qg.grad[:, :5]))


def test_gradient_through_lse():
    # lse is differentiable too: d lse / d s = softmax(s); checked against float64 autograd.
    q, k, v, _ = make_inputs((1, 20, 20, 2, 1, 8), torch.float64)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = flash_attn(qg, kg, vg, causal=True, return_lse=True)
    (out.sum() + lse.sum()).backward()
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    ro, rl = naive_attention(*ref, scale=8**-0.5, offset=0)
    (ro.sum() + rl.sum()).backward()
    for got, want in zip((qg.grad, kg.grad, vg.grad), (r.grad for r in ref), strict=True):
        assert max_err(got, want) < 1e-5  # the op computes in float32 whatever the input


def test_softmax_scale_and_default():
    q, k, v, _ = make_inputs((1, 16, 16, 2, 2, 24), torch.float64)
    out_default = flash_attn(q, k, v)
    out_explicit = flash_attn(q, k, v, softmax_scale=24**-0.5)
    assert torch.equal(out_default, out_explicit)
    ref = reference_attention(q, k, v, scale=0.3, offset=None)[0]
    assert max_err(flash_attn(q, k, v, softmax_scale=0.3), ref) < 1e-5


@pytest.mark.parametrize("offset", [-40, -1, 0, 3, 70], ids=lambda o: f"off{o}")
def test_block_op_offsets_across_tiles(offset, monkeypatch):
    # Small tiles so that skipped, unmasked and diagonal tiles all occur.
    monkeypatch.setattr(torch_impl, "BLOCK_M", 16)
    monkeypatch.setattr(torch_impl, "BLOCK_N", 8)
    q, k, v, do = make_inputs((1, 45, 61, 4, 2, 12), torch.float64)
    ref = reference_attention(q, k, v, scale=0.25, offset=offset, do=do)
    out, lse = torch_impl.attention_fwd(q, k, v, scale=0.25, offset=offset)
    delta = torch_impl.attention_delta(do, out)
    grads = torch_impl.attention_bwd(do, q, k, v, lse, delta, scale=0.25, offset=offset)
    assert max_err(out, ref[0]) < 1e-5 and max_err(lse, ref[1]) < 1e-5
    for got, want in zip(grads, ref[2], strict=True):
        assert max_err(got, want) < 1e-5


def test_block_backward_with_external_lse_is_exact_share():
    # Keys split in two blocks; the global lse/delta make each block's backward its exact share.
    q, k, v, do = make_inputs((1, 30, 50, 4, 2, 16), torch.float64)
    ref = reference_attention(q, k, v, scale=0.25, offset=20, do=do)
    out, lse = torch_impl.attention_fwd(q, k, v, scale=0.25, offset=20)
    delta = torch_impl.attention_delta(do, out)
    a = torch_impl.attention_bwd(do, q, k[:, :22], v[:, :22], lse, delta, scale=0.25, offset=20)
    b = torch_impl.attention_bwd(do, q, k[:, 22:], v[:, 22:], lse, delta, scale=0.25, offset=-2)
    assert max_err(a[0] + b[0], ref[2][0]) < 1e-5
    assert max_err(torch.cat([a[1], b[1]], 1), ref[2][1]) < 1e-5
    assert max_err(torch.cat([a[2], b[2]], 1), ref[2][2]) < 1e-5


BAD = [
    ("q-3d", lambda q, k, v: (q[0], k, v), "4-D"),
    ("kv-shape", lambda q, k, v: (q, k, v[:, :5]), "k and v shapes differ"),
    ("head-dim", lambda q, k, v: (q[..., :8], k, v), "head dim"),
    ("heads", lambda q, k, v: (q[:, :, :3], k, v), "multiple of key/value heads (2)"),
    ("dtype", lambda q, k, v: (q, k.half(), v), "dtypes differ"),
    ("d300", lambda q, k, v: (q.new_zeros(1, 4, 4, 300),) + (q.new_zeros(1, 4, 2, 300),) * 2,
     "1..256"),
]  # fmt: skip


@pytest.mark.parametrize("mutate,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_value_error(mutate, message):
    q, k, v, _ = make_inputs((1, 8, 8, 4, 2, 16), torch.float32)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        flash_attn(*mutate(q, k, v))


def test_unknown_backend():
    q, k, v, _ = make_inputs((1, 8, 8, 2, 2, 8), torch.float32)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        flash_attn(q, k, v, backend="cuda")


def test_memory_is_blockwise(monkeypatch):
    # The torch twin never materializes Sq x Sk: every tensor it allocates stays O(tile).
    sizes = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        r = real_matmul(a, b)
        sizes.append(r.numel())
        return r

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    q, k, v, do = make_inputs((1, 1024, 1024, 1, 1, 8), torch.float32)
    out, lse = torch_impl.attention_fwd(q, k, v, scale=0.1, offset=0)
    torch_impl.attention_bwd(
        do, q, k, v, lse, torch_impl.attention_delta(do, out), scale=0.1, offset=0
    )
    tile = torch_impl.BLOCK_M * torch_impl.BLOCK_N
    assert max(sizes) <= tile < 1024 * 1024 / 8
    assert math.isfinite(float(out.sum()))
