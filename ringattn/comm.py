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
import weakref
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
        # one entry per queued op: "send to rank N" / "receive from rank N"
        self._peers: list[str] = []
        # staged receives: (host buffer, destination, event after the destination's allocation)
        self._unstage: list[tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]] = []
        # the last wait's staged receives: (destination, its version then, host copy) -- a send of
        # an unmodified received tensor forwards the host copy (no device -> host copy, no sync)
        self._received: list[tuple[weakref.ref, int, torch.Tensor]] = []
        self._copy_stream: torch.cuda.Stream | None = None  # host -> device copies
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
            send_buf = self._host_copy_of(send)
            recv_buf = torch.empty(recv.shape, dtype=recv.dtype, pin_memory=recv.is_cuda)
            ready = None
            if recv.is_cuda:  # recv's memory is free for the copy once the queued work is done
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(recv.device))
            self._unstage.append((recv_buf, recv, ready))
        elif not recv.is_contiguous():
            raise ValueError("RingComm receive buffers must be contiguous")
        self._ops.append(dist.P2POp(dist.isend, send_buf, self.next_rank, self.group))
        self._ops.append(dist.P2POp(dist.irecv, recv_buf, self.prev_rank, self.group))
        self._peers += [f"send to rank {self.next_rank}", f"receive from rank {self.prev_rank}"]
        return recv

    def _host_copy_of(self, send: torch.Tensor) -> torch.Tensor:
        """`send` in host memory: the buffer it arrived in if it is an unmodified staged receive
        (the ring passes on what it received), else a copy (waits for `send` to be computed)."""
        for ref, version, host in self._received:
            if ref() is send and send._version == version:
                return host
        host = torch.empty(send.shape, dtype=send.dtype, pin_memory=send.is_cuda)
        host.copy_(send, non_blocking=True)
        if send.is_cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(send.device))
            done.synchronize()  # the host copy is complete before the send reads it
        return host

    def _to_device(self, host: torch.Tensor, dest: torch.Tensor, ready) -> None:
        """Copy on a side stream so that it overlaps the compute already queued; the current
        stream's later work waits for it."""
        if not dest.is_cuda:
            dest.copy_(host)
            return
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(dest.device)
        current = torch.cuda.current_stream(dest.device)
        self._copy_stream.wait_event(ready)
        with torch.cuda.stream(self._copy_stream):
            dest.copy_(host, non_blocking=True)
        current.wait_stream(self._copy_stream)

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
        self._received = []
        for host, dest, ready in self._unstage:
            self._to_device(host, dest, ready)
            self._received.append((weakref.ref(dest), dest._version, host))
        self._unstage = []
