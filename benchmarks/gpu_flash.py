"""Triton flash-attention kernel on one GPU: correctness, then speed against SDPA and FlexAttention.

    python3 -m pip install --no-index --no-deps --no-build-isolation -e .   # once, offline
    python benchmarks/gpu_flash.py --out benchmarks/results/flash-h200 [--phase check|time]

1. Correctness (bf16, fp16): `attention_fwd` / `attention_delta` / `attention_bwd` vs a float32
   dense reference over odd lengths, GQA/MQA, D 40/64/96/128/256 and causal offsets (zero,
   bottom-right, negative, rows that see nothing). `torch.empty` returns NaN-filled memory, so an
   output element the kernels never write shows as NaN. Bound per tensor: 2 x the error of the
   same naive computation in the input dtype + a floor (the tests' policy). PASS/FAIL per row.
2. Timing (bf16, B=1, H=32, D=128, S in 4k/16k/64k, causal or not): ours (fwd; fwd + delta +
   bwd, float32 grads), SDPA cuDNN, SDPA flash, FlexAttention (torch.compile'd, causal block
   mask). Median of CUDA-event times after warm-up. FLOPs: fwd 4*B*H*S^2*D, x0.5 causal;
   fwd+bwd x3.5 (backward = 2.5 x forward). Ratio = TFLOP/s / cuDNN's TFLOP/s.
Writes results.json to --out; prints the table last. Autotuning compiles several configs per
kernel and shape class on first use, so the first rows of each phase are slow.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import torch
from _timing import median_cuda_ms  # benchmarks/ is on sys.path when run as a script

B, H, D = 1, 32, 128
SIZES = [4096, 16384, 65536]
# (B, Sq, Sk, Hq, Hkv, D, offset, dtype): offset None = no mask; Sk - Sq = bottom-right causal.
CHECKS = [
    (1, 1000, 1000, 8, 2, 64, 0, torch.bfloat16),
    (2, 777, 1531, 4, 4, 128, 1531 - 777, torch.bfloat16),
    (1, 513, 1024, 8, 1, 256, None, torch.bfloat16),
    (1, 1024, 1024, 4, 2, 128, None, torch.bfloat16),
    (1, 700, 300, 4, 2, 64, -400, torch.bfloat16),  # rows 0..399 see no key
    (1, 333, 333, 2, 1, 96, -1, torch.bfloat16),
    (2, 129, 2049, 4, 2, 40, 1920, torch.float16),
    (1, 1000, 1000, 8, 2, 128, 0, torch.float16),
    (1, 300, 600, 2, 2, 256, -100, torch.float16),
]
TOLERANCE = {  # dtype -> (multiple of naive error, floor relative to max |reference|)
    torch.bfloat16: (2.0, 1e-3),  # 8-bit mantissa: floor ~1/4 ulp at 1.0
    torch.float16: (2.0, 1e-4),  # floor only guards an accidentally exact naive baseline
}


@contextlib.contextmanager
def _nan_empty():
    """`torch.empty` returns NaN-filled memory, so unwritten outputs show."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real_empty


