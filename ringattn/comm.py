"""RingComm: the only code in ringattn that sends or receives.

Every rank of a group sends to the next rank and receives from the previous one:

    rank 0 ──► rank 1 ──► rank 2 ──► ... ──► rank W-1
      ▲                                          │
      └──────────────────────────────────────────┘

Usage (double buffering: the next block is in flight while the current one computes):

    comm = RingComm(group)
    nxt = comm.send_recv(cur)       # queue: send `cur` to next, receive into a new buffer
    comm.commit()                   # start the transfers
    ...compute on cur...
    comm.wait()                     # every Work handle waited on; `nxt` now holds the data

Ranks are group ranks; peers are mapped to global ranks for the P2P ops. A transfer that does not
complete within `timeout` raises `RingTimeoutError` naming the peer. When the group's backend is
gloo and the tensors live on a GPU (several processes sharing one GPU, where NCCL refuses and gloo
cannot send device memory), transfers are staged through pinned host buffers.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


class RingTimeoutError(RuntimeError):
    """A peer did not complete a transfer in time (it died, hung, or took another path)."""


def _default_timeout() -> float:
    return float(os.environ.get("RINGATTN_COMM_TIMEOUT", DEFAULT_TIMEOUT_S))


class RingComm:
    """Point-to-point ring exchange over a process group.

    Args:
        group: process group (None: the world group).
        timeout: seconds to wait on a transfer before raising `RingTimeoutError` (default:
            env RINGATTN_COMM_TIMEOUT, else 300).
        stage_through_host: copy tensors through host memory around each transfer. None: only
            for CUDA tensors on a gloo group. True forces it (tests exercise it on CPU).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        timeout: float | None = None,
        stage_through_host: bool | None = None,
    ):
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        if self.rank < 0:
            raise ValueError("this process is not a member of the given process group")
        self.next_rank = dist.get_global_rank(self.group, (self.rank + 1) % self.world_size)
        self.prev_rank = dist.get_global_rank(self.group, (self.rank - 1) % self.world_size)
        self.timeout = _default_timeout() if timeout is None else float(timeout)
        self._gloo = dist.get_backend(self.group) == "gloo"
        self._force_staging = stage_through_host
        self._ops: list[dist.P2POp] = []
        self._peers: list[
            str
        ] = []  # one entry per queued op: "send to rank N" / "recv from rank N"
        self._unstage: list[tuple[torch.Tensor, torch.Tensor]] = []  # (host buffer, destination)
        self._works: list = []

    def _staged(self, t: torch.Tensor) -> bool:
        if self._force_staging is not None:
            return self._force_staging
        return self._gloo and t.device.type == "cuda"

    def send_recv(self, send: torch.Tensor, recv: torch.Tensor | None = None) -> torch.Tensor:
        """Queue sending `send` to the next rank and receiving a same-shaped tensor from the
        previous one; returns the receive buffer (valid after `wait`)."""
        recv = torch.empty_like(send) if recv is None else recv
        send_buf, recv_buf = send.contiguous(), recv
        if self._staged(send):
            send_buf = torch.empty(send.shape, dtype=send.dtype, pin_memory=send.is_cuda)
            send_buf.copy_(send, non_blocking=True)
            recv_buf = torch.empty(recv.shape, dtype=recv.dtype, pin_memory=recv.is_cuda)
            self._unstage.append((recv_buf, recv))
            if send.is_cuda:
                torch.cuda.current_stream(send.device).synchronize()  # host copy done before send
        elif not recv.is_contiguous():
            raise ValueError("RingComm receive buffers must be contiguous")
        self._ops.append(dist.P2POp(dist.isend, send_buf, self.next_rank, self.group))
        self._ops.append(dist.P2POp(dist.irecv, recv_buf, self.prev_rank, self.group))
        self._peers += [f"send to rank {self.next_rank}", f"receive from rank {self.prev_rank}"]
        return recv

    def commit(self) -> None:
        """Start every queued transfer (earlier ones may still be in flight)."""
        if not self._ops:
            return
        works = dist.batch_isend_irecv(self._ops)
        # gloo returns one Work per op; a coalescing backend (NCCL) may return a single one.
        if len(works) == len(self._ops):
            self._works += list(zip(works, self._peers, strict=True))
        else:
            peers = f"ranks {self.prev_rank} and {self.next_rank}"
            self._works += [(w, f"exchange with {peers}") for w in works]
        self._ops, self._peers = [], []

    def wait(self) -> None:
        """Wait on every started transfer; copy staged receives to their destinations."""
        timeout = timedelta(seconds=self.timeout)
        works, self._works = self._works, []
        for work, peer in works:
            try:
                completed = work.wait(timeout)
            except RuntimeError as err:
                raise RingTimeoutError(
                    f"ring rank {self.rank} (global {dist.get_rank()}): {peer} did not complete "
                    f"within the {self.timeout:g}s timeout or failed: {err}"
                ) from err
            if completed is False:
                raise RingTimeoutError(
                    f"ring rank {self.rank} (global {dist.get_rank()}): {peer} did not complete "
                    f"within the {self.timeout:g}s timeout"
                )
        for host, dest in self._unstage:
            dest.copy_(host, non_blocking=dest.is_cuda)
        self._unstage = []
