"""Dense attention that materializes the whole score matrix: the reference tests compare to.

Run it in float64 for the ground truth, or in a low precision dtype to measure the error that a
naive computation in that dtype makes (the tolerance policy in the tests).
"""

from __future__ import annotations

import math

import torch


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    offset: int | None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> out [B, Sq, Hq, D], lse [B, Hq, Sq].

    Computes in `dtype` (default: q's), K/V repeated over each GQA group. Rows that see no key
    give out = 0 and lse = -inf. Differentiable (use it with autograd for reference gradients).
    """
    dtype = dtype or q.dtype
    hq, hkv = q.shape[2], k.shape[2]
    q, k, v = (t.to(dtype).transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale  # [B, Hq, Sq, Sk]
    if offset is not None:
        sq, sk = s.shape[-2:]
        rows = torch.arange(sq, device=q.device)[:, None]
        cols = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(cols > rows + offset, -math.inf)
    lse = torch.logsumexp(s.float() if dtype in (torch.float16, torch.bfloat16) else s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows: softmax gives NaN -> 0
    out = p @ v
    return out.transpose(1, 2), lse.float() if dtype != torch.float64 else lse
