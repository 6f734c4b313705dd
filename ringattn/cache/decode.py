"""Attention against the sharded paged cache, one layer at a time.

Decode (`cached_attention`): Sq new tokens per sequence, whose q, k, v are replicated on every
rank (every rank ran the same embedding and projections on the same token ids):

    every rank r   out_r, lse_r = paged attention of q over the prefix cached on rank r
    rank 0 only    merge in the new tokens' attention to themselves (causal, bottom-right)
    every rank     one LSE merge across ranks: all_gather of lse, all_reduce of rescaled out
    owner ranks    cache the new tokens' K/V (a token is written only by the rank that the
                   placement policy gives it; see `ringattn.cache.sharding`)

    new token j of a chunk (Sq = 3) sees
        cached prefix, on all ranks    new tokens
        x x x x x x x x x x x x x x    x . .
        x x x x x x x x x x x x x x    x x .
        x x x x x x x x x x x x x x    x x x

The prefix's partials are disjoint, so their LSE merge is exact; a rank holding none of a
sequence's tokens contributes out = 0, lse = -inf (weight 0). No K/V crosses ranks.

Prefill (`prefill_attention`): ring attention over this rank's shard of the ring part of the
prompt, then this rank's K/V into its own pages.
"""

from __future__ import annotations

import torch

from ringattn.cache.collectives import merge_across_ranks
from ringattn.cache.sharding import PrefillPlan, ShardedKVCache, StepPlan
from ringattn.flash import check_qkv, flash_attn
from ringattn.kernels.attention import resolve_backend
from ringattn.kernels.paged import paged_attention_fwd
from ringattn.merge import merge_partials
from ringattn.ring import ring_attention


def _check_inputs(
    cache: ShardedKVCache,
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tokens: tuple[int, int],
    what: str,
) -> None:
    """ValueError (quoting sizes) on every rank, before any collective, for inputs that do not
    fit the plan (`tokens` = expected (batch, seqlen)) or the pool."""
    check_qkv(q, k, v, what=what)
    cache.pool.check_kv(k, v, what=what)
    if not 0 <= layer < cache.pool.num_layers:
        raise ValueError(f"{what}: layer {layer} out of range for {cache.pool.num_layers} layers")
    if tuple(q.shape[:2]) != tokens or tuple(k.shape[:2]) != tokens:
        raise ValueError(
            f"{what}: q {tuple(q.shape)} / k {tuple(k.shape)} do not match the plan's "
            f"[batch, tokens] = {list(tokens)}"
        )


def write_prefill_kv(
    cache: ShardedKVCache, plan: PrefillPlan, layer: int, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Cache this rank's ring-part K/V [B, R/W, Hkv, D] of `layer` at the plan's slots."""
    # [B, R/W, Hkv, D] -> [B * R/W, Hkv, D], matching plan.slots [B, R/W] flattened
    cache.pool.write(layer, plan.slots.flatten(), k.flatten(0, 1), v.flatten(0, 1))


def prefill_attention(
    cache: ShardedKVCache,
    plan: PrefillPlan,
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal ring attention over the ring part of the prompts, caching this rank's K/V.

    Args:
        cache, plan: from `cache.begin_prefill`; call once per layer on every rank.
        layer: layer index in the pool.
        q: [B, R/W, Hq, D] this rank's queries, at global positions `plan.positions`.
        k, v: [B, R/W, Hkv, D] this rank's keys and values (RoPE applied).
        softmax_scale: default D ** -0.5.
        backend: "triton" | "torch" | None (by device).

    Returns:
        This rank's shard of the attention output [B, R/W, Hq, D].
    """
    tokens = (len(plan.seq_ids), plan.slots.shape[1])
    _check_inputs(cache, layer, q, k, v, tokens, "prefill_attention")
    out = ring_attention(
        q,
        k,
        v,
        causal=True,
        softmax_scale=softmax_scale,
        group=cache.group,
        layout=plan.layout,
        backend=backend,
    )
    write_prefill_kv(cache, plan, layer, k, v)
    return out


def cached_attention(
    cache: ShardedKVCache,
    plan: StepPlan,
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of Sq new tokens to their sequence's cached prefix and to each other (causal),
    then their K/V into the cache on the ranks that own them.

    Args:
        cache, plan: from `cache.begin_step`; call once per layer on every rank.
        layer: layer index in the pool.
        q: [B, Sq, Hq, D] the new tokens' queries, the same on every rank.
        k, v: [B, Sq, Hkv, D] their keys (RoPE applied) and values, the same on every rank.
        softmax_scale: default D ** -0.5.
        backend: "triton" | "torch" | None (triton for CUDA tensors, torch on CPU).

    Returns:
        out [B, Sq, Hq, D] in q's dtype, the same on every rank.
    """
    _check_inputs(cache, layer, q, k, v, (len(plan.seq_ids), plan.num_new), "cached_attention")
    backend = resolve_backend(backend, q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    pool = cache.pool
    out, lse = paged_attention_fwd(
        q,
        pool.k[layer],
        pool.v[layer],
        plan.block_tables,
        plan.context_lens,
        scale=scale,
        out_dtype=torch.float32,
        backend=backend,
    )
    if cache.rank == 0:  # the new tokens among themselves: counted once, here
        out_new, lse_new = flash_attn(
            q, k, v, causal=True, softmax_scale=scale, return_lse=True, backend=backend
        )
        out, lse = merge_partials(out, lse, out_new, lse_new)
    out, _ = merge_across_ranks(out, lse, group=cache.group)
    # [B, Sq, Hkv, D] -> [B * Sq, Hkv, D]; keep the rows this rank caches
    rows = plan.write_rows
    pool.write(layer, plan.write_slots, k.flatten(0, 1)[rows], v.flatten(0, 1)[rows])
    return out.to(q.dtype)
