"""Triton twin of paged attention: split-K ("flash-decoding") over a page pool.

Same signature and semantics as `torch_impl.paged_attention_fwd` (read its docstring for the
pool and block-table layout): every cached key is visible to every query, and a sequence with no
cached key gives out = 0, lse = -inf.

Two kernels:
  `_paged_split_kernel`  grid (batch, kv head, split). One program takes the G = Hq / Hkv query
                         heads x Sq queries that share its KV head as the rows of one tile (GQA
                         without repeating K/V: each K/V tile is loaded once per KV head), walks
                         its split's range of the sequence BLOCK_N keys at a time through the
                         block table, and runs an online softmax in exp2 (log2(e) folded into the
                         scale). It writes a partial (out in float32, lse) per split, or, when
                         there is one split, the final out and lse directly.
  `_merge_splits_kernel` grid (query head, query, batch): merges one row's splits by their lse.
                         Empty splits (lse = -inf, out = 0) weigh 0, and a row whose splits are
                         all empty gives out = 0, lse = -inf, never NaN.

A key tile is BLOCK_N (a power of two >= 16) consecutive keys of one sequence. When the page size
is a multiple of BLOCK_N a tile lies inside one page (one block-table load per tile); otherwise
(small or odd page sizes) every key of the tile finds its own page. Split boundaries are
multiples of BLOCK_N, so only the sequence's last tile needs a key mask. Page offsets are int64:
pools can hold more than 2**31 elements.

Dot precision: float32 pools use IEEE fp32 dots; fp16/bf16 pools use native tensor-core dots
with float32 accumulation, and P is rounded to the pool dtype before P @ V, as in
FlashAttention. q is cast to the pool dtype.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 256
_LOG2E = math.log2(math.e)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Split heuristic (see `_num_splits`).
_MIN_WAVES = 2  # at least this many programs per SM ...
_MIN_WAVE_EFFICIENCY = 0.95  # ... and programs spread over SMs with <= 5 % idle in the last wave
_MIN_SPLIT_KEYS = 32 if _INTERPRET else 512  # no split shorter than this (GPU: >= 8 tiles)
_INTERPRET_SMS = 4  # a pretend GPU for the interpreter: few splits keep CPU tests fast


# ---------------------------------------------------------------------------------------------
# Kernels.


@triton.jit
def _kv_rows(
    BT_row, stride_btp, n0, keys, n,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """(page, slot) of the tile's keys `keys` = n0 + [0, BLOCK_N): page is an int64 scalar when
    the tile lies inside one page, else an int64 vector, one per key. Keys >= n (MASKED tiles
    only) read block-table column 0, which every nonempty sequence has."""
    if PAGE_SIZE % BLOCK_N == 0:
        page = tl.load(BT_row + (n0 // PAGE_SIZE) * stride_btp).to(tl.int64)
    else:
        logical = keys // PAGE_SIZE
        if MASKED:
            logical = tl.where(keys < n, logical, 0)
        page = tl.load(BT_row + logical * stride_btp).to(tl.int64)
    return page, keys % PAGE_SIZE


@triton.jit
def _load_kv(
    Pool_head, page, slot, stride_p, stride_t, stride_d, keys, n, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """[BLOCK_N, BLOCK_D] tile of K or V; zero past the head dim and, when MASKED, for keys >= n
    (pool slots past the sequence's end hold whatever was written there: never trust them)."""
    rows = page * stride_p + slot * stride_t  # int64 [BLOCK_N] (page may be a scalar)
    ptrs = Pool_head + rows[:, None] + offs_d[None, :] * stride_d
    if MASKED:
        x = tl.load(ptrs, mask=(keys < n)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    elif BLOCK_D == HEAD_DIM:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return x


@triton.jit
def _paged_tiles(
    acc, l_i, m_i, q, K_head, V_head, BT_row,
    stride_btp, stride_kp, stride_kt, stride_kd, stride_vp, stride_vt, stride_vd,
    start, end, n, qk_scale, offs_n, offs_d,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax over keys [start, end), BLOCK_N at a time (start a multiple of BLOCK_N).
    Every tile holds at least one key < n, so the running max is finite after the first tile."""
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + offs_n
        page, slot = _kv_rows(BT_row, stride_btp, n0, keys, n, PAGE_SIZE, BLOCK_N, MASKED)
        k = _load_kv(
            K_head, page, slot, stride_kp, stride_kt, stride_kd, keys, n, offs_d,
            HEAD_DIM, BLOCK_D, MASKED,
        )  # fmt: skip
        v = _load_kv(
            V_head, page, slot, stride_vp, stride_vt, stride_vd, keys, n, offs_d,
            HEAD_DIM, BLOCK_D, MASKED,
        )  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, N], log2 units
        if MASKED:
            s = tl.where((keys < n)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _paged_split_kernel(
    Q, K, V, BlockTables, ContextLens, Out, Lse,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kp, stride_kt, stride_kh, stride_kd,
    stride_vp, stride_vt, stride_vh, stride_vd,
    stride_btb, stride_btp,
    stride_ob, stride_os, stride_oh, stride_ox, stride_od,
    stride_lb, stride_lh, stride_ls, stride_lx,
    sq, group, num_splits, qk_scale,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Out/Lse are [B, Sq, Hq, splits, D] / [B, Hq, Sq, splits] (x = the split axis)."""
    b64 = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # Tile row r is query (r % sq) of query head kvh * group + r // sq.
    n_rows = group * sq
    row_ok = offs_m < n_rows
    heads = (kvh * group + offs_m // sq).to(tl.int64)
    queries = (offs_m % sq).to(tl.int64)

    q_ptrs = Q + b64 * stride_qb + (heads * stride_qh + queries * stride_qs)[:, None]
    q_ptrs += offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    q = q.to(K.dtype.element_ty)

    # This split's keys: the sequence's tiles cut into num_splits near-equal runs.
    n = tl.load(ContextLens + b64)
    tiles_per_split = tl.cdiv(tl.cdiv(n, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, n)
    n_full = (n // BLOCK_N) * BLOCK_N  # keys below this fill whole tiles

    BT_row = BlockTables + b64 * stride_btb
    K_head = K + kvh.to(tl.int64) * stride_kh
    V_head = V + kvh.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _paged_tiles(
        acc, l_i, m_i, q, K_head, V_head, BT_row,
        stride_btp, stride_kp, stride_kt, stride_kd, stride_vp, stride_vt, stride_vd,
        start, tl.minimum(end, n_full), n, qk_scale, offs_n, offs_d,
        PAGE_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N, False, DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _paged_tiles(
        acc, l_i, m_i, q, K_head, V_head, BT_row,
        stride_btp, stride_kp, stride_kt, stride_kd, stride_vp, stride_vt, stride_vd,
        tl.maximum(start, n_full), end, n, qk_scale, offs_n, offs_d,
        PAGE_SIZE, HEAD_DIM, BLOCK_D, BLOCK_N, True, DOT_PRECISION,
    )  # fmt: skip

    seen = l_i > 0.0  # an empty split leaves l_i = 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    split64 = tl.cast(split, tl.int64)
    o_rows = b64 * stride_ob + split64 * stride_ox + heads * stride_oh + queries * stride_os
    o_ptrs = Out + o_rows[:, None] + offs_d[None, :] * stride_od
    o_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)
    l_rows = b64 * stride_lb + split64 * stride_lx + heads * stride_lh + queries * stride_ls
    tl.store(Lse + l_rows, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    PartOut, PartLse, Out, Lse,
    stride_pb, stride_ps, stride_ph, stride_px, stride_pd,
    stride_qb, stride_qh, stride_qs, stride_qx,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ls,
    num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_X: tl.constexpr,
):  # fmt: skip
    """out = sum_x exp(lse_x - lse) out_x, lse = logsumexp_x lse_x over one row's splits."""
    h64 = tl.program_id(0).to(tl.int64)
    s64 = tl.program_id(1).to(tl.int64)
    b64 = tl.program_id(2).to(tl.int64)
    offs_x = tl.arange(0, BLOCK_X)
    offs_d = tl.arange(0, BLOCK_D)
    Lse_row = PartLse + b64 * stride_qb + h64 * stride_qh + s64 * stride_qs
    Out_row = PartOut + b64 * stride_pb + h64 * stride_ph + s64 * stride_ps

    m = tl.full([BLOCK_X], float("-inf"), tl.float32)
    for x0 in range(0, num_splits, BLOCK_X):
        xs = x0 + offs_x
        m = tl.maximum(
            m, tl.load(Lse_row + xs * stride_qx, mask=xs < num_splits, other=float("-inf"))
        )
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty

    acc = tl.zeros([BLOCK_D], tl.float32)
    total = tl.zeros([BLOCK_X], tl.float32)
    for x0 in range(0, num_splits, BLOCK_X):
        xs = x0 + offs_x
        lse_x = tl.load(Lse_row + xs * stride_qx, mask=xs < num_splits, other=float("-inf"))
        w = tl.math.exp2((lse_x - m_safe) * 1.4426950408889634)  # 0 for empty splits
        o_ptrs = Out_row + xs.to(tl.int64)[:, None] * stride_px + offs_d[None, :] * stride_pd
        o_mask = (xs < num_splits)[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(o_ptrs, mask=o_mask, other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
        total += w
    den = tl.sum(total, 0)
    seen = den > 0.0
    out = acc / tl.where(seen, den, 1.0)
    lse = tl.where(seen, m_safe + tl.log(tl.where(seen, den, 1.0)), float("-inf"))
    o_ptrs = Out + b64 * stride_ob + s64 * stride_os + h64 * stride_oh + offs_d * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(Lse + b64 * stride_lb + h64 * stride_lh + s64 * stride_ls, lse)


# ---------------------------------------------------------------------------------------------
# Host side.


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the split kernel (the default comes from `decode_config`)."""

    block_n: int  # keys per tile, a power of two >= 16
    num_splits: int  # programs per (sequence, KV head)
    num_warps: int = 4
    num_stages: int = 3


def _num_sms(device: torch.device) -> int:
    if _INTERPRET or device.type != "cuda":
        return _INTERPRET_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(programs: int, max_keys: int, num_sms: int) -> int:
    """Splits per (sequence, KV head), from the B * Hkv programs of one split and an upper bound
    on the context length (block-table width x page size: reading `context_lens` would sync).

    Decode reads every cached byte once, so the aim is to keep every SM streaming to the end:
    with s splits there are programs * s programs, w = programs * s / num_sms per SM, and the
    last wave's idle share is 1 - w / ceil(w). Score(s) = (w / ceil(w)) * min(1, w / MIN_WAVES)
    and the choice is the smallest s scoring >= MIN_WAVE_EFFICIENCY x the best score, over
    s <= max_keys / MIN_SPLIT_KEYS (no split shorter than MIN_SPLIT_KEYS keys: short contexts are
    not worth splitting, and each split adds a partial row to write and merge). Example on 132
    SMs: 8 x 8 (batch x KV heads) x 128k keys -> 6 splits (384 programs, 2.9 per SM); 1 x 8 x 1M
    keys -> 33 splits (264 programs, 2 per SM).
    """
    max_splits = max(1, min(triton.cdiv(max_keys, _MIN_SPLIT_KEYS), 65535))
    scores = []
    for s in range(1, min(max_splits, _MIN_WAVES * num_sms) + 1):
        w = programs * s / num_sms
        scores.append(w / math.ceil(w) * min(1.0, w / _MIN_WAVES))
    best = max(scores)
    return next(s for s, sc in enumerate(scores, 1) if sc >= _MIN_WAVE_EFFICIENCY * best)


def _block_d(d: int) -> int:
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim must be at most {MAX_HEAD_DIM}; got {d}")
    return max(16, triton.next_power_of_2(d))  # tl.dot needs every tile dim >= 16


def decode_config(q: torch.Tensor, k_pages: torch.Tensor, block_tables: torch.Tensor):
    """The default `DecodeConfig` for these shapes.

    BLOCK_N: 16 under the interpreter (many tiles from few keys); on GPU the largest power of
    two <= 64 whose K tile takes <= 16 KiB (bf16 D=128: 64 keys; D=256 or fp32: 32), so that
    three pipeline stages of K and V fit twice per SM.
    """
    block_d = _block_d(q.shape[-1])
    if _INTERPRET:
        block_n = 16
    else:
        block_n = max(16, min(64, 16384 // (block_d * k_pages.element_size())))
    max_keys = block_tables.shape[1] * k_pages.shape[1]
    programs = max(1, q.shape[0] * k_pages.shape[2])
    return DecodeConfig(block_n, _num_splits(programs, max_keys, _num_sms(q.device)))


def _check_inputs(q, k_pages, v_pages, block_tables, context_lens) -> None:
    if q.dim() != 4 or k_pages.dim() != 4:
        raise ValueError(
            f"expected q [B, Sq, Hq, D] and pages [num_pages, page_size, Hkv, D]; got q "
            f"{tuple(q.shape)}, k_pages {tuple(k_pages.shape)}"
        )
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"k_pages {tuple(k_pages.shape)} != v_pages {tuple(v_pages.shape)}")
    b, _, hq, d = q.shape
    hkv = k_pages.shape[2]
    if hkv == 0 or hq % hkv or k_pages.shape[3] != d:
        raise ValueError(
            f"q has {hq} heads of dim {d}, pages {hkv} heads of dim {k_pages.shape[3]}: "
            "need equal head dims and Hq % Hkv == 0"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != b or context_lens.shape != (b,):
        raise ValueError(
            f"batch {b}: expected block_tables [{b}, max_pages] and context_lens [{b}]; got "
            f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}"
        )
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64; got {t.dtype}")


def paged_attention_fwd(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float,
    out_dtype: torch.dtype | None = None,
    config: DecodeConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of new queries over each sequence's cached keys (`torch_impl`'s contract).

    Args:
        q: [B, Sq, Hq, D] queries, any strides, D <= 256.
        k_pages, v_pages: [num_pages, page_size, Hkv, D] the pool (fp16, bf16 or fp32), any
            strides; Hq % Hkv == 0.
        block_tables: [B, max_pages] int32/int64; block_tables[b, i] = physical page of logical
            page i of sequence b (entries past the sequence's last page are never read).
        context_lens: [B] int32/int64; cached tokens per sequence, 0 allowed, at most
            max_pages * page_size (not checked: that would sync with the device).
        scale: softmax scale.
        out_dtype: dtype of out (default q.dtype).
        config: launch parameters; default `decode_config(q, k_pages, block_tables)`.

    Returns:
        out [B, Sq, Hq, D] and lse [B, Hq, Sq] float32 (natural log); a sequence with no cached
        token gives out = 0, lse = -inf.
    """
    _check_inputs(q, k_pages, v_pages, block_tables, context_lens)
    b, sq, hq, d = q.shape
    page_size, hkv = k_pages.shape[1], k_pages.shape[2]
    block_d = _block_d(d)
    cfg = config or decode_config(q, k_pages, block_tables)
    out = torch.empty((b, sq, hq, d), dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    if lse.numel() == 0:
        return out, lse

    if cfg.num_splits == 1:  # the split kernel writes the final result (split stride 0)
        part_out, part_lse = out.unsqueeze(3), lse.unsqueeze(3)
    else:
        part_out = torch.empty((b, sq, hq, cfg.num_splits, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((b, hq, sq, cfg.num_splits), dtype=torch.float32, device=q.device)
    group = hq // hkv
    _paged_split_kernel[(b, hkv, cfg.num_splits)](
        q, k_pages, v_pages, block_tables, context_lens, part_out, part_lse,
        *q.stride(), *k_pages.stride(), *v_pages.stride(), *block_tables.stride(),
        *part_out.stride(), *part_lse.stride(),
        sq, group, cfg.num_splits, scale * _LOG2E,
        PAGE_SIZE=page_size, HEAD_DIM=d, BLOCK_D=block_d,
        BLOCK_M=max(16, triton.next_power_of_2(group * sq)), BLOCK_N=cfg.block_n,
        DOT_PRECISION="ieee" if k_pages.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if cfg.num_splits > 1:
        _merge_splits_kernel[(hq, sq, b)](
            part_out, part_lse, out, lse,
            *part_out.stride(), *part_lse.stride(), *out.stride(), *lse.stride(),
            cfg.num_splits,
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_X=min(16, triton.next_power_of_2(cfg.num_splits)),
        )  # fmt: skip
    return out, lse
