"""The sharded cache's collectives: all of its communication. No K/V ever crosses ranks.

    per prefill or decode step   all_gather of 2 ints per rank   (capacity check, `gather_ints`)
    per layer per decode step    all_gather of lse [B, Hq, Sq]   (`merge_across_ranks`)
                                 all_reduce of out [B, Sq, Hq, D] float32

gloo cannot move CUDA tensors, so with a gloo group CUDA tensors are staged through host memory
(as `RingComm` does); NCCL takes them directly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ringattn.layout import group_rank_and_size


def _comm_device(group: dist.ProcessGroup | None, device: torch.device) -> torch.device:
    """Where a tensor on `device` must be for a collective on `group`."""
    if device.type == "cpu" or "nccl" in str(dist.get_backend(group)):
        return device
    return torch.device("cpu")


def gather_ints(values: list[int], *, group: dist.ProcessGroup | None) -> list[list[int]]:
    """Every rank's `values` (same length on every rank), in group rank order."""
    _, world = group_rank_and_size(group)
    if world == 1:
        return [list(values)]
    nccl = "nccl" in str(dist.get_backend(group))
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    return [p.tolist() for p in parts]


def merge_across_ranks(
    out: torch.Tensor, lse: torch.Tensor, *, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge every rank's partial attention over disjoint key sets into the full result.

        lse = log(sum_r exp(lse_r))                  all_gather of lse_r
        out = sum_r exp(lse_r - lse) * out_r         all_reduce (sum) of the rescaled out_r

    A rank with no keys for a row (out_r = 0, lse_r = -inf) gets weight 0; a row no rank has
    keys for gives out = 0, lse = -inf, never NaN.

    Args:
        out: [B, S, H, D] this rank's partial output (any float dtype).
        lse: [B, H, S] float32, its log-sum-exp.
        group: the ranks to merge over (None: the world group).

    Returns:
        (out [B, S, H, D] float32, lse [B, H, S] float32), the same on every rank.
    """
    _, world = group_rank_and_size(group)
    if world == 1:
        return out.float(), lse.float()
    device = _comm_device(group, out.device)
    lse_local = lse.float().to(device).contiguous()
    parts = [torch.zeros_like(lse_local) for _ in range(world)]
    dist.all_gather(parts, lse_local, group=group)
    lse_all = torch.logsumexp(torch.stack(parts), dim=0)  # [W, B, H, S] -> [B, H, S]
    ref = torch.where(torch.isneginf(lse_all), 0.0, lse_all)  # empty rows: every weight is 0
    weight = torch.exp(lse_local - ref).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    merged = (out.float().to(device) * weight).contiguous()
    dist.all_reduce(merged, group=group)
    return merged.to(out.device), lse_all.to(out.device)
