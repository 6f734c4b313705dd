"""Triton twin of the block-attention op: flash attention forward and backward with an LSE.

Same signatures and semantics as `torch_impl` (read its docstring for the causal `offset`
convention): query row i sees key j iff offset is None or j <= i + offset; a row that sees no key
gives out = 0 and lse = -inf.

Kernels, each over a grid of (row block, head, batch):
  `_attn_fwd_kernel`   one query block x all the key blocks it sees: online softmax in exp2 with
                       log2(e) folded into the scale, float32 accumulators.
  `_attn_delta_kernel` delta = rowsum(dO * O), the backward's preprocessing.
  `_attn_dkdv_kernel`  one key block x the query blocks that see it, looping over the G query
                       heads that share its KV head, so GQA sums need no atomics.
  `_attn_dq_kernel`    one query block x the key blocks it sees.
The backward reads the lse and delta it is given (the ring passes the merged attention's), never
its own. Deterministic: every output element is written by exactly one program, once.

Loop bounds skip tiles the causal mask empties; only tiles that straddle the diagonal (or the
sequence end) are masked. Fully written outputs make autotuning trials safe without zeroing.

Dot precision: float32 inputs use IEEE fp32 dots (`input_precision="ieee"`): TF32 would cut the
mantissa to 10 bits, and fp32 callers ask for fp32 accuracy. fp16/bf16 inputs use native
tensor-core dots with float32 accumulation; P and dS are rounded to the input dtype before their
dots, as in FlashAttention.
"""

from .triton_bwd import attention_bwd, attention_delta
from .triton_common import MAX_HEAD_DIM
from .triton_fwd import attention_fwd

__all__ = ["MAX_HEAD_DIM", "attention_bwd", "attention_delta", "attention_fwd"]
