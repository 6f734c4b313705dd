"""Sequence parallelism applied from outside a model: `parallelize`, batch sharding, exact loss.

    model = Llama(config=cfg)                                  # plain single-device code
    parallelize(model, group=sp_group, layout="zigzag")        # swap its attention cores
    batch = shard_batch(input_ids, group=sp_group, layout="zigzag")
    logits = model(batch["input_ids"], position_ids=batch["position_ids"])
    loss = sequence_parallel_loss(logits, batch["labels"], group=sp_group)
    loss.backward()
    allreduce_gradients(model, group=sp_group)                 # each rank saw S/W tokens

The model's attention core (`ringattn.models.CoreAttention`, the softmax(QK^T)V step) is
replaced by `SequenceParallelAttention`; everything else (projections, RoPE with the global
`position_ids`, norms, MLP) runs per token and needs no change.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ringattn.checkpoint import CHOICES, apply_checkpointing
from ringattn.layout import group_rank_and_size, sequence_positions, shard_sequence
from ringattn.models.llama import CoreAttention
from ringattn.models.loss import causal_lm_loss, shift_labels
from ringattn.ring import ring_attention

STRATEGIES = ("ring", "ulysses")


class SequenceParallelAttention(nn.Module):
    """Causal attention over a sequence sharded across `group`: the ring, or Ulysses
    (all-to-all over heads, DeepSpeed's DistributedAttention) around the local flash kernel."""

    def __init__(
        self,
        *,
        group: dist.ProcessGroup | None = None,
        layout: str = "zigzag",
        strategy: str = "ring",
        backend: str | None = None,
    ):
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
        self.group, self.layout, self.strategy, self.backend = group, layout, strategy, backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, S/W, Hq, D], k/v [B, S/W, Hkv, D] (this rank's tokens) -> [B, S/W, Hq, D]."""
        if self.strategy == "ulysses":
            from ringattn.integrations.deepspeed import ulysses_attention

            return ulysses_attention(
                q, k, v, causal=True, group=self.group, layout=self.layout, backend=self.backend
            )
        return ring_attention(
            q, k, v, causal=True, group=self.group, layout=self.layout, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"strategy={self.strategy}, layout={self.layout}"


def parallelize(
    model: nn.Module,
    *,
    group: dist.ProcessGroup | None = None,
    layout: str = "zigzag",
    strategy: str = "ring",
    backend: str | None = None,
    checkpoint: str = "none",
) -> nn.Module:
    """Make `model`'s attention sequence-parallel over `group`, in place; returns the model.

    Every `CoreAttention` submodule is replaced by a `SequenceParallelAttention`. Feed the model
    this rank's shard of the tokens with their global positions (`shard_batch`).

    Args:
        model: a model whose attention cores are `ringattn.models.CoreAttention`.
        group: the sequence-parallel process group (default: the world group).
        layout: "zigzag" | "striped" | "contiguous".
        strategy: "ring" (K/V travel the ring) | "ulysses" (all-to-all over heads).
        backend: kernel backend for the local attention ("triton" | "torch" | None).
        checkpoint: activation checkpointing policy for `model.layers`: "none" | "full" |
            "selective" (ring-aware: saves attention, recomputes the rest) | "offload" |
            "deepspeed" (DeepSpeed's activation checkpointing).

    Raises:
        ValueError: unknown strategy or policy, or a model without any `CoreAttention`.
    """
    targets = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, CoreAttention)
    ]
    if not targets:
        raise ValueError(f"parallelize: {type(model).__name__} has no CoreAttention module")
    if checkpoint not in CHOICES:
        raise ValueError(f"unknown checkpoint policy {checkpoint!r}; expected one of {CHOICES}")
    for parent, name in targets:
        core = SequenceParallelAttention(
            group=group, layout=layout, strategy=strategy, backend=backend
        )
        setattr(parent, name, core)
    if checkpoint != "none":
        apply_checkpointing(model, checkpoint)
    return model


def shard_batch(
    input_ids: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    layout: str = "zigzag",
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """This rank's shard of a language-modelling batch.

    Labels are shifted on the full sequence *before* sharding (the target of the token at
    position p is the token at p + 1, which may live on another rank).

    Args:
        input_ids: [B, S] the full batch, identical on every rank.
        labels: [B, S] already shifted (labels[:, t] is the target at position t, the last
            position `ignore_index`); default `shift_labels(input_ids)`. Checked: labels equal to
            input_ids, or with a target at the last position, are taken as unshifted and raise.
        group, layout: how the sequence is split.

    Returns:
        dict with input_ids, labels and position_ids (global positions, for RoPE), each
        [B, S/W].
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seqlen]; got shape {tuple(input_ids.shape)}")
    if labels is None:
        labels = shift_labels(input_ids, ignore_index=ignore_index)
    elif labels.shape != input_ids.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} differ in shape"
        )
    elif torch.equal(labels, input_ids) or bool((labels[:, -1] != ignore_index).any()):
        raise ValueError(
            "labels look unshifted: shifted labels have no target at the last position "
            f"(expected {ignore_index} there); pass shift_labels(input_ids) or leave labels=None"
        )
    seq_len = input_ids.shape[1]
    positions = sequence_positions(seq_len, group=group, layout=layout).to(input_ids.device)
    return {
        "input_ids": shard_sequence(input_ids, group=group, layout=layout),
        "labels": shard_sequence(labels, group=group, layout=layout),
        "position_ids": positions.expand(input_ids.shape[0], -1),
    }


def sequence_parallel_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean token loss over the whole sharded sequence, exact across ranks.

    Each rank sums its tokens' cross-entropies and divides by the global count of non-ignored
    tokens (one all_reduce). The returned value is the global mean on every rank; its gradient
    is this rank's share, so summing parameter gradients over `group` (`allreduce_gradients`)
    gives the gradient of the global mean.
    """
    _, world = group_rank_and_size(group)
    count = (labels != ignore_index).sum()
    if world > 1:
        count = count.clone()
        dist.all_reduce(count, group=group)
    local = causal_lm_loss(logits, labels, ignore_index=ignore_index, num_tokens=count)
    if world == 1:
        return local
    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    return local + (total - local.detach())


def allreduce_gradients(model: nn.Module, *, group: dist.ProcessGroup | None = None) -> None:
    """Sum parameter gradients over the sequence-parallel group (each rank saw S/W tokens)."""
    _, world = group_rank_and_size(group)
    if world == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
