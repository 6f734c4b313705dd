"""Activation checkpointing policies for transformer blocks, applied from outside the model.

    none       keep every activation (fastest, most memory)
    full       keep only each block's input; backward re-runs the whole block, ring included:
               every K/V block travels the ring once more (one extra forward ring per block)
    selective  ring-aware: keep the block input and the ring attention's (out, lse); backward
               recomputes norms, projections, RoPE and the MLP but not attention, so
               recomputation sends nothing around the ring
    offload    like full, with the block input held in host memory (pinned, copied
               asynchronously) and prefetched back while the next block's backward runs
    deepspeed  like full, through DeepSpeed's own activation checkpointing
               (`deepspeed.checkpointing.checkpoint`; honours `deepspeed.checkpointing.configure`,
               e.g. partitioned activations), for training under `deepspeed.initialize`

`selective` uses torch's selective activation checkpointing, keyed on the registered ops
`ringattn::ring_fwd` and `ringattn::flash_fwd` (the ring's forward is one op, so caching it caches
the whole ring).
"""

from __future__ import annotations

import functools
from types import MethodType

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

POLICIES = ("none", "full", "selective", "offload")  # what the memory planner models
# DeepSpeed's checkpointing keeps what `full` keeps (unless it partitions activations).
CHOICES = (*POLICIES, "deepspeed")


def _attention_ops():
    return (torch.ops.ringattn.ring_fwd.default, torch.ops.ringattn.flash_fwd.default)


def ring_aware_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Save attention (ring or flash) outputs; recompute everything else."""
    if op in _attention_ops():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(ring_aware_policy)


def _full_forward(block, inner, *args, **kwargs):
    return checkpoint(inner, *args, use_reentrant=False, **kwargs)


def _selective_forward(block, inner, *args, **kwargs):
    return checkpoint(inner, *args, use_reentrant=False, context_fn=_selective_context, **kwargs)


class _HostCopy:
    """A tensor moved to host memory, with an asynchronous copy back (prefetch)."""

    def __init__(self, t: torch.Tensor):
        self.device, self.requires_grad = t.device, t.requires_grad
        pin = t.device.type == "cuda"
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
        self.host.copy_(t.detach(), non_blocking=pin)
        self._back: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None

    def prefetch(self) -> None:
        """Start copying back to the compute device (side stream on CUDA)."""
        if self._back is not None:
            return
        if self.device.type == "cuda":
            stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(stream):
                self._back = self.host.to(self.device, non_blocking=True)
                self._ready = torch.cuda.Event()
                self._ready.record(stream)
        else:
            self._back = self.host.clone()

    def fetch(self) -> torch.Tensor:
        self.prefetch()
        if self._ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready)
        back, self._back = self._back, None
        return back


class _OffloadedBlock(torch.autograd.Function):
    """Run a block without keeping activations; keep its input on the host; in backward fetch
    it back, recompute with grad, backprop (parameter gradients accumulate as usual)."""

    @staticmethod
    def forward(ctx, chain, inner, kwargs, x, *params):
        ctx.chain, ctx.inner, ctx.kwargs = chain, inner, kwargs
        ctx.saved_input = _HostCopy(x)
        ctx.index = len(chain)
        chain.append(ctx.saved_input)
        with torch.no_grad():
            return inner(x, **kwargs)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.index > 0:  # the block before this one runs backward next: start its copy now
            ctx.chain[ctx.index - 1].prefetch()
        x = ctx.saved_input.fetch().requires_grad_(ctx.saved_input.requires_grad)
        with torch.enable_grad():
            out = ctx.inner(x, **ctx.kwargs)
        torch.autograd.backward(out, grad_out)
        return (None, None, None, x.grad) + (None,) * (len(ctx.needs_input_grad) - 4)


def _offload_forward(block, inner, x, **kwargs):
    model_chain = block._ringattn_offload_chain
    if block._ringattn_first:  # a new forward pass starts at the first block
        model_chain.clear()
    if not torch.is_grad_enabled():
        return inner(x, **kwargs)
    params = [p for p in block.parameters() if p.requires_grad]
    return _OffloadedBlock.apply(model_chain, inner, kwargs, x, *params)


def _deepspeed_forward(block, inner, *args, **kwargs):
    import deepspeed  # `deepspeed.checkpointing` is an attribute, not an importable module

    return deepspeed.checkpointing.checkpoint(inner, *args, **kwargs)


_FORWARDS = {
    "full": _full_forward,
    "selective": _selective_forward,
    "offload": _offload_forward,
    "deepspeed": _deepspeed_forward,
}


def apply_checkpointing(model: nn.Module, policy: str, *, blocks: nn.ModuleList | None = None):
    """Wrap every block of `model.layers` (or `blocks`) with `policy`, in place.

    Module names and state_dict keys are unchanged (each block's `forward` is wrapped).
    `offload` backpropagates with `torch.autograd.backward` inside the block (like reentrant
    checkpointing): use `loss.backward()`, not `torch.autograd.grad`.

    Raises:
        ValueError: unknown policy, or a model without `layers`.
    """
    if policy not in CHOICES:
        raise ValueError(f"unknown checkpoint policy {policy!r}; expected one of {CHOICES}")
    blocks = blocks if blocks is not None else getattr(model, "layers", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `layers`; pass blocks= explicitly")
    if policy == "none":
        return model
    chain: list[_HostCopy] = []  # offload: host copies of block inputs, in forward order
    for i, block in enumerate(blocks):
        inner = getattr(block, "_ringattn_inner_forward", block.forward)
        block._ringattn_inner_forward = inner
        block._ringattn_offload_chain = chain
        block._ringattn_first = i == 0
        block._ringattn_policy = policy
        block.forward = MethodType(functools.partial(_wrapped, _FORWARDS[policy], inner), block)
    return model


def _wrapped(forward, inner, block, *args, **kwargs):
    return forward(block, inner, *args, **kwargs)
