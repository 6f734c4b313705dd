"""Triton flash-attention backward: delta, dK/dV and dQ kernels (see `triton_common`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    _INTERPRET,
    _LOG2E,
    _autotune,
    _block_d,
    _bucket,
    _dot_precision,
    _load_tile,
    _query_key_range,
    _row_lse2,
    _store_tile,
)

_DQ_TUNE = _autotune(
    {
        64: [(128, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
        128: [(128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)],
        256: [(64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2)],
    },
    interpret=(32, 64),
)
# dK/dV keeps a key block resident (with two fp32 accumulators) and streams query blocks.
_DKDV_TUNE = _autotune(
    {
        64: [(64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3)],
        128: [(16, 128, 8, 2), (32, 128, 8, 2), (32, 64, 8, 3), (16, 64, 8, 2)],
        256: [(16, 64, 8, 2), (32, 64, 4, 2), (16, 32, 4, 2)],
    },
    interpret=(64, 32),
)


@triton.jit
def _attn_delta_kernel(
    DO, O, Delta,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_db, stride_dh, stride_ds,
    s,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    m0 = tl.program_id(0) * BLOCK_M
    h64 = tl.program_id(1).to(tl.int64)
    b64 = tl.program_id(2).to(tl.int64)
    m64 = tl.cast(m0, tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    DO_blk = DO + b64 * stride_dob + h64 * stride_doh + m64 * stride_dos
    O_blk = O + b64 * stride_ob + h64 * stride_oh + m64 * stride_os
    do = _load_tile(DO_blk, offs_m, s - m0, stride_dos, stride_dod, offs_d, HEAD_DIM, BLOCK_D, True)
    o = _load_tile(O_blk, offs_m, s - m0, stride_os, stride_od, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    rows = m0 + offs_m
    tl.store(Delta + b64 * stride_db + h64 * stride_dh + rows * stride_ds, delta, mask=rows < s)


@triton.jit
def _attn_dkdv_inner(
    dk,
    dv,
    k,
    v,
    Q_head,
    DO_head,
    Lse_head,
    Delta_head,
    stride_qs,
    stride_qd,
    stride_dos,
    stride_dod,
    stride_ls,
    stride_ds,
    start,
    end,
    sq,
    cols,
    offset,
    qk_scale,
    offs_m,
    offs_d,
    MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dK, dV of one key block over query blocks [start, end), in transposed form
    ([N, M] tiles); MASKED tiles apply the causal mask. Rows past sq load as zeros, lse2 = inf."""
    for start_m in range(start, end, BLOCK_M):
        m64 = tl.cast(start_m, tl.int64)
        q = _load_tile(
            Q_head + m64 * stride_qs, offs_m, sq - start_m, stride_qs, stride_qd, offs_d,
            HEAD_DIM, BLOCK_D, True,
        )  # fmt: skip
        do = _load_tile(
            DO_head + m64 * stride_dos, offs_m, sq - start_m, stride_dos, stride_dod, offs_d,
            HEAD_DIM, BLOCK_D, True,
        ).to(q.dtype)  # fmt: skip
        rows = start_m + offs_m
        lse2 = _row_lse2(Lse_head, stride_ls, rows, sq)
        delta = tl.load(Delta_head + rows * stride_ds, mask=rows < sq, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [N, M]
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASKED:
            p_t = tl.where(cols[:, None] <= rows[None, :] + offset, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@_DKDV_TUNE
@triton.jit
def _attn_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_lb, stride_lh, stride_ls,
    stride_db, stride_dh, stride_ds,
    stride_dkb, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvs, stride_dvh, stride_dvd,
    sq, sk, group, offset, scale, qk_scale, sq_bucket, sk_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    n0 = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1)
    b64 = tl.program_id(2).to(tl.int64)
    hk64 = hk.to(tl.int64)
    n64 = tl.cast(n0, tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = n0 + offs_n

    K_blk = K + b64 * stride_kb + hk64 * stride_kh + n64 * stride_ks
    V_blk = V + b64 * stride_vb + hk64 * stride_vh + n64 * stride_vs
    k = _load_tile(K_blk, offs_n, sk - n0, stride_ks, stride_kd, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(V_blk, offs_n, sk - n0, stride_vs, stride_vd, offs_d, HEAD_DIM, BLOCK_D, True)

    if CAUSAL:
        # Query row i sees key j iff i >= j - offset: rows below m_lo see no key of this block,
        # rows from m_full on see all of them.
        n1 = tl.minimum(sk, n0 + BLOCK_N)
        m_lo = tl.minimum(tl.maximum(n0 - offset, 0), sq)
        m_full = tl.minimum(tl.maximum(n1 - 1 - offset, 0), sq)
        m_start = (m_lo // BLOCK_M) * BLOCK_M
        m_mid = ((m_full + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    else:
        m_start = 0
        m_mid = 0

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, group):  # the query heads that share this KV head
        h64 = hk64 * group + g
        Q_head = Q + b64 * stride_qb + h64 * stride_qh
        DO_head = DO + b64 * stride_dob + h64 * stride_doh
        Lse_head = Lse + b64 * stride_lb + h64 * stride_lh
        Delta_head = Delta + b64 * stride_db + h64 * stride_dh
        dk, dv = _attn_dkdv_inner(
            dk, dv, k, v, Q_head, DO_head, Lse_head, Delta_head,
            stride_qs, stride_qd, stride_dos, stride_dod, stride_ls, stride_ds,
            m_start, m_mid, sq, cols, offset, qk_scale, offs_m, offs_d,
            CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION,
        )  # fmt: skip
        dk, dv = _attn_dkdv_inner(
            dk, dv, k, v, Q_head, DO_head, Lse_head, Delta_head,
            stride_qs, stride_qd, stride_dos, stride_dod, stride_ls, stride_ds,
            m_mid, sq, sq, cols, offset, qk_scale, offs_m, offs_d,
            False, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION,
        )  # fmt: skip

    DK_blk = DK + b64 * stride_dkb + hk64 * stride_dkh + n64 * stride_dks
    DV_blk = DV + b64 * stride_dvb + hk64 * stride_dvh + n64 * stride_dvs
    _store_tile(DK_blk, dk * scale, offs_n, sk - n0, stride_dks, stride_dkd, offs_d, HEAD_DIM)
    _store_tile(DV_blk, dv, offs_n, sk - n0, stride_dvs, stride_dvd, offs_d, HEAD_DIM)


@triton.jit
def _attn_dq_inner(
    dq,
    q,
    do,
    lse2,
    delta,
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
    """Accumulate dQ of one query block over key blocks [start, end); MASKED tiles apply the
    causal and Sk masks."""
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
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            cols = start_n + offs_n
            visible = (cols < sk)[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + offset)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@_DQ_TUNE
@triton.jit
def _attn_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_lb, stride_lh, stride_ls,
    stride_db, stride_dh, stride_ds,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    sq, sk, group, offset, scale, qk_scale, sq_bucket, sk_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b64 = tl.program_id(2).to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // group).to(tl.int64)
    m64 = tl.cast(m0, tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m0 + offs_m

    Q_blk = Q + b64 * stride_qb + h64 * stride_qh + m64 * stride_qs
    DO_blk = DO + b64 * stride_dob + h64 * stride_doh + m64 * stride_dos
    q = _load_tile(Q_blk, offs_m, sq - m0, stride_qs, stride_qd, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(
        DO_blk, offs_m, sq - m0, stride_dos, stride_dod, offs_d, HEAD_DIM, BLOCK_D, True
    ).to(q.dtype)
    lse2 = _row_lse2(Lse + b64 * stride_lb + h64 * stride_lh, stride_ls, rows, sq)
    delta = tl.load(
        Delta + b64 * stride_db + h64 * stride_dh + rows * stride_ds, mask=rows < sq, other=0.0
    )
    K_head = K + b64 * stride_kb + hk64 * stride_kh
    V_head = V + b64 * stride_vb + hk64 * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi, lo_masked = _query_key_range(m0, sq, sk, offset, BLOCK_M, CAUSAL)
    n_full = (lo_masked // BLOCK_N) * BLOCK_N
    dq = _attn_dq_inner(
        dq, q, do, lse2, delta, K_head, V_head, stride_ks, stride_kd, stride_vs, stride_vd,
        0, n_full, sk, rows, offset, qk_scale, offs_n, offs_d,
        False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    dq = _attn_dq_inner(
        dq, q, do, lse2, delta, K_head, V_head, stride_ks, stride_kd, stride_vs, stride_vd,
        n_full, hi, sk, rows, offset, qk_scale, offs_n, offs_d,
        True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    DQ_blk = DQ + b64 * stride_dqb + h64 * stride_dqh + m64 * stride_dqs
    _store_tile(DQ_blk, dq * scale, offs_m, sq - m0, stride_dqs, stride_dqd, offs_d, HEAD_DIM)


def attention_delta(do: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(dO * O): [B, S, H, D] x2 -> [B, H, S] float32."""
    b, s, h, d = out.shape
    delta = torch.empty((b, h, s), dtype=torch.float32, device=out.device)
    if delta.numel() == 0:
        return delta
    block_m = 16 if _INTERPRET else 64
    _attn_delta_kernel[(triton.cdiv(s, block_m), h, b)](
        do, out, delta, *do.stride(), *out.stride(), *delta.stride(), s,
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=block_m,
    )  # fmt: skip
    return delta


def attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    *,
    scale: float,
    offset: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block attention backward from an externally supplied lse and delta. Same contract as
    `torch_impl.attention_bwd`: with the merged attention's lse and delta it returns this key
    block's exact share of the merged gradients.

    Args:
        do: [B, Sq, Hq, D] (rounded to q's dtype for the dots). q: [B, Sq, Hq, D].
        k, v: [B, Sk, Hkv, D]. lse, delta: [B, Hq, Sq] float32; lse = -inf rows get zero grads.
        scale, offset: as in `attention_fwd`.

    Returns:
        dq [B, Sq, Hq, D], dk and dv [B, Sk, Hkv, D], all float32; GQA dk/dv summed over the
        query heads of each group.
    """
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    block_d = _block_d(d)
    dq = torch.empty((b, sq, hq, d), dtype=torch.float32, device=q.device)
    dk = torch.empty((b, sk, hkv, d), dtype=torch.float32, device=q.device)
    dv = torch.empty((b, sk, hkv, d), dtype=torch.float32, device=q.device)
    causal, off = offset is not None, 0 if offset is None else offset
    common = dict(HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal, DOT_PRECISION=_dot_precision(q.dtype))
    sizes = (sq, sk, hq // hkv, off, scale, scale * _LOG2E, _bucket(sq), _bucket(sk))
    inputs = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride(), *delta.stride())
    if dk.numel():
        grid_kv = lambda meta: (triton.cdiv(sk, meta["BLOCK_N"]), hkv, b)  # noqa: E731
        _attn_dkdv_kernel[grid_kv](
            q, k, v, do, lse, delta, dk, dv, *inputs, *dk.stride(), *dv.stride(), *sizes, **common
        )
    if dq.numel():
        grid_q = lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), hq, b)  # noqa: E731
        _attn_dq_kernel[grid_q](
            q, k, v, do, lse, delta, dq, *inputs, *dq.stride(), *sizes, **common
        )
    return dq, dk, dv
