"""Triton twin of the block-attention op: flash attention forward and backward with an LSE.

Same signatures and semantics as `torch_impl` (read its docstring for the causal `offset`
convention): query row i sees key j iff offset is None or j <= i + offset; a row that sees no key
gives out = 0 and lse = -inf.

Kernels, each over a grid of (row block, head, batch):
  `_attn_fwd_kernel`   one query block x all the key blocks it sees: online softmax in exp2 with
                       log2(e) folded into the scale, float32 accumulators.
  `_attn_delta_kernel` delta = rowsum(dO * O), the backward's preprocessing.
  `_attn_dkdv_kernel`  one key block x the query blocks that see it, looping over the G query
                       heads that share its KV head, so GQA sums need no atomics.
  `_attn_dq_kernel`    one query block x the key blocks it sees.
The backward reads the lse and delta it is given (the ring passes the merged attention's), never
its own. Deterministic: every output element is written by exactly one program, once.

Loop bounds skip tiles the causal mask empties; only tiles that straddle the diagonal (or the
sequence end) are masked. Fully written outputs make autotuning trials safe without zeroing.

Dot precision: float32 inputs use IEEE fp32 dots (`input_precision="ieee"`): TF32 would cut the
mantissa to 10 bits, and fp32 callers ask for fp32 accuracy. fp16/bf16 inputs use native
tensor-core dots with float32 accumulation; P and dS are rounded to the input dtype before their
dots, as in FlashAttention.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 256
_LOG2E = math.log2(math.e)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------
# Autotuning: keyed on (head dim, causal, Sq and Sk rounded up to a power of two); tensor
# dtypes join the key automatically. Each kernel has a short config list per head-dim class
# (padded D <= 64, <= 128, <= 256), chosen by compiling for sm_90 and keeping the tilings with
# the fewest register spills; the autotuner times the few that remain. float32 inputs get one
# small tiling: IEEE fp32 dots run on FMA units (no tensor cores), and their fully unrolled code
# spills and compiles slowly (measured ~1 min per kernel at D = 256), so small tiles keep the
# compile bounded. The interpreter gets one config (it runs on CPU).

_KEY = ["HEAD_DIM", "CAUSAL", "sq_bucket", "sk_bucket"]
Tiling = tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
_FP32_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)


def _autotune(table: dict[int, list[Tiling]], interpret: tuple[int, int]):
    """triton.autotune over `table` ({max padded head dim: tilings}), pruned to D's class."""
    if _INTERPRET:
        config = triton.Config({"BLOCK_M": interpret[0], "BLOCK_N": interpret[1]}, num_warps=4)
        return triton.autotune(configs=[config], key=_KEY)
    by_d = {
        d_max: [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in tilings
        ]
        for d_max, tilings in table.items()
    }

    def prune(configs, named_args, **kwargs):
        keep = by_d[min(d for d in by_d if d >= kwargs["BLOCK_D"])]
        return [_FP32_CONFIG] if named_args["Q"].dtype == torch.float32 else keep

    all_configs = [c for configs in by_d.values() for c in configs]
    return triton.autotune(all_configs, key=_KEY, prune_configs_by={"early_config_prune": prune})


# fwd and dQ keep a query block resident and stream key blocks; interpreter tiles 32 x 64.
_FWD_TUNE = _autotune(
    {
        64: [(128, 64, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3)],
        128: [(128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)],
        256: [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2)],
    },
    interpret=(32, 64),
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


# ---------------------------------------------------------------------------------------------
# Shared device helpers.


@triton.jit
def _load_tile(
    base,
    offs_r,
    n_rows,
    stride_r,
    stride_d,
    offs_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHECK_ROWS: tl.constexpr,
):
    """Tile x[r, d] = base[r * stride_r + d * stride_d], zero for r >= n_rows (when CHECK_ROWS)
    and for d >= HEAD_DIM (the head dim is padded to BLOCK_D, a power of two)."""
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
    if CHECK_ROWS:
        x = tl.load(ptrs, mask=(offs_r < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    elif BLOCK_D == HEAD_DIM:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return x


@triton.jit
def _store_tile(base, x, offs_r, n_rows, stride_r, stride_d, offs_d, HEAD_DIM: tl.constexpr):
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
    mask = (offs_r < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _query_key_range(m0, sq, sk, offset, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """For query rows [m0, m0 + BLOCK_M): keys [0, hi) are seen by some row, keys [0, lo_masked)
    by every row. Returns (hi, lo_masked)."""
    if CAUSAL:
        m1 = tl.minimum(sq, m0 + BLOCK_M)
        hi = tl.minimum(tl.maximum(m1 + offset, 0), sk)
        lo_masked = tl.minimum(tl.maximum(m0 + offset + 1, 0), sk)
    else:
        hi = sk
        lo_masked = sk
    return hi, lo_masked


@triton.jit
def _row_lse2(Lse_head, stride_ls, rows, sq):
    """lse in log2 units for rows < sq; +inf for rows that saw no key or lie past the end, which
    makes every probability exp2(s - lse2) of that row exactly 0."""
    lse = tl.load(Lse_head + rows * stride_ls, mask=rows < sq, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # x log2(e)


# ---------------------------------------------------------------------------------------------
# Forward.


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


# ---------------------------------------------------------------------------------------------
# Host side: same signatures as torch_impl.


def _block_d(d: int) -> int:
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim must be at most {MAX_HEAD_DIM}; got {d}")
    return max(16, triton.next_power_of_2(d))  # tl.dot needs every tile dim >= 16


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 dots for fp32 inputs; fp16/bf16 dots ignore the setting (native MMA)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


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
