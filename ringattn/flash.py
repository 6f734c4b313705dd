"""`flash_attn`: exact single-device attention, block-wise, with its log-sum-exp.

Registered as the torch.library ops `ringattn::flash_fwd` / `ringattn::flash_bwd` (with fake
implementations), so `torch.compile` traces `flash_attn` without graph breaks; called eagerly,
the ops run the Triton kernels or their torch twins directly.
"""

from __future__ import annotations

import torch

from ringattn.kernels import attention as ops

MAX_HEAD_DIM = 256


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, what: str) -> None:
    """ValueError, quoting the sizes, unless q [B, Sq, Hq, D] and k, v [B, Sk, Hkv, D] agree."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{what}: {name} must be 4-D [batch, seqlen, heads, headdim]; "
                f"got shape {tuple(t.shape)}"
            )
    if k.shape != v.shape:
        raise ValueError(f"{what}: k and v shapes differ: k {tuple(k.shape)}, v {tuple(v.shape)}")
    (b, _, hq, d), (bk, _, hkv, dk) = q.shape, k.shape
    if b != bk or d != dk:
        raise ValueError(
            f"{what}: q {tuple(q.shape)} and k/v {tuple(k.shape)} must share batch and head dim"
        )
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"{what}: query heads ({hq}) must be a multiple of key/value heads ({hkv})"
        )
    if not 0 < d <= MAX_HEAD_DIM:
        raise ValueError(f"{what}: head dim must be in 1..{MAX_HEAD_DIM}; got {d}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{what}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"{what}: inputs must be floating point; got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{what}: q, k, v devices differ: {q.device}, {k.device}, {v.device}")


@torch.library.custom_op("ringattn::flash_fwd", mutates_args=())
def _flash_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    offset: int | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return ops.attention_fwd(q, k, v, scale=scale, offset=offset, backend=backend)


@_flash_fwd.register_fake
def _(q, k, v, scale, offset, backend):
    b, sq, hq, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, hq, sq), dtype=torch.float32)


@torch.library.custom_op("ringattn::flash_bwd", mutates_args=())
def _flash_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    scale: float,
    offset: int | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    delta = ops.attention_delta(do, out, backend=backend)
    if dlse is not None:  # d lse / d s = P, so a gradient on lse folds into delta
        delta = delta - dlse.float()
    dq, dk, dv = ops.attention_bwd(
        do, q, k, v, lse, delta, scale=scale, offset=offset, backend=backend
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@_flash_bwd.register_fake
def _(do, q, k, v, out, lse, dlse, scale, offset, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, ctx.scale, ctx.offset, ctx.backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _flash_bwd(dout, q, k, v, out, lse, dlse, ctx.scale, ctx.offset, ctx.backend)
    return dq, dk, dv, None, None, None


_flash_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention, computed block by block (memory O(S), never S x S).

    Args:
        q: [B, Sq, Hq, D] queries.
        k, v: [B, Sk, Hkv, D] keys and values; Hq % Hkv == 0 (GQA/MQA, K/V never repeated).
            Any Sq and Sk; any D <= 256.
        causal: mask with the diagonal aligned bottom-right: query i sees key j iff
            j <= i + Sk - Sq. With Sq > Sk the first Sq - Sk rows see nothing (out 0, lse -inf)::

                Sq=2, Sk=5      Sq=5, Sk=2
                x x x x .       . .
                x x x x x       . .
                                . .
                                x .
                                x x
        softmax_scale: scale of q @ k^T; default D ** -0.5.
        return_lse: also return the log-sum-exp.
        backend: "triton" | "torch" | None (triton for CUDA tensors, torch on CPU).

    Returns:
        out [B, Sq, Hq, D] in q's dtype, and with `return_lse` also lse [B, Hq, Sq] float32
        (natural log). Differentiable in q, k, v (and through lse).
    """
    check_qkv(q, k, v, what="flash_attn")
    backend = ops.resolve_backend(backend, q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    offset = k.shape[1] - q.shape[1] if causal else None
    out, lse = _flash_fwd(q, k, v, scale, offset, backend)
    return (out, lse) if return_lse else out
