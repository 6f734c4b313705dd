"""`ring_attention`: exact attention over a sequence sharded across the ranks of a group.

Forward: K/V shards travel the ring (W - 1 hops) while each rank attends its queries to the
shard it holds; the partial (out, lse) pairs merge in float32 and are cast once at the end.

Backward: K/V travel again; each rank adds its share of dK/dV (float32) to a buffer that travels
with them, and after W hops the buffer arrives back at the shard's owner:

    step t: rank r holds K/V of rank r-t and the dK/dV that ranks r-t .. r-1 added to it;
            it adds its own and passes both to rank r+1.

Every block backward uses the global lse and delta = rowsum(dO * O) of the merged attention, so
gradients through the merge are exact. Only q, k, v, out and lse are saved for backward.

Registered as the torch.library ops `ringattn::ring_fwd` / `ringattn::ring_bwd`, visible to
torch.compile and to selective activation checkpointing.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from ringattn.comm import RingComm
from ringattn.flash import check_qkv
from ringattn.kernels import attention as ops
from ringattn.layout import check_layout, check_seq_len, group_rank_and_size
from ringattn.merge import merge_into
from ringattn.schedule import plan_step

_NO_GROUP = ""  # group name used when torch.distributed is not initialized (one rank)


def _group(name: str) -> dist.ProcessGroup | None:
    return None if name == _NO_GROUP else _resolve_process_group(name)


def _rank_and_size(name: str) -> tuple[int, int]:
    return (0, 1) if name == _NO_GROUP else group_rank_and_size(_group(name))


def _ring_forward(q, k, v, scale, causal, layout, group_name, backend):
    rank, world = _rank_and_size(group_name)
    b, s_local, h, d = q.shape
    seq_len = s_local * world
    out = torch.zeros(b, s_local, h, d, dtype=torch.float32, device=q.device)
    lse = torch.full((b, h, s_local), float("-inf"), dtype=torch.float32, device=q.device)
    comm = RingComm(_group(group_name)) if world > 1 else None
    kv = torch.stack([k, v])  # [2, B, S/W, Hkv, D]: one buffer travels
    for step in range(world):
        if step + 1 < world:
            next_kv = comm.send_recv(kv)
            comm.commit()
        src = (rank - step) % world
        for task in plan_step(seq_len, rank, src, world, layout, causal):
            o, l = ops.attention_fwd(
                q[:, task.q], kv[0, :, task.k], kv[1, :, task.k],
                scale=scale, offset=task.offset, out_dtype=torch.float32, backend=backend,
            )  # fmt: skip
            merge_into(out, lse, o, l, task.q)
        if step + 1 < world:
            comm.wait()
            kv = next_kv
    return out.to(q.dtype), lse


def _ring_backward(do, q, k, v, out, lse, dlse, scale, causal, layout, group_name, backend):
    rank, world = _rank_and_size(group_name)
    seq_len = q.shape[1] * world
    delta = ops.attention_delta(do, out, backend=backend)  # [B, H, S/W]
    if dlse is not None:  # d lse / d s = P, so a gradient on lse folds into delta
        delta = delta - dlse.float()
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    comm = RingComm(_group(group_name)) if world > 1 else None
    kv = torch.stack([k, v])  # [2, B, S/W, Hkv, D]
    dkv_in = None  # dK/dV of the held shard, accumulated by the ranks before this one
    for step in range(world):
        if step + 1 < world:
            next_kv = comm.send_recv(kv)
            comm.commit()
        src = (rank - step) % world
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
        for task in plan_step(seq_len, rank, src, world, layout, causal):
            dq_t, dk_t, dv_t = ops.attention_bwd(
                do[:, task.q], q[:, task.q], kv[0, :, task.k], kv[1, :, task.k],
                lse[:, :, task.q].contiguous(), delta[:, :, task.q].contiguous(),
                scale=scale, offset=task.offset, backend=backend,
            )  # fmt: skip
            dq[:, task.q] += dq_t
            dkv[0, :, task.k] += dk_t
            dkv[1, :, task.k] += dv_t
        if world == 1:
            return _grads(dq, dkv, q, k)
        comm.wait()  # the dK/dV posted last step (dkv_in) arrived, and the next K/V
        if step + 1 < world:
            kv = next_kv
        if dkv_in is not None:
            dkv += dkv_in
        dkv_in = comm.send_recv(dkv)  # pass it on; receive the next shard's
        comm.commit()
    comm.wait()  # the last hop brought our own shard's complete dK/dV home
    return _grads(dq, dkv_in, q, k)


def _grads(dq, dkv, q, k):
    # dk and dv are copies, not views of one buffer: a custom op's outputs may not alias.
    return dq.to(q.dtype), dkv[0].to(k.dtype, copy=True), dkv[1].to(k.dtype, copy=True)


@torch.library.custom_op("ringattn::ring_fwd", mutates_args=())
def _ring_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool,
    layout: str,
    group_name: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _ring_forward(q, k, v, scale, causal, layout, group_name, backend)


@_ring_fwd_op.register_fake
def _(q, k, v, scale, causal, layout, group_name, backend):
    b, s, h, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, s), dtype=torch.float32)


@torch.library.custom_op("ringattn::ring_bwd", mutates_args=())
def _ring_bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    scale: float,
    causal: bool,
    layout: str,
    group_name: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ring_backward(do, q, k, v, out, lse, dlse, scale, causal, layout, group_name, backend)


@_ring_bwd_op.register_fake
def _(do, q, k, v, out, lse, dlse, scale, causal, layout, group_name, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, *ctx.args = inputs
    ctx.save_for_backward(q, k, v, *output)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _ring_bwd_op(dout, q, k, v, out, lse, dlse, *ctx.args)
    return (dq, dk, dv) + (None,) * len(ctx.args)


_ring_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _local_problem(q, k, v, layout: str, world: int) -> str | None:
    """This rank's input error, or None."""
    try:
        check_qkv(q, k, v, what="ring_attention")
        check_layout(layout)
        if q.shape[1] != k.shape[1]:
            raise ValueError(
                f"ring_attention: q holds {q.shape[1]} tokens but k/v hold {k.shape[1]}; "
                "each rank must hold the same tokens of q, k and v"
            )
        check_seq_len(q.shape[1] * world, layout, world)
    except ValueError as err:
        return str(err)
    return None


