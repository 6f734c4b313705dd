"""Torch twin of the block-attention op: the CPU backend and the readable reference.

The op attends a query block to a key block with an explicit causal diagonal offset:

    query row i sees key column j  iff  offset is None  or  j <= i + offset

    offset = 0        offset = 2          offset = -1
    (top-left)        (Sk = Sq + 2,       (striped ring step
                       bottom-right)       from a later rank)
    x . . .           x x x . . .         . . . .
    x x . .           x x x x . .         x . . .
    x x x .           x x x x x .         x x . .
    x x x x           x x x x x x         x x x .

Work is tiled into (BLOCK_M query rows) x (BLOCK_N key columns). Tiles that the mask empties
are never computed, tiles it leaves whole are computed without a mask, and only tiles that
straddle the diagonal are masked. Beyond inputs and outputs, memory is O(tile), never Sq x Sk.
GQA/MQA: query head h reads KV head h // (Hq // Hkv), through a view; K/V are never repeated.
All arithmetic is float32 whatever the input dtype.
"""

from __future__ import annotations

import math

import torch

BLOCK_M = 256
BLOCK_N = 256
_LOG2E = math.log2(math.e)


def _key_range(m0: int, m1: int, sk: int, offset: int | None) -> tuple[int, int]:
    """Keys [0, hi) that some query row in [m0, m1) can see, and the first key that needs a
    mask for a row of the tile (keys below `lo_masked` are seen by every row)."""
    if offset is None:
        return sk, sk
    hi = max(0, min(sk, m1 - 1 + offset + 1))
    lo_masked = max(0, min(sk, m0 + offset + 1))
    return hi, lo_masked


def _grouped(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, S, Hq, D] -> [B, Hkv, G, S, D] float32, query heads grouped by their KV head."""
    b, s, hq, d = x.shape
    return x.float().view(b, s, hkv, hq // hkv, d).permute(0, 2, 3, 1, 4)


def _ungrouped(x: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, G, S, D] -> [B, S, Hkv * G, D]."""
    b, hkv, g, s, d = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(b, s, hkv * g, d)


