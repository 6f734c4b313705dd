"""Paged decode kernel on one GPU: correctness, then bandwidth and time against SDPA.

    python3 -m pip install --no-index --no-deps --no-build-isolation -e .   # once, offline
    python benchmarks/gpu_decode.py --out benchmarks/results/decode-h200 [--sweep]

1. Correctness: the Triton kernel vs a float32 dense reference (each sequence's K/V gathered
   through its block table) over page sizes 16/64/256, bf16/fp16/fp32, D 64/80/128/256, Sq 1
   and 3, contexts 0 to 20k. Pool slots outside every sequence and block-table padding hold NaN,
   and `torch.empty` returns NaN-filled memory, so reading a wrong key or an unwritten partial
   shows. Bound: 2 x the error of the same naive computation in the pool dtype + a floor.
2. Timing (bf16, GQA 32 query / 8 KV heads, D 128, one query token): batch 8 x 128k and
   1 x 1M keys, page sizes 16/64/256, pages shuffled through the pool. Bandwidth = bytes of K+V
   read / time, next to a device-to-device copy measured in the same run (read + write bytes /
   time, as in the performance anchors), and time against SDPA cuDNN and SDPA flash over the
   same K/V held contiguously. Median of CUDA-event times after warm-up. Targets: >= 85 % of copy
   bandwidth and >= 0.9 x cuDNN's speed.
3. --sweep: block size / stages / warps / splits around the default config, page size 64.
Prints a table; writes results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from _timing import median_cuda_ms  # benchmarks/ is on sys.path when run as a script

HQ, HKV, D = 32, 8, 128
TIMED = [(8, 131072), (1, 1 << 20)]  # (batch, keys per sequence)
PAGE_SIZES = [16, 64, 256]


def _cache(lens, sq, hq, hkv, d, page_size, dtype, *, poison: bool, gen):
    """q [B, Sq, Hq, D], pool [num_pages, page_size, Hkv, D] x2, block tables (shuffled pages,
    padding -> the last page), context lens. poison: unused slots and the padding page are NaN."""
    pages_per = [-(-n // page_size) for n in lens]
    width = max(max(pages_per), 1)
    num_pages = sum(pages_per) + 1
    shape = (num_pages, page_size, hkv, d)
    k = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
    order = torch.randperm(num_pages - 1, device="cuda", generator=gen).int()
    tables = torch.full((len(lens), width), num_pages - 1, dtype=torch.int32, device="cuda")
    used = torch.zeros(num_pages, page_size, dtype=torch.bool, device="cuda")
    taken = 0
    for i, (n, p) in enumerate(zip(lens, pages_per, strict=True)):
        tables[i, :p] = order[taken : taken + p]
        used[order[taken : taken + p].long()] = (
            torch.arange(p * page_size, device="cuda") < n
        ).view(p, page_size)
        taken += p
    if poison:
        k[~used], v[~used] = math.nan, math.nan
    q = torch.randn(len(lens), sq, hq, d, device="cuda", dtype=dtype, generator=gen)
    return q, k, v, tables, torch.tensor(lens, dtype=torch.int32, device="cuda")


def _gather(pages, tables, i, n):
    """Sequence i's first n keys: [n, Hkv, D]."""
    return pages[tables[i, : -(-n // pages.shape[1])].long()].flatten(0, 1)[:n]


def _dense(q, k, v, tables, lens, scale, dtype):
    """Naive attention in `dtype` per sequence: out [B, Sq, Hq, D] float32."""
    out = torch.zeros(q.shape, dtype=torch.float32, device="cuda")
    g = q.shape[2] // k.shape[2]
    for i, n in enumerate(lens.tolist()):
        if n:
            ki, vi = (_gather(t, tables, i, n).to(dtype).repeat_interleave(g, 1) for t in (k, v))
            s = torch.einsum("qhd,khd->hqk", q[i].to(dtype), ki) * scale
            out[i] = torch.einsum("hqk,khd->qhd", s.softmax(-1), vi).float()
    return out


def check_correctness(paged) -> list[dict]:
    cases = [  # (dtype, hq, hkv, d, sq, page_size, floor)
        (torch.bfloat16, 32, 8, 128, 1, 16, 1e-3),
        (torch.bfloat16, 32, 8, 128, 3, 64, 1e-3),
        (torch.bfloat16, 8, 1, 256, 1, 256, 1e-3),
        (torch.float16, 16, 2, 64, 3, 16, 1e-4),
        (torch.float32, 8, 8, 80, 1, 64, 2e-5),  # MHA, D padded to 128, IEEE fp32 dots
    ]
    lens = [0, 1, 15, 63, 257, 3000, 20000]
    rows, real_empty = [], torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    torch.empty = poisoned_empty
    try:
        for dtype, hq, hkv, d, sq, ps, floor in cases:
            gen = torch.Generator("cuda").manual_seed(0)
            inputs = _cache(lens, sq, hq, hkv, d, ps, dtype, poison=True, gen=gen)
            scale = d**-0.5
            out, lse = paged(*inputs, scale=scale)
            ref = _dense(*inputs, scale, torch.float32)
            naive = _dense(*inputs, scale, dtype)
            err = (out.float() - ref).abs().nan_to_num(math.inf).max().item()
            bound = 2 * (naive - ref).abs().max().item() + floor
            ok = err <= bound and bool((lse[0] == -math.inf).all() and lse[1:].isfinite().all())
            # fmt: off
            rows.append(dict(dtype=str(dtype), hq=hq, hkv=hkv, d=d, sq=sq, page_size=ps,
                             error=err, bound=bound, ok=ok))
            # fmt: on
            print(
                f"  {str(dtype):15} H{hq}/{hkv} D{d} Sq{sq} P{ps}: error {err:.2e} "
                f"bound {bound:.2e} {'ok' if ok else 'FAIL'}"
            )
    finally:
        torch.empty = real_empty
    return rows


def _sdpa(q, k, v, backend) -> tuple[float, str, torch.Tensor]:
    """SDPA over contiguous [B, H, S, D] K/V with enable_gqa, else with K/V repeated to Hq heads:
    (median ms, mode, out [B, Hq, Sq, D])."""
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    g = q.shape[1] // k.shape[1]
    with sdpa_kernel(backend):
        for mode in ("gqa", "repeated"):
            if mode == "repeated":
                k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
            try:
                fn = lambda: sdpa(q, k, v, enable_gqa=g > 1)  # noqa: E731, B023
                return median_cuda_ms(fn), mode, fn()
            except RuntimeError as e:  # this backend does not take these inputs
                error = str(e).splitlines()[0]
    return math.nan, f"unavailable: {error}", None


# (BLOCK_N, splits multiple, warps, stages) around the default config, for --sweep.
# fmt: off
SWEEP = [(32, 1, 4, 3), (128, 1, 4, 3), (128, 1, 8, 3), (64, 1, 4, 2), (64, 1, 4, 4),
         (64, 1, 8, 3), (64, 2, 4, 3), (64, 4, 4, 3), (64, 8, 4, 3), (32, 4, 4, 4)]
# fmt: on


def time_case(impl, b: int, n: int, ps: int, copy_tbps: float, sweep: bool) -> list[dict]:
    """One timed shape: a row per kernel config, each with the SDPA times beside it."""
    from torch.nn.attention import SDPBackend

    gen = torch.Generator("cuda").manual_seed(0)
    inputs = _cache([n] * b, 1, HQ, HKV, D, ps, torch.bfloat16, poison=False, gen=gen)
    q, k, v, tables, _ = inputs
    kv_bytes = 2 * b * n * HKV * D * 2
    default = impl.decode_config(q, k, tables)
    configs = [default]
    if sweep:
        configs += [impl.DecodeConfig(bn, default.num_splits * m, w, st) for bn, m, w, st in SWEEP]
    rows = []
    for cfg in configs:
        run = lambda c=cfg: impl.paged_attention_fwd(*inputs, scale=D**-0.5, config=c)  # noqa: E731
        ms = median_cuda_ms(run)
        tbps = kv_bytes / ms / 1e9
        # fmt: off
        rows.append(dict(batch=b, keys=n, page_size=ps, config=vars(cfg), default=cfg is default,
                         ms=ms, tbps=tbps, copy_fraction=tbps / copy_tbps))
        # fmt: on
    out = impl.paged_attention_fwd(*inputs, scale=D**-0.5)[0]
    # The same keys held contiguously for SDPA: [B, Hkv, S, D].
    kc, vc = (
        torch.stack([_gather(t, tables, i, n) for i in range(b)]).transpose(1, 2).contiguous()
        for t in (k, v)
    )
    qc = q.transpose(1, 2)  # [B, Hq, 1, D]
    cudnn_ms, cudnn_mode, cudnn_out = _sdpa(qc, kc, vc, SDPBackend.CUDNN_ATTENTION)
    flash_ms, flash_mode, _ = _sdpa(qc, kc, vc, SDPBackend.FLASH_ATTENTION)
    diff = math.nan  # triton vs cuDNN on the timed shape: a second correctness check
    if cudnn_out is not None:
        diff = (out.float() - cudnn_out.transpose(1, 2).float()).abs().max().item()
    for r in rows:
        # fmt: off
        r.update(cudnn_ms=cudnn_ms, cudnn_mode=cudnn_mode, flash_ms=flash_ms,
                 flash_mode=flash_mode, vs_cudnn=cudnn_ms / r["ms"], max_diff_vs_cudnn=diff)
        # fmt: on
    return rows


def _copy_tbps(nbytes: int) -> float:
    """Device-to-device copy bandwidth, read + write bytes / time."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / median_cuda_ms(lambda: dst.copy_(src)) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json")
    parser.add_argument("--sweep", action="store_true", help="also time configs near the default")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_decode.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing ran")
    import triton

    from ringattn.kernels.paged import triton_impl as impl

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references stay fp32
    props = torch.cuda.get_device_properties(0)
    print(
        f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton "
        f"{triton.__version__}; timing: bf16, {HQ}/{HKV} heads, D {D}, 1 query token"
    )
    print("correctness vs float32 dense reference (NaN-poisoned pool and torch.empty):")
    correctness = check_correctness(impl.paged_attention_fwd)
    copy_tbps = _copy_tbps(2 * TIMED[0][0] * TIMED[0][1] * HKV * D * 2)
    print(f"device-to-device copy: {copy_tbps:.2f} TB/s (read + write)")
    print(
        f"{'B x keys':>11} {'page':>5} {'N/splits/warps/stages':>22} {'ms':>7} {'TB/s':>6} "
        f"{'% copy':>7} {'cuDNN ms':>9} {'flash ms':>9} {'x cuDNN':>8}"
    )
    timing = []
    for b, n in TIMED:
        for ps in PAGE_SIZES:
            for r in time_case(impl, b, n, ps, copy_tbps, args.sweep and ps == 64):
                c = r["config"]
                cfg = f"{c['block_n']}/{c['num_splits']}/{c['num_warps']}/{c['num_stages']}"
                print(
                    f"{b:>3} x {n:>7} {ps:>5} {cfg:>22} {r['ms']:7.3f} {r['tbps']:6.2f} "
                    f"{100 * r['copy_fraction']:6.1f}% {r['cudnn_ms']:9.3f} "
                    f"{r['flash_ms']:9.3f} {r['vs_cudnn']:8.2f}"
                )
                timing.append(r)
            torch.cuda.empty_cache()
    met = all(r["copy_fraction"] >= 0.85 and r["vs_cudnn"] >= 0.9 for r in timing if r["default"])
    print(f"targets (>= 85 % of copy bandwidth, >= 0.9 x cuDNN) met by the default config: {met}")
    args.out.mkdir(parents=True, exist_ok=True)
    # fmt: off
    result = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                  triton=triton.__version__, copy_tbps=copy_tbps, correctness=correctness,
                  timing=timing)
    # fmt: on
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'results.json'}")
    if not all(r["ok"] for r in correctness):
        sys.exit("correctness FAILED")


if __name__ == "__main__":
    main()
