"""Paged KV cache, sharded across the ranks of a group, for inference at very long context.

- `allocator`: `PageAllocator`, pages of one pool like virtual memory (plain Python).
- `pool`: `PagePool`, one rank's K/V tensors for all layers plus its allocator.
- `sharding`: `ShardedKVCache`, which tokens of which sequence live on which rank (closed form
  `tokens_on_rank`), and the plans of prefill and decode steps.
- `decode`: attention against the cache, one layer at a time, with one LSE merge across ranks.
- `inference`: `prefill` / `decode_step` / `greedy_generate` over a Llama-style model.
"""

from ringattn.cache.allocator import CacheFull, PageAllocator, UnknownSequence
from ringattn.cache.collectives import merge_across_ranks
from ringattn.cache.decode import cached_attention, prefill_attention
from ringattn.cache.inference import decode_step, greedy_generate, prefill
from ringattn.cache.pool import PagePool
from ringattn.cache.sharding import (
    PrefillPlan,
    ShardedKVCache,
    StepPlan,
    decode_owner,
    ring_prefill_len,
    tokens_on_rank,
)

__all__ = [
    "CacheFull",
    "PageAllocator",
    "PagePool",
    "PrefillPlan",
    "ShardedKVCache",
    "StepPlan",
    "UnknownSequence",
    "cached_attention",
    "decode_owner",
    "decode_step",
    "greedy_generate",
    "merge_across_ranks",
    "prefill",
    "prefill_attention",
    "ring_prefill_len",
    "tokens_on_rank",
]
