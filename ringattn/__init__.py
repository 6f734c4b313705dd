"""ringattn: exact attention at very long context, sharded across GPUs.

Public API (tensor layout everywhere: [batch, seqlen, heads, headdim]):

- `flash_attn`: single-device block-wise attention with LSE (Triton on GPU, torch on CPU).
- `ring_attention`: attention over a sequence sharded across a process group.
- `shard_sequence`, `gather_sequence`, `sequence_positions`: the layouts (zigzag, striped,
  contiguous).
- `merge_partials`: merge partial attention results by their LSE.
"""

from ringattn.comm import RingComm, RingTimeoutError
from ringattn.flash import flash_attn
from ringattn.layout import LAYOUTS, gather_sequence, sequence_positions, shard_sequence
from ringattn.merge import merge_partials
from ringattn.ring import ring_attention

__all__ = [
    "LAYOUTS",
    "RingComm",
    "RingTimeoutError",
    "flash_attn",
    "gather_sequence",
    "merge_partials",
    "ring_attention",
    "sequence_positions",
    "shard_sequence",
]