def _check_ranks(q, k, layout, causal, group, rank, world, problem: str | None) -> None:
    """Cross-rank validation (one all_gather_object): every rank raises the same ValueError."""
    mine = (problem, tuple(q.shape), tuple(k.shape), str(q.dtype), layout, causal)
    every = [None] * world
    dist.all_gather_object(every, mine, group=group)
    problems = [f"rank {r}: {p[0]}" for r, p in enumerate(every) if p[0] is not None]
    if problems:
        raise ValueError("ring_attention: bad input on " + "; ".join(problems))
    if len({p[1:] for p in every}) > 1:
        sizes = ", ".join(
            f"rank {r}: q {p[1]} k/v {p[2]} {p[3]} {p[4]} causal={p[5]}"
            for r, p in enumerate(every)
        )
        raise ValueError(f"ring_attention: ranks disagree on their local inputs ({sizes})")


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    layout: str = "zigzag",
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over a sequence sharded across the ranks of `group`.

    Args:
        q: [B, S/W, Hq, D] this rank's queries: the tokens `layout` assigns to this rank.
        k, v: [B, S/W, Hkv, D] this rank's keys and values (same tokens); Hq % Hkv == 0.
        causal: causal masking by global position (token at position p sees positions <= p).
        softmax_scale: default D ** -0.5.
        group: process group holding the sequence (default: the world group). Every rank of
            the group calls this with same-shaped inputs.
        layout: "zigzag" (default) | "striped" | "contiguous"; see `ringattn.layout`.
        return_lse: also return this rank's lse shard [B, Hq, S/W] float32.
        backend: "triton" | "torch" | None (triton for CUDA tensors, torch on CPU).

    Returns:
        This rank's shard of the output [B, S/W, Hq, D] (q's dtype), and optionally the lse.
        Differentiable in q, k, v.

    Raises:
        ValueError: bad input, quoting the sizes. With env RINGATTN_VALIDATE=1 the ranks first
            compare their inputs (one collective) so every rank raises, including for ranks whose
            local lengths differ.
        RingTimeoutError: a peer did not complete a transfer in time (env RINGATTN_COMM_TIMEOUT).
    """
    rank, world = group_rank_and_size(group)
    problem = _local_problem(q, k, v, layout, world)
    if world > 1 and os.environ.get("RINGATTN_VALIDATE") == "1":
        _check_ranks(q, k, layout, causal, group, rank, world, problem)
    if problem is not None:
        raise ValueError(problem)
    backend = ops.resolve_backend(backend, q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if dist.is_available() and dist.is_initialized():
        group_name = (group if group is not None else dist.group.WORLD).group_name
    else:
        group_name = _NO_GROUP
    out, lse = _ring_fwd_op(q, k, v, scale, causal, layout, group_name, backend)
    return (out, lse) if return_lse else out
