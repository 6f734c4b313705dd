"""Shared pieces of the Triton flash attention: autotuning, tile loads/stores, causal ranges.

The design (kernels, causal skipping, dot precision) is described in `triton_impl`.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 256
_LOG2E = math.log2(math.e)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------
# Autotuning: keyed on (head dim, causal, Sq and Sk rounded up to a power of two); tensor
# dtypes join the key automatically. Each kernel has a short config list per head-dim class
# (padded D <= 64, <= 128, <= 256), chosen by compiling for sm_90 and keeping the tilings with
# the fewest register spills; the autotuner times the few that remain. float32 inputs get one
# small tiling: IEEE fp32 dots run on FMA units (no tensor cores), and their fully unrolled code
# spills and compiles slowly (measured ~1 min per kernel at D = 256), so small tiles keep the
# compile bounded. The interpreter gets one config (it runs on CPU).

_KEY = ["HEAD_DIM", "CAUSAL", "sq_bucket", "sk_bucket"]
Tiling = tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
_FP32_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)


def _autotune(table: dict[int, list[Tiling]], interpret: tuple[int, int]):
    """triton.autotune over `table` ({max padded head dim: tilings}), pruned to D's class."""
    if _INTERPRET:
        config = triton.Config({"BLOCK_M": interpret[0], "BLOCK_N": interpret[1]}, num_warps=4)
        return triton.autotune(configs=[config], key=_KEY)
    by_d = {
        d_max: [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in tilings
        ]
        for d_max, tilings in table.items()
    }

    def prune(configs, named_args, **kwargs):
        keep = by_d[min(d for d in by_d if d >= kwargs["BLOCK_D"])]
        return [_FP32_CONFIG] if named_args["Q"].dtype == torch.float32 else keep

    all_configs = [c for configs in by_d.values() for c in configs]
    return triton.autotune(all_configs, key=_KEY, prune_configs_by={"early_config_prune": prune})


# ---------------------------------------------------------------------------------------------
# Shared device helpers.


@triton.jit
def _load_tile(
    base,
    offs_r,
    n_rows,
    stride_r,
    stride_d,
    offs_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHECK_ROWS: tl.constexpr,
):
    """Tile x[r, d] = base[r * stride_r + d * stride_d], zero for r >= n_rows (when CHECK_ROWS)
    and for d >= HEAD_DIM (the head dim is padded to BLOCK_D, a power of two)."""
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
    if CHECK_ROWS:
        x = tl.load(ptrs, mask=(offs_r < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    elif BLOCK_D == HEAD_DIM:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return x


@triton.jit
def _store_tile(base, x, offs_r, n_rows, stride_r, stride_d, offs_d, HEAD_DIM: tl.constexpr):
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
    mask = (offs_r < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _query_key_range(m0, sq, sk, offset, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """For query rows [m0, m0 + BLOCK_M): keys [0, hi) are seen by some row, keys [0, lo_masked)
    by every row. Returns (hi, lo_masked)."""
    if CAUSAL:
        m1 = tl.minimum(sq, m0 + BLOCK_M)
        hi = tl.minimum(tl.maximum(m1 + offset, 0), sk)
        lo_masked = tl.minimum(tl.maximum(m0 + offset + 1, 0), sk)
    else:
        hi = sk
        lo_masked = sk
    return hi, lo_masked


@triton.jit
def _row_lse2(Lse_head, stride_ls, rows, sq):
    """lse in log2 units for rows < sq; +inf for rows that saw no key or lie past the end, which
    makes every probability exp2(s - lse2) of that row exactly 0."""
    lse = tl.load(Lse_head + rows * stride_ls, mask=rows < sq, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # x log2(e)


# ---------------------------------------------------------------------------------------------
# Forward.


def _block_d(d: int) -> int:
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim must be at most {MAX_HEAD_DIM}; got {d}")
    return max(16, triton.next_power_of_2(d))  # tl.dot needs every tile dim >= 16


def _dot_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 dots for fp32 inputs; fp16/bf16 dots ignore the setting (native MMA)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))
