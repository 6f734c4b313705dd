"""Torch twin of paged attention: queries against K/V held in pages of a pool.

The cache's K/V live in a pool of fixed-size pages; a sequence's pages are listed, in logical
order, in its row of the block table (as in vLLM's PagedAttention):

    k_pages[block_tables[b, i], j]  is key  i * page_size + j  of sequence b   (j < page_size)

Every cached key is visible to every query (no mask): the cache holds a prefix, and the new
tokens' attention to themselves is computed elsewhere and merged by LSE. Work is tiled over
pages, with an online softmax, so memory beyond inputs and outputs is O(tile).
"""

from __future__ import annotations

import math

import torch

PAGES_PER_TILE = 16


def paged_attention_fwd(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    *,
    scale: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of new queries over each sequence's cached keys.

    Args:
        q: [B, Sq, Hq, D] queries (Sq new tokens per sequence).
        k_pages, v_pages: [num_pages, page_size, Hkv, D] the pool; Hq % Hkv == 0.
        block_tables: [B, max_pages] int; block_tables[b, i] = physical page of logical page i
            of sequence b (entries past the sequence's last page are ignored).
        context_lens: [B] int; number of cached tokens of each sequence (0 allowed).
        scale: softmax scale.
        out_dtype: dtype of out (default q.dtype).

    Returns:
        out [B, Sq, Hq, D] and lse [B, Hq, Sq] float32; a sequence with no cached token gives
        out = 0, lse = -inf.
    """
    b, sq, hq, d = q.shape
    page_size, hkv = k_pages.shape[1], k_pages.shape[2]
    g = hq // hkv
    out = torch.zeros(b, hkv, g * sq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, hkv, g * sq), -math.inf, dtype=torch.float32, device=q.device)
    for i in range(b):
        n = int(context_lens[i])
        if n == 0:
            continue
        qi = q[i].float().view(sq, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * sq, d) * scale
        row_max = torch.full((hkv, g * sq), -math.inf, device=q.device)
        row_sum = torch.zeros(hkv, g * sq, device=q.device)
        acc = torch.zeros(hkv, g * sq, d, device=q.device)
        num_pages = -(-n // page_size)
        for p0 in range(0, num_pages, PAGES_PER_TILE):
            pages = block_tables[i, p0 : min(num_pages, p0 + PAGES_PER_TILE)].long()
            # [tile pages, page_size, Hkv, D] -> [Hkv, tile tokens, D]
            kt = k_pages[pages].float().flatten(0, 1).transpose(0, 1)
            vt = v_pages[pages].float().flatten(0, 1).transpose(0, 1)
            valid = min(n - p0 * page_size, kt.shape[1])
            kt, vt = kt[:, :valid], vt[:, :valid]
            s = qi @ kt.transpose(-1, -2)  # [Hkv, G*Sq, tile tokens]
            new_max = torch.maximum(row_max, s.amax(-1))
            alpha = torch.exp(row_max - new_max)
            p = torch.exp(s - new_max[..., None])
            row_sum = row_sum * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ vt
            row_max = new_max
        out[i] = acc / row_sum[..., None]
        lse[i] = row_max + torch.log(row_sum)
    # [B, Hkv, G*Sq, D] -> [B, Sq, Hq, D]
    out = out.view(b, hkv, g, sq, d).permute(0, 3, 1, 2, 4).reshape(b, sq, hq, d)
    lse = lse.view(b, hkv, g, sq).reshape(b, hq, sq)
    return out.to(out_dtype or q.dtype), lse
