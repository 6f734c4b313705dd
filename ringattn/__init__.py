"""ringattn: exact attention at very long context, sharded across GPUs.

Public API (tensor layout everywhere: [batch, seqlen, heads, headdim]):

- `flash_attn`: single-device block-wise attention with LSE (Triton on GPU, torch on CPU).
- `ring_attention`: attention over a sequence sharded across a process group.
- `shard_sequence`, `gather_sequence`, `sequence_positions`: the layouts (zigzag, striped,
  contiguous).
- `merge_partials`: merge partial attention results by their LSE.
- `parallelize`, `shard_batch`, `sequence_parallel_loss`, `allreduce_gradients`: make a model's
  attention sequence-parallel from outside and train it exactly.
- `apply_checkpointing`: activation checkpointing policies (none, full, ring-aware selective,
  offload); `plan`: per-rank memory by component for each policy (also `python -m ringattn.plan`).
"""

from ringattn.checkpoint import apply_checkpointing
from ringattn.comm import RingComm, RingTimeoutError
from ringattn.flash import flash_attn
from ringattn.layout import LAYOUTS, gather_sequence, sequence_positions, shard_sequence
from ringattn.merge import merge_partials
from ringattn.parallel import (
    allreduce_gradients,
    parallelize,
    sequence_parallel_loss,
    shard_batch,
)
from ringattn.ring import ring_attention

__all__ = [
    "LAYOUTS",
    "RingComm",
    "RingTimeoutError",
    "allreduce_gradients",
    "apply_checkpointing",
    "flash_attn",
    "gather_sequence",
    "merge_partials",
    "parallelize",
    "plan",
    "ring_attention",
    "sequence_parallel_loss",
    "sequence_positions",
    "shard_batch",
    "shard_sequence",
]


def __getattr__(name: str):
    # `plan` is imported on first use, so that `python -m ringattn.plan` does not find its own
    # module already imported by the package.
    if name == "plan":
        from ringattn.plan import plan

        globals()["plan"] = plan  # importing the submodule bound the name to it: rebind
        return plan
    raise AttributeError(f"module 'ringattn' has no attribute {name!r}")
