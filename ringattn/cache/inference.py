"""Inference of a Llama-style model over the sharded paged cache, built from the model's pieces.

The model's code is untouched: each block runs `attention_norm -> attention.project_qkv ->`
(attention against the cache) `-> attention.project_out -> residual -> ffn_norm ->
feed_forward -> residual`, with `tok_embeddings` before and `norm -> output` after, exactly as
`Llama.forward` does with its own attention.

    logits = prefill(model, cache, prompt_ids, seq_ids=["a"])          # [1, V], last prompt token
    for _ in range(n):
        next_ids = logits.argmax(-1)[:, None]                          # [1, 1]
        logits = decode_step(model, cache, next_ids, seq_ids=["a"])[:, -1]

Every rank of the cache's group calls these with the same arguments (token ids replicated);
the logits come out the same on every rank.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import torch

from ringattn.cache.decode import cached_attention, prefill_attention, write_prefill_kv
from ringattn.cache.sharding import ShardedKVCache
from ringattn.layout import shard_sequence

if TYPE_CHECKING:  # the cache layer does not import models at run time
    from ringattn.models.llama import Llama


def _check_model(model: Llama, cache: ShardedKVCache) -> None:
    c, pool = model.config, cache.pool
    model_shape = (c.n_layers, c.n_kv_heads, c.head_dim)
    pool_shape = (pool.num_layers, pool.num_kv_heads, pool.head_dim)
    if model_shape != pool_shape:
        raise ValueError(
            f"model (layers, kv heads, head dim) = {model_shape} does not match the cache's "
            f"{pool_shape}"
        )


def _check_ids(token_ids: torch.Tensor, seq_ids: Sequence[Hashable], what: str) -> None:
    if token_ids.dim() != 2 or token_ids.shape[0] != len(seq_ids) or token_ids.shape[1] < 1:
        raise ValueError(
            f"{what}: token ids of shape {tuple(token_ids.shape)} for {len(seq_ids)} sequences; "
            f"expected [{len(seq_ids)}, S >= 1]"
        )


@torch.no_grad()
def prefill(
    model: Llama,
    cache: ShardedKVCache,
    input_ids: torch.Tensor,
    *,
    seq_ids: Sequence[Hashable],
    layout: str = "zigzag",
    backend: str | None = None,
) -> torch.Tensor:
    """Cache B prompts of equal length and return the logits of their last token.

    The first R tokens run through ring attention, each rank caching its layout shard; the
    remaining 1..m tokens run as one `decode_step` chunk (see `ringattn.cache.sharding`). For
    prompts of different lengths, call once per length (B = 1 each is fine).

    Args:
        model: a `Llama` (or a model with its pieces), the same weights on every rank.
        cache: the group's cache (`ShardedKVCache.for_model`).
        input_ids: [B, S] the prompts, the same on every rank.
        seq_ids: B new sequence ids.
        layout: layout of the ring part.
        backend: attention backend ("triton" | "torch" | None: by device).

    Returns:
        logits [B, V] float32 of the last prompt token, the same on every rank.
    """
    _check_model(model, cache)
    _check_ids(input_ids, seq_ids, "prefill")
    b, s = input_ids.shape
    plan = cache.begin_prefill(seq_ids, s, layout=layout)
    if plan.ring_len:
        ring_ids = input_ids[:, : plan.ring_len]  # [B, R]
        local_ids = shard_sequence(ring_ids, group=cache.group, layout=layout)  # [B, R/W]
        position_ids = plan.positions.expand(b, -1)  # [B, R/W]
        h = model.tok_embeddings(local_ids)  # [B, R/W, dim]
        last = len(model.layers) - 1
        for i, layer in enumerate(model.layers):
            x = layer.attention_norm(h)
            q, k, v = layer.attention.project_qkv(x, position_ids=position_ids)
            if i == last:  # the ring part's last hidden states feed nothing: keep only K/V
                write_prefill_kv(cache, plan, i, k, v)
                break
            o = prefill_attention(cache, plan, i, q, k, v, backend=backend)
            h = h + layer.attention.project_out(o)
            h = h + layer.feed_forward(layer.ffn_norm(h))
    chunk = input_ids[:, plan.ring_len :]  # [B, S - R], 1 <= S - R <= multiple
    return decode_step(model, cache, chunk, seq_ids=seq_ids, backend=backend)[:, -1]


@torch.no_grad()
def decode_step(
    model: Llama,
    cache: ShardedKVCache,
    token_ids: torch.Tensor,
    *,
    seq_ids: Sequence[Hashable],
    backend: str | None = None,
) -> torch.Tensor:
    """Run Sq new tokens of each of B cached sequences and cache their K/V.

    Sq = 1 is plain decoding; Sq > 1 is a chunk (chunked prefill, speculative drafts): token j
    sees its sequence's cache and new tokens 0..j.

    Args:
        model, cache: as for `prefill`.
        token_ids: [B, Sq] the new tokens, the same on every rank.
        seq_ids: B existing sequence ids.
        backend: attention backend.

    Returns:
        logits [B, Sq, V] float32, the same on every rank.
    """
    _check_model(model, cache)
    _check_ids(token_ids, seq_ids, "decode_step")
    plan = cache.begin_step(seq_ids, token_ids.shape[1])
    h = model.tok_embeddings(token_ids)  # [B, Sq, dim]
    for i, layer in enumerate(model.layers):
        x = layer.attention_norm(h)
        q, k, v = layer.attention.project_qkv(x, position_ids=plan.positions)
        o = cached_attention(cache, plan, i, q, k, v, backend=backend)
        h = h + layer.attention.project_out(o)
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h)).float()  # [B, Sq, V]


@torch.no_grad()
def greedy_generate(
    model: Llama,
    cache: ShardedKVCache,
    prompt_ids: torch.Tensor,
    *,
    seq_id: Hashable,
    new_tokens: int,
    layout: str = "zigzag",
    backend: str | None = None,
) -> torch.Tensor:
    """Prefill one prompt [S] and greedily generate `new_tokens` tokens; returns them [N]."""
    logits = prefill(
        model, cache, prompt_ids[None], seq_ids=[seq_id], layout=layout, backend=backend
    )
    out = []
    for i in range(new_tokens):
        token = logits.argmax(-1)  # [1]
        out.append(token)
        if i + 1 < new_tokens:
            logits = decode_step(model, cache, token[:, None], seq_ids=[seq_id], backend=backend)
            logits = logits[:, -1]
    return torch.cat(out) if out else prompt_ids.new_zeros(0)
