"""Causal language-modeling loss that stays exact when the sequence is split across ranks.

Each rank sums the cross-entropy of the tokens it holds and divides by the global number of
counted tokens, so the ranks' losses add up (all-reduce SUM) to the loss of the whole sequence,
and each rank's gradient is its share of the global mean's gradient.
"""

from __future__ import annotations

import torch


def shift_labels(input_ids: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets: labels[:, t] = input_ids[:, t + 1], and the last = ignore_index.

    Shift the full sequence before sharding it: the target of a shard's last token lives on
    another rank.

    Args:
        input_ids: [B, S] token ids.
        ignore_index: label of the last position, which has no next token.

    Returns:
        labels [B, S], same dtype as input_ids.
    """
    labels = input_ids.new_full(input_ids.shape, ignore_index)  # [B, S]
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of token cross-entropies divided by the number of counted tokens.

    Args:
        logits: [B, S, V] (computed in float32 whatever their dtype).
        labels: [B, S], already shifted (labels[:, t] is the target of position t, e.g. from
            `shift_labels`); positions labeled `ignore_index` do not count.
        ignore_index: label value to skip.
        num_tokens: the divisor. A sequence-parallel caller passes the global number of
            non-ignored labels (all ranks together); None uses this call's own count, which
            equals `torch.nn.functional.cross_entropy(..., reduction="mean")`.

    Returns:
        A float32 scalar. When no token counts (and num_tokens is None) it is 0, not NaN.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not match labels of shape "
            f"{tuple(labels.shape)}; expected logits [B, S, V] and labels [B, S]"
        )
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),  # [B*S, V]
        labels.reshape(-1),  # [B*S]
        ignore_index=ignore_index,
        reduction="sum",
    )
    if num_tokens is None:
        num_tokens = (labels != ignore_index).sum().clamp(min=1)
    return total / num_tokens