def _tile_mask(m0: int, m1: int, n0: int, n1: int, offset: int, device) -> torch.Tensor:
    rows = torch.arange(m0, m1, device=device)[:, None]
    cols = torch.arange(n0, n1, device=device)[None, :]
    return cols <= rows + offset  # [M, N] True where visible


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    offset: int | None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block attention forward.

    Args:
        q: [B, Sq, Hq, D]. k, v: [B, Sk, Hkv, D] with Hq % Hkv == 0.
        scale: softmax scale applied to q @ k^T.
        offset: causal diagonal offset (see module docstring); None for no mask.
        out_dtype: dtype of `out` (default q.dtype); the ring asks for float32 partials.

    Returns:
        out [B, Sq, Hq, D] and lse [B, Hq, Sq] float32 (natural log). Rows that see no key
        have out = 0 and lse = -inf.
    """
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    qg = _grouped(q, hkv)  # [B, Hkv, G, Sq, D]
    kg = k.float().permute(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, Sk, D]
    vg = v.float().permute(0, 2, 1, 3)[:, :, None]
    out = torch.zeros(b, hkv, g, sq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, hkv, g, sq), -math.inf, dtype=torch.float32, device=q.device)
    for m0 in range(0, sq, BLOCK_M):
        m1 = min(sq, m0 + BLOCK_M)
        hi, lo_masked = _key_range(m0, m1, sk, offset)
        qt = qg[:, :, :, m0:m1] * (scale * _LOG2E)  # scores in log2 units
        row_max = torch.full((b, hkv, g, m1 - m0), -math.inf, device=q.device)
        row_sum = torch.zeros(b, hkv, g, m1 - m0, device=q.device)
        acc = torch.zeros(b, hkv, g, m1 - m0, d, device=q.device)
        for n0 in range(0, hi, BLOCK_N):
            n1 = min(hi, n0 + BLOCK_N)
            s = qt @ kg[:, :, :, n0:n1].transpose(-1, -2)  # [B, Hkv, G, M, N]
            if offset is not None and n1 > lo_masked:
                s = s.masked_fill(~_tile_mask(m0, m1, n0, n1, offset, q.device), -math.inf)
            new_max = torch.maximum(row_max, s.amax(-1))
            safe_max = torch.where(torch.isinf(new_max), 0.0, new_max)
            alpha = torch.exp2(row_max - safe_max)
            p = torch.exp2(s - safe_max[..., None])
            row_sum = row_sum * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ vg[:, :, :, n0:n1]
            row_max = new_max
        seen = row_sum > 0
        out[:, :, :, m0:m1] = torch.where(
            seen[..., None], acc / row_sum.clamp_min(1e-30)[..., None], 0.0
        )
        lse[:, :, :, m0:m1] = torch.where(seen, (row_max + torch.log2(row_sum)) / _LOG2E, -math.inf)
    return _ungrouped(out).to(out_dtype or q.dtype), lse.reshape(b, hq, sq)


def attention_delta(do: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(dO * O): [B, S, H, D] x2 -> [B, H, S] float32."""
    return (do.float() * out.float()).sum(-1).transpose(1, 2).contiguous()


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
    """Block attention backward from an externally supplied lse and delta.

    With `lse` and `delta` of this block's own forward, this is the block's exact backward. With
    the lse of attention merged over many key blocks (the ring's global lse) and
    delta = rowsum(dO * O_merged), it returns this block's exact share of the merged
    attention's gradients: dq sums over blocks, dk/dv belong to this key block alone.

    Args:
        do: [B, Sq, Hq, D] gradient of the output.
        q: [B, Sq, Hq, D]. k, v: [B, Sk, Hkv, D].
        lse: [B, Hq, Sq] float32. delta: [B, Hq, Sq] float32.
        scale, offset: as in `attention_fwd`.

    Returns:
        dq [B, Sq, Hq, D], dk and dv [B, Sk, Hkv, D], all float32. GQA gradients are summed
        over the query heads of each group.
    """
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    qg, dog = _grouped(q, hkv), _grouped(do, hkv)  # [B, Hkv, G, Sq, D]
    kg = k.float().permute(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, Sk, D]
    vg = v.float().permute(0, 2, 1, 3)[:, :, None]
    # A row that saw no key has lse = -inf; +inf there makes every probability exactly 0.
    lse2 = torch.where(torch.isneginf(lse), math.inf, lse * _LOG2E).reshape(b, hkv, g, sq)
    delta = delta.float().reshape(b, hkv, g, sq)
    dq = torch.zeros(b, hkv, g, sq, d, device=q.device)
    dk = torch.zeros(b, hkv, sk, d, device=q.device)
    dv = torch.zeros(b, hkv, sk, d, device=q.device)
    for m0 in range(0, sq, BLOCK_M):
        m1 = min(sq, m0 + BLOCK_M)
        hi, lo_masked = _key_range(m0, m1, sk, offset)
        qt, dot = qg[:, :, :, m0:m1], dog[:, :, :, m0:m1]
        for n0 in range(0, hi, BLOCK_N):
            n1 = min(hi, n0 + BLOCK_N)
            kt, vt = kg[:, :, :, n0:n1], vg[:, :, :, n0:n1]
            s = (qt @ kt.transpose(-1, -2)) * (scale * _LOG2E)  # [B, Hkv, G, M, N]
            if offset is not None and n1 > lo_masked:
                s = s.masked_fill(~_tile_mask(m0, m1, n0, n1, offset, q.device), -math.inf)
            p = torch.exp2(s - lse2[:, :, :, m0:m1, None])
            dp = dot @ vt.transpose(-1, -2)
            ds = p * (dp - delta[:, :, :, m0:m1, None])
            dq[:, :, :, m0:m1] += (ds @ kt) * scale
            dk[:, :, n0:n1] += (ds.transpose(-1, -2) @ qt).sum(2) * scale
            dv[:, :, n0:n1] += (p.transpose(-1, -2) @ dot).sum(2)
    return _ungrouped(dq), dk.permute(0, 2, 1, 3), dv.permute(0, 2, 1, 3)