def _max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs difference; -inf matching -inf counts as equal, NaN as infinite."""
    actual, expected = actual.double(), expected.double()
    same_inf = torch.isinf(actual) & (actual == expected)
    diff = (actual - expected).abs().masked_fill(same_inf, 0.0).nan_to_num(math.inf)
    return diff.max().item() if diff.numel() else 0.0


def _naive(q, k, v, do, offset, dtype):
    from ringattn.kernels.attention.naive import naive_attention

    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = naive_attention(*leaves, scale=q.shape[-1] ** -0.5, offset=offset, dtype=dtype)
    out.backward(do.to(dtype))
    return [out.detach(), lse.detach(), *(t.grad for t in leaves)]


def check() -> list[dict]:
    from ringattn.kernels.attention import triton_impl as tk

    torch.backends.cuda.matmul.allow_tf32 = False  # a true float32 reference
    rows = []
    for b, sq, sk, hq, hkv, d, offset, dtype in CHECKS:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, do = (torch.randn(b, sq, hq, d, device="cuda", generator=gen, dtype=dtype) for _ in "12")
        k, v = (torch.randn(b, sk, hkv, d, device="cuda", generator=gen, dtype=dtype) for _ in "12")
        with _nan_empty():
            out, lse = tk.attention_fwd(q, k, v, scale=d**-0.5, offset=offset)
            delta = tk.attention_delta(do, out)
            grads = tk.attention_bwd(do, q, k, v, lse, delta, scale=d**-0.5, offset=offset)
        ours = [out, lse, *grads]
        ref = _naive(q, k, v, do, offset, torch.float32)
        low = _naive(q, k, v, do, offset, dtype)
        multiple, floor = TOLERANCE[dtype]
        errors, ok = {}, True
        for name, a, r, lo in zip(("out", "lse", "dq", "dk", "dv"), ours, ref, low, strict=True):
            finite = r[torch.isfinite(r)]
            scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
            err, bound = _max_error(a, r), multiple * _max_error(lo, r) + floor * scale
            errors[name] = {"error": err, "bound": bound}
            ok &= err <= bound and not a.isnan().any().item()
        row = dict(b=b, sq=sq, sk=sk, hq=hq, hkv=hkv, d=d, offset=offset, dtype=str(dtype))
        rows.append({**row, "pass": ok, "errors": errors})
        worst = max(errors, key=lambda n: errors[n]["error"] / errors[n]["bound"])
        print(
            f"{'PASS' if ok else 'FAIL'}  B{b} Sq{sq} Sk{sk} H{hq}/{hkv} D{d} off={offset} "
            f"{str(dtype)[6:]}: worst {worst} {errors[worst]['error']:.2e} "
            f"<= {errors[worst]['bound']:.2e}",
            flush=True,
        )
    return rows


def _ours(fwd_only: bool, causal: bool, s: int, dtype):
    from ringattn.kernels.attention import triton_impl as tk

    q, k, v, do = (torch.randn(B, s, H, D, device="cuda", dtype=dtype) for _ in range(4))
    offset, scale = (0 if causal else None), D**-0.5

    def run():
        out, lse = tk.attention_fwd(q, k, v, scale=scale, offset=offset)
        if not fwd_only:
            delta = tk.attention_delta(do, out)
            tk.attention_bwd(do, q, k, v, lse, delta, scale=scale, offset=offset)

    return run


def _sdpa(fwd_only: bool, causal: bool, s: int, dtype, backend):
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    q, k, v = (torch.randn(B, H, s, D, device="cuda", dtype=dtype) for _ in range(3))
    do = torch.randn_like(q)
    for t in (q, k, v):
        t.requires_grad_(not fwd_only)

    def run():
        with sdpa_kernel(backend):
            out = scaled_dot_product_attention(q, k, v, is_causal=causal)
        if not fwd_only:
            torch.autograd.grad(out, (q, k, v), do)

    return run


_FLEX = {}


def _flex(fwd_only: bool, causal: bool, s: int, dtype):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention)
    q, k, v = (torch.randn(B, H, s, D, device="cuda", dtype=dtype) for _ in range(3))
    do = torch.randn_like(q)
    for t in (q, k, v):
        t.requires_grad_(not fwd_only)
    mask = None
    if causal:
        mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, s, s, device="cuda")

    def run():
        out = _FLEX["fn"](q, k, v, block_mask=mask)
        if not fwd_only:
            torch.autograd.grad(out, (q, k, v), do)

    return run


def time_all(sizes: list[int], reps: int) -> list[dict]:
    from torch.nn.attention import SDPBackend

    backends = {
        "ours": _ours,
        "cudnn": lambda *a: _sdpa(*a, SDPBackend.CUDNN_ATTENTION),
        "flash": lambda *a: _sdpa(*a, SDPBackend.FLASH_ATTENTION),
        "flex": _flex,
    }
    rows = []
    for s in sizes:
        for causal in (True, False):
            for fwd_only in (True, False):
                flop = 4 * B * H * s * s * D * (0.5 if causal else 1.0) * (1.0 if fwd_only else 3.5)
                row = dict(s=s, causal=causal, mode="fwd" if fwd_only else "fwd+bwd", tflops={})
                for name, make in backends.items():
                    try:
                        run = make(fwd_only, causal, s, torch.bfloat16)
                        ms = median_cuda_ms(
                            run, warmup=2, reps=reps if s < 65536 else max(3, reps // 3)
                        )
                        row["tflops"][name] = flop / ms / 1e9
                    except Exception as e:  # one backend failing must not lose the others
                        print(f"  {name} S={s} causal={causal}: {type(e).__name__}: {e}"[:300])
                        row["tflops"][name] = None
                    torch.cuda.empty_cache()
                cudnn = row["tflops"].get("cudnn")
                row["ratio_to_cudnn"] = {
                    n: (t / cudnn if t and cudnn else None) for n, t in row["tflops"].items()
                }
                rows.append(row)
                print(f"  timed S={s} causal={causal} {row['mode']}", flush=True)
    return rows


def _table(rows: list[dict]) -> str:
    names = ["ours", "cudnn", "flash", "flex"]
    head = f"{'S':>6} {'causal':>6} {'mode':>8} " + " ".join(f"{n:>7}" for n in names)
    lines = [head + f" {'ours/cuDNN':>10}"]
    for r in rows:
        cells = " ".join(
            f"{r['tflops'][n]:7.0f}" if r["tflops"].get(n) else f"{'-':>7}" for n in names
        )
        ratio = r["ratio_to_cudnn"].get("ours")
        ratio_s = f"{ratio:10.2f}" if ratio else f"{'-':>10}"
        lines.append(f"{r['s']:>6} {str(r['causal']):>6} {r['mode']:>8} {cells} {ratio_s}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for results.json")
    parser.add_argument("--phase", choices=["all", "check", "time"], default="all")
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="sequence lengths")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions (1/3 at 64k)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_flash.py needs a CUDA GPU; this machine has none. Nothing ran.", file=sys.stderr)
        return 1

    import triton

    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shapes": {"B": B, "H": H, "D": D, "dtype": "bfloat16"},
        "flops": "fwd 4*B*H*S^2*D, x0.5 causal; fwd+bwd x3.5",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if args.phase in ("all", "check"):
        print("# correctness: triton vs float32 reference, bound 2 x naive error + floor")
        result["checks"] = check()
    if args.phase in ("all", "time"):
        print(f"# timing on {result['device']}: bf16, B={B}, H={H}, D={D}, TFLOP/s")
        result["timing"] = time_all(args.sizes, args.reps)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    if "timing" in result:
        print(f"\n# {result['device']}, torch {torch.__version__}, triton {triton.__version__}")
        print(_table(result["timing"]))
    failed = sum(not r["pass"] for r in result.get("checks", []))
    if failed:
        print(f"{failed} correctness rows FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
