"""How a sequence of S tokens is split over the W ranks of a group.

    contiguous  rank r holds tokens [r*S/W, (r+1)*S/W)                 S % W == 0
    zigzag      2W equal chunks; rank r holds chunks r and 2W-1-r       S % 2W == 0
    striped     rank r holds tokens r, r+W, r+2W, ...                  S % W == 0

    S = 16, W = 2       tokens 0 .......... 15
    contiguous  r0: 0-7             r1: 8-15
    zigzag      r0: 0-3, 12-15      r1: 4-7, 8-11
    striped     r0: 0,2,4,...,14    r1: 1,3,5,...,15

Under causal masking, zigzag and striped give every rank the same amount of work. Within a
rank's shard, global positions always increase with the local index.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "zigzag", "striped")


class Segment(NamedTuple):
    """A run of a rank's local tokens: local token i of the run has global position
    `start + i * stride`, for i in [0, length)."""

    start: int
    length: int
    stride: int


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def required_multiple(layout: str, world_size: int) -> int:
    """The sequence length must be a multiple of this for `layout` over `world_size` ranks."""
    check_layout(layout)
    return 2 * world_size if layout == "zigzag" else world_size


def check_seq_len(seq_len: int, layout: str, world_size: int) -> None:
    multiple = required_multiple(layout, world_size)
    if seq_len % multiple != 0:
        raise ValueError(
            f"layout {layout!r} over {world_size} ranks needs the sequence length to be a "
            f"multiple of {multiple}; got {seq_len}"
        )


def segments(seq_len: int, rank: int, world_size: int, layout: str) -> list[Segment]:
    """The runs of global positions that `rank` holds, in local order."""
    check_seq_len(seq_len, layout, world_size)
    if layout == "contiguous":
        n = seq_len // world_size
        return [Segment(rank * n, n, 1)]
    if layout == "zigzag":
        c = seq_len // (2 * world_size)
        return [Segment(rank * c, c, 1), Segment((2 * world_size - 1 - rank) * c, c, 1)]
    return [Segment(rank, seq_len // world_size, world_size)]


def positions(seq_len: int, rank: int, world_size: int, layout: str) -> torch.Tensor:
    """LongTensor [seq_len // world_size]: the global positions `rank` holds, in local order."""
    return torch.cat(
        [
            torch.arange(s.start, s.start + s.length * s.stride, s.stride)
            for s in segments(seq_len, rank, world_size, layout)
        ]
    )


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, size) in `group`; (0, 1) when torch.distributed is not initialized."""
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialized")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def sequence_positions(
    seq_len: int, *, group: dist.ProcessGroup | None = None, layout: str = "zigzag"
) -> torch.Tensor:
    """Global token positions this rank holds (for RoPE, `position_ids`, labels).

    Args:
        seq_len: total sequence length S.
        group: process group the sequence is split over (default: the world group).
        layout: "contiguous" | "zigzag" | "striped".

    Returns:
        LongTensor [S / W], increasing.
    """
    rank, world = group_rank_and_size(group)
    return positions(seq_len, rank, world, layout)


def _take_shard(x: torch.Tensor, dim: int, rank: int, world: int, layout: str) -> torch.Tensor:
    parts = []
    for seg in segments(x.shape[dim], rank, world, layout):
        if seg.stride == 1:
            parts.append(x.narrow(dim, seg.start, seg.length))
        else:  # striped: [.., S, ..] -> [.., S/W, W, ..], pick column `rank`
            parts.append(x.unflatten(dim, (seg.length, seg.stride)).select(dim + 1, seg.start))
    return torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0].contiguous()


def _assemble(parts: list[torch.Tensor], dim: int, layout: str) -> torch.Tensor:
    """Inverse of sharding: the full tensor from every rank's shard (rank order)."""
    if layout == "contiguous":
        return torch.cat(parts, dim=dim)
    if layout == "zigzag":
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim=dim)
    return torch.stack(parts, dim=dim + 1).flatten(dim, dim + 1)  # striped: interleave


def shard_sequence(
    x: torch.Tensor, *, group: dist.ProcessGroup | None = None, dim: int = 1, layout: str = "zigzag"
) -> torch.Tensor:
    """This rank's shard of a full tensor `x` (identical on every rank) along `dim`.

    Raises:
        ValueError: unknown layout, or a length that the layout cannot split (names the multiple).
    """
    rank, world = group_rank_and_size(group)
    dim = dim % x.dim()
    check_seq_len(x.shape[dim], layout, world)
    return _take_shard(x, dim, rank, world, layout)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, group, dim, layout):
        ctx.group, ctx.dim, ctx.layout = group, dim, layout
        parts = [torch.empty_like(x_local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x_local.contiguous(), group=group)
        return _assemble(parts, dim, layout)

    @staticmethod
    def backward(ctx, grad_full):
        # Every rank consumed the full tensor: the shard's gradient sums all ranks' gradients.
        grad_full = grad_full.contiguous()
        dist.all_reduce(grad_full, group=ctx.group)
        rank, world = group_rank_and_size(ctx.group)
        return _take_shard(grad_full, ctx.dim, rank, world, ctx.layout), None, None, None


def gather_sequence(
    x_local: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    dim: int = 1,
    layout: str = "zigzag",
) -> torch.Tensor:
    """The full tensor on every rank: the inverse of `shard_sequence`. Differentiable.

    Every rank must pass a shard of the same shape.
    """
    check_layout(layout)
    dim = dim % x_local.dim()
    _, world = group_rank_and_size(group)
    if world == 1:
        return x_local
    return _GatherSequence.apply(x_local, group, dim, layout)
