"""Single-device math, installed as `ringattn.kernels` (no torch.distributed here).

- `attention`: the block-attention op `(q, k, v, scale, causal offset) -> (out, lse)` and its
  backward, as Triton kernels (`triton_impl`) and their torch twin (`torch_impl`); `naive` is
  the dense reference of the tests.
- `paged`: attention of new queries over K/V held in the pages of a pool (decode), Triton
  split-K kernel and torch twin.
"""
