"""Merge partial attention results by their log-sum-exp, in float32.

Attention over keys K = A ∪ B from the partials over A and over B:

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

A partial with lse = -inf (no visible key) has weight 0; two such partials merge to out = 0,
lse = -inf, never NaN.
"""

from __future__ import annotations

import torch


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partials.

    Args:
        out_a, out_b: [B, S, H, D] partial outputs (any float dtype).
        lse_a, lse_b: [B, H, S] float32 natural-log LSEs of the two partials.

    Returns:
        (out [B, S, H, D] float32, lse [B, H, S] float32).
    """
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    ref = torch.where(
        torch.isneginf(lse), 0.0, lse
    )  # empty rows: both weights become exp(-inf) = 0
    w_a = torch.exp(lse_a - ref).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    w_b = torch.exp(lse_b - ref).transpose(1, 2).unsqueeze(-1)
    return w_a * out_a.float() + w_b * out_b.float(), lse


def merge_into(
    acc_out: torch.Tensor,
    acc_lse: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    rows: slice,
) -> None:
    """Merge a partial for query rows `rows` into float32 accumulators, in place.

    acc_out: [B, S, H, D] float32, acc_lse: [B, H, S] float32; out/lse cover `rows` only.
    """
    merged_out, merged_lse = merge_partials(acc_out[:, rows], acc_lse[:, :, rows], out, lse)
    acc_out[:, rows] = merged_out
    acc_lse[:, :, rows] = merged_lse
