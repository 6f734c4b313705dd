"""Triton flash-attention forward (see `triton_common` for the design and tuning)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    _LOG2E,
    _autotune,
    _block_d,
    _bucket,
    _dot_precision,
    _load_tile,
    _query_key_range,
    _store_tile,
)

_FWD_TUNE = _autotune(
    {
        64: [(128, 64, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3)],
        128: [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)],
        256: [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2)],
    },
    interpret=(32, 64),
)


@triton.jit
def _attn_fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    K_head,
    V_head,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    start,
    end,
    sk,
    rows,
    offset,
    qk_scale,
    offs_n,
    offs_d,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over key blocks [start, end); MASKED tiles apply the causal and Sk masks."""
    for start_n in range(start, end, BLOCK_N):
        n64 = tl.cast(start_n, tl.int64)
        k = _load_tile(
            K_head + n64 * stride_kn, offs_n, sk - start_n, stride_kn, stride_kd, offs_d,
            HEAD_DIM, BLOCK_D, MASKED,
        )  # fmt: skip
        v = _load_tile(
            V_head + n64 * stride_vn, offs_n, sk - start_n, stride_vn, stride_vd, offs_d,
            HEAD_DIM, BLOCK_D, MASKED,
        )  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, N], log2 units
        if MASKED:
            cols = start_n + offs_n
            visible = (cols < sk)[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + offset)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # row saw nothing yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = m_new
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@_FWD_TUNE
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ls,
    sq, sk, group, offset, qk_scale, sq_bucket, sk_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b64 = tl.program_id(2).to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // group).to(tl.int64)  # GQA: query head h reads KV head h // group
    m64 = tl.cast(m0, tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m0 + offs_m

    Q_blk = Q + b64 * stride_qb + h64 * stride_qh + m64 * stride_qs
    K_head = K + b64 * stride_kb + hk64 * stride_kh
    V_head = V + b64 * stride_vb + hk64 * stride_vh
    q = _load_tile(Q_blk, offs_m, sq - m0, stride_qs, stride_qd, offs_d, HEAD_DIM, BLOCK_D, True)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi, lo_masked = _query_key_range(m0, sq, sk, offset, BLOCK_M, CAUSAL)
    n_full = (lo_masked // BLOCK_N) * BLOCK_N  # key blocks below this are whole for every row
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_head, V_head, stride_ks, stride_kd, stride_vs, stride_vd,
        0, n_full, sk, rows, offset, qk_scale, offs_n, offs_d,
        False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_head, V_head, stride_ks, stride_kd, stride_vs, stride_vd,
        n_full, hi, sk, rows, offset, qk_scale, offs_n, offs_d,
        True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip

    seen = l_i > 0.0  # a row that saw a key has l_i >= 1
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]  # acc is 0 for rows that saw nothing
    lse2 = m_i + tl.math.log2(l_safe)
    lse = tl.where(seen, lse2 * 0.6931471805599453, float("-inf"))  # x ln 2: natural log
    O_blk = Out + b64 * stride_ob + h64 * stride_oh + m64 * stride_os
    _store_tile(O_blk, out, offs_m, sq - m0, stride_os, stride_od, offs_d, HEAD_DIM)
    tl.store(Lse + b64 * stride_lb + h64 * stride_lh + rows * stride_ls, lse, mask=rows < sq)


# ---------------------------------------------------------------------------------------------
# Backward.


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    offset: int | None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block attention forward. Same contract as `torch_impl.attention_fwd`.

    Args:
        q: [B, Sq, Hq, D]. k, v: [B, Sk, Hkv, D] with Hq % Hkv == 0; any strides.
        scale: softmax scale applied to q @ k^T.
        offset: causal diagonal offset (query i sees key j iff j <= i + offset); None: no mask.
        out_dtype: dtype of `out` (default q.dtype).

    Returns:
        out [B, Sq, Hq, D] and lse [B, Hq, Sq] float32 (natural log); rows that see no key have
        out = 0 and lse = -inf.
    """
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    block_d = _block_d(d)
    out = torch.empty((b, sq, hq, d), dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    if lse.numel() == 0:
        return out, lse
    grid = lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), hq, b)  # noqa: E731
    _attn_fwd_kernel[grid](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        sq, sk, hq // hkv, 0 if offset is None else offset, scale * _LOG2E,
        _bucket(sq), _bucket(sk),
        HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=offset is not None,
        DOT_PRECISION=_dot_precision(q.dtype),
    )  # fmt: skip
    return out, lse
