"""python3 benchmarks/gpu_ring.py --out $OUT             (on the lent H200; --quick: fewer sizes)
python benchmarks/gpu_ring.py --cpu-smoke --out /tmp/gpu-ring  (the same logic on CPU, tiny)

Install first on the GPU machine:
    python3 -m pip install --no-index --no-deps --no-build-isolation -e .
Ring attention on ONE GPU; --parts picks from abcde (default all):
 a  correctness, W virtual ranks in one process, no communication: `plan_step`'s schedule over W
    shards with the block kernels (`attention_fwd` / `attention_bwd`, triton) and `merge_into`.
    bf16 out, lse, dq, dk, dv vs a float32 naive reference; pass when ||x - ref|| / ||ref|| is at
    most 2 x that of the same naive computation in bf16 (DESIGN.md's policy).
 b  that ring (B=1, H=32, D=128, causal zigzag, S/W in {8192, 16384}, W in {2, 4, 8}) vs one
    `flash_attn` call over the whole sequence, fwd and fwd+bwd (ratios; target <= 1.10). raw_*:
    block kernels only, no merges or gradient sums (splits the overhead). rank_mib: one virtual
    rank's max_memory_allocated over its fwd+bwd beyond the shared inputs, plus its shards and the
    buffers a real rank receives (K/V, travelling fp32 dK/dV): O(S/W); kernel_mib: same over S.
 c  overlap: a steady zigzag step's forward on the default stream while a side stream copies a
    K/V message (Hkv=8) device to device, standing in for the link: once, repeated to last as
    long as NVLink (450 GB/s) or IB (50 GB/s) would; and staged through pinned host memory
    (D2H + H2D) on the side stream, or on the compute stream as RingComm does on gloo today.
    step / max(compute, copy): 1.0 = perfect overlap; serial_over_max = no overlap.
 d  per-step time of a steady zigzag step (half an n x n block; fwd with merge, fwd+bwd with
    gradient sums; raw: kernels only; diag: the causal first step), n = 2k..64k ->
    OUT/steps.json for `python benchmarks/ring_model.py --measured OUT/steps.json`.
 e  multi-process: `torchrun --standalone --nproc_per_node {2,4}` of this file's --worker mode,
    every rank on the ONE GPU over gloo (RingComm stages CUDA tensors through host memory):
    ring_attention fwd+bwd, bf16, zigzag and striped, GQA 8/2 heads, vs float32, policy of (a).
Timings: CUDA events, median after warm-up (autotuning happens in the warm-up). Under --out:
results.json (rewritten after every part, so a run cut short keeps what finished), steps.json,
summary.md, multiproc logs; the tables print last. Estimated on the H200, mostly Triton compiles
and autotuning: about 7 min in all (b: 2-3 min), --quick about 4 min; --parts splits a run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

import ringattn
from ringattn.kernels import attention as ops
from ringattn.kernels.attention.naive import naive_attention
from ringattn.layout import positions
from ringattn.merge import merge_into
from ringattn.schedule import plan_step

F32, BF16 = torch.float32, torch.bfloat16
LINKS = {"NVLink": (450e9, 10e-6), "IB": (50e9, 20e-6)}  # bytes/s per direction, s per message
CHECKS = [("zigzag", True, w) for w in (2, 3, 4, 8)] + [
    ("striped", True, 2), ("striped", True, 4), ("contiguous", True, 4), ("zigzag", False, 4)
]  # fmt: skip
GPU = {"check": (1, 3072, 8, 2, 128), "heads": 32, "dim": 128, "ring_n": (8192, 16384),
       "ring_w": (2, 4, 8), "overlap_n": (8192, 16384), "step_n": (2048, 4096, 8192, 16384,
       32768, 65536), "mp": (1, 2048, 8, 2, 128), "nprocs": (2, 4)}  # fmt: skip
QUICK = {**GPU, "ring_n": (8192,), "overlap_n": (8192,), "step_n": (2048, 8192, 32768)}
SMOKE = {"check": (1, 48, 4, 2, 16), "heads": 4, "dim": 16, "ring_n": (16,), "ring_w": (2, 4),
         "overlap_n": (32,), "step_n": (16, 32), "mp": (1, 48, 4, 2, 16),
         "nprocs": (2,)}  # fmt: skip
SHOW = {  # the printed columns per part
    "a": "layout causal world ok worst_err_over_tol",
    "b": "tokens_per_rank world fwd_ratio fwdbwd_ratio raw_fwd_ratio raw_fwdbwd_ratio rank_mib "
         "kernel_mib",
    "c": "tokens_per_rank case compute_ms copy_ms step_ms step_over_max serial_over_max",
    "d": "tokens_per_rank fwd_ms fwdbwd_ms tflops_fwd tflops_fwdbwd raw_fwd_ms diag_fwd_ms",
    "e": "world layout ok worst_err_over_tol rc",
}  # fmt: skip


class Ring(NamedTuple):
    layout: str
    causal: bool
    scale: float
    backend: str
    accumulate: bool = True  # False: block kernels only (no merge, no gradient sums)


def shard_all(x, world, layout, dim=1):
    return [x.index_select(dim, positions(x.shape[dim], r, world, layout).to(x.device))
            for r in range(world)]  # fmt: skip


def unshard(parts, layout, dim=1):
    world, full = len(parts), torch.cat(parts, dim)
    for r, p in enumerate(parts):
        full.index_copy_(dim, positions(full.shape[dim], r, world, layout).to(p.device), p)
    return full


def step_fwd(tasks, q, k, v, out, lse, cfg):
    for t in tasks:
        o, l = ops.attention_fwd(q[:, t.q], k[:, t.k], v[:, t.k], scale=cfg.scale,
                                 offset=t.offset, out_dtype=F32, backend=cfg.backend)  # fmt: skip
        if cfg.accumulate:
            merge_into(out, lse, o, l, t.q)


def step_bwd(tasks, do, q, k, v, lse, delta, dq, dkv, cfg):
    for t in tasks:
        dq_t, dk_t, dv_t = ops.attention_bwd(
            do[:, t.q], q[:, t.q], k[:, t.k], v[:, t.k], lse[:, :, t.q].contiguous(),
            delta[:, :, t.q].contiguous(), scale=cfg.scale, offset=t.offset, backend=cfg.backend,
        )  # fmt: skip
        if cfg.accumulate:
            dq[:, t.q] += dq_t
            dkv[0, :, t.k] += dk_t
            dkv[1, :, t.k] += dv_t


def rank_fwd(r, qs, ks, vs, cfg):
    """Virtual rank r's forward: W steps, step t on the K/V shard of rank (r - t) mod W."""
    world, q = len(qs), qs[r]
    b, n, h, _ = q.shape
    out = torch.zeros(q.shape, dtype=F32, device=q.device)
    lse = torch.full((b, h, n), float("-inf"), device=q.device)
    for t in range(world):
        src = (r - t) % world
        tasks = plan_step(n * world, r, src, world, cfg.layout, cfg.causal)
        step_fwd(tasks, q, ks[src], vs[src], out, lse, cfg)
    return out.to(q.dtype), lse


def rank_bwd(r, dos, qs, ks, vs, out, lse, dkvs, cfg):
    """Virtual rank r's backward. Its dK/dV shares go into dkvs[src] ([2, B, n, Hkv, D] float32)
    through a fresh buffer per step: the allocations and adds of ring.py's travelling dK/dV."""
    world, q, acc = len(qs), qs[r], cfg.accumulate
    delta = ops.attention_delta(dos[r], out, backend=cfg.backend)
    dq = torch.zeros(q.shape, dtype=F32, device=q.device) if acc else None
    for t in range(world):
        src = (r - t) % world
        dkv = torch.zeros_like(dkvs[src]) if acc else None
        tasks = plan_step(q.shape[1] * world, r, src, world, cfg.layout, cfg.causal)
        step_bwd(tasks, dos[r], q, ks[src], vs[src], lse, delta, dq, dkv, cfg)
        if acc:
            dkvs[src] += dkv
    return dq.to(q.dtype) if acc else None


def ring_fwd(qs, ks, vs, cfg):
    return tuple(zip(*(rank_fwd(r, qs, ks, vs, cfg) for r in range(len(qs))), strict=True))


def ring_bwd(dos, qs, ks, vs, outs, lses, cfg):
    dkvs = [torch.zeros((2, *k.shape), dtype=F32, device=k.device) for k in ks]
    dqs = [rank_bwd(r, dos, qs, ks, vs, outs[r], lses[r], dkvs, cfg) for r in range(len(qs))]
    return dqs, [d[0].to(ks[0].dtype) for d in dkvs], [d[1].to(ks[0].dtype) for d in dkvs]


def naive_grads(q, k, v, do, causal, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out, lse = naive_attention(*leaves, scale=q.shape[-1] ** -0.5, offset=0 if causal else None)
    out.backward(do.to(dtype))
    grads = {f"d{n}": x.grad for n, x in zip("qkv", leaves, strict=True)}
    return {"out": out.detach(), "lse": lse.detach(), **grads}


def compare(got, q, k, v, do, causal):
    """Relative errors vs float32 naive; tol = 2 x the error of naive in bf16."""
    ref, low = naive_grads(q, k, v, do, causal, F32), naive_grads(q, k, v, do, causal, BF16)
    err = {n: ((got[n].to(ref[n]) - ref[n]).norm() / ref[n].norm()).item() for n in ref}
    tol = {n: 2 * ((low[n].float() - ref[n]).norm() / ref[n].norm()).item() + 1e-6 for n in ref}
    worst = max(err[n] / tol[n] for n in ref)  # 1e-6 above: float32 round-off; NaN fails
    return {"ok": bool(worst < 1), "worst_err_over_tol": worst, "err": err, "tol": tol}


def randn(*shape, dev):
    return torch.randn(*shape, device=dev).to(BF16)


def check(layout, causal, world, cfg, dev, backend):
    b, s, hq, hkv, d = cfg["check"]
    q, do, k, v = (randn(b, s, h, d, dev=dev) for h in (hq, hq, hkv, hkv))
    ring = Ring(layout, causal, d**-0.5, backend)
    qs, ks, vs, dos = (shard_all(x, world, layout) for x in (q, k, v, do))
    outs, lses = ring_fwd(qs, ks, vs, ring)
    dqs, dks, dvs = ring_bwd(dos, qs, ks, vs, outs, lses, ring)
    got = {"out": unshard(outs, layout), "lse": unshard(lses, layout, dim=2)}
    got |= {n: unshard(x, layout) for n, x in (("dq", dqs), ("dk", dks), ("dv", dvs))}
    res = compare(got, q, k, v, do, causal)
    return {"layout": layout, "causal": causal, "world": world, "shape": [b, s, hq, hkv, d], **res}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(fn, dev, budget_s=1.0, max_reps=30):
    """Median milliseconds of fn() after warm-up; CUDA events on GPU, the host clock on CPU."""
    for _ in range(2):  # the first call compiles and autotunes; the second sizes the repeats
        t0 = time.perf_counter()
        fn()
        sync(dev)
    reps = int(min(max_reps, max(3, budget_s / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
            times.append((start, end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    sync(dev)
    return statistics.median(t if isinstance(t, float) else t[0].elapsed_time(t[1]) for t in times)


def peak_extra(fn, dev):
    """Bytes allocated at the peak of fn() beyond those allocated before (0 on CPU)."""
    if dev.type != "cuda":
        return 0
    sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    fn()
    sync(dev)
    return torch.cuda.max_memory_allocated(dev) - base


def nbytes(*xs):
    return sum(x.numel() * x.element_size() for x in xs)


def time_ring(n, world, cfg, dev, backend):
    q, k, v, do = (randn(1, n * world, cfg["heads"], cfg["dim"], dev=dev) for _ in range(4))
    ring = Ring("zigzag", True, cfg["dim"] ** -0.5, backend)
    raw = ring._replace(accumulate=False)
    qs, ks, vs, dos = (shard_all(x, world, "zigzag") for x in (q, k, v, do))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]

    def kernel_fb():
        for x in leaves:
            x.grad = None
        ringattn.flash_attn(*leaves, causal=True, backend=backend).backward(do)

    saved = ring_fwd(qs, ks, vs, ring)
    dkvs = [torch.zeros((2, *x.shape), dtype=F32, device=dev) for x in ks]
    fns = {
        "kernel_fwd": lambda: ringattn.flash_attn(q, k, v, causal=True, backend=backend),
        "kernel_fwdbwd": kernel_fb,
        "ring_fwd": lambda: ring_fwd(qs, ks, vs, ring),
        "ring_fwdbwd": lambda: ring_bwd(dos, qs, ks, vs, *ring_fwd(qs, ks, vs, ring), ring),
        "raw_fwd": lambda: ring_fwd(qs, ks, vs, raw),
        "raw_fwdbwd": lambda: (ring_fwd(qs, ks, vs, raw), ring_bwd(dos, qs, ks, vs, *saved, raw)),
    }
    ms = {name: bench(fn, dev) for name, fn in fns.items()}
    for x in leaves:
        x.grad = None
    rank0 = lambda: rank_bwd(0, dos, qs, ks, vs, *rank_fwd(0, qs, ks, vs, ring), dkvs, ring)  # noqa: E731
    # + its shards, the K/V it receives and the dK/dV that travels to it
    rank_mem = peak_extra(rank0, dev) + nbytes(qs[0], ks[0], vs[0], dos[0], ks[0], vs[0], dkvs[0])
    kernel_mem = peak_extra(kernel_fb, dev) + nbytes(*leaves, do)
    ratios = {f"{w}{p}_ratio": ms[f"{w or 'ring_'}{p}"] / ms[f"kernel_{p}"]
              for w in ("", "raw_") for p in ("fwd", "fwdbwd")}  # fmt: skip
    return {"tokens_per_rank": n, "world": world, "seq_len": n * world, "ms": ms, **ratios,
            "rank_mib": rank_mem / 2**20, "kernel_mib": kernel_mem / 2**20}  # fmt: skip


def on_side(copy, compute, side, dev):
    """copy() on the side stream (None: the current one) with compute() on the current stream;
    both are done when the returned function returns, as far as the current stream is concerned."""

    def run():
        if side is None:
            copy()
            return compute() if compute else None
        main = torch.cuda.current_stream(dev)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            copy()
        if compute:
            compute()
        main.wait_stream(side)

    return run


def time_overlap(n, cfg, dev, backend, hkv=8):
    h, d = cfg["heads"], cfg["dim"]
    q, k, v = (randn(1, m, h, d, dev=dev) for m in (n, n // 2, n // 2))

    def compute():  # a steady zigzag step: all n queries x the first half of a shard's keys
        ops.attention_fwd(q, k, v, scale=d**-0.5, offset=None, out_dtype=F32, backend=backend)

    side = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    msg = randn(2, 1, n, hkv, d, dev=dev)  # the K/V shard a rank passes on
    dst, host = torch.empty_like(msg), torch.empty(msg.shape, dtype=BF16, pin_memory=bool(side))
    t_comp, t_one = (
        bench(compute, dev),
        bench(on_side(lambda: dst.copy_(msg), None, side, dev), dev),
    )
    reps = {"D2D x1": 1} | {f"D2D as {name}": max(1, round((lat + nbytes(msg) / bw) * 1e3 / t_one))
                            for name, (bw, lat) in LINKS.items()}  # fmt: skip
    cases = {c: (side, lambda r=r: [dst.copy_(msg) for _ in range(r)]) for c, r in reps.items()}

    def stage():  # device -> pinned host -> device, RingComm's path on gloo
        host.copy_(msg, non_blocking=True)
        dst.copy_(host, non_blocking=True)

    cases |= {
        "host staging, side stream": (side, stage),
        "host staging, same stream": (None, stage),
    }
    rows = []
    for case, (stream, copy) in cases.items():
        t_copy = bench(on_side(copy, None, stream, dev), dev)
        t_step, top = bench(on_side(copy, compute, stream, dev), dev), max(t_comp, t_copy)
        rows.append({"tokens_per_rank": n, "kv_heads": hkv, "case": case,
                     "copies": reps.get(case, 1), "compute_ms": t_comp, "copy_ms": t_copy,
                     "step_ms": t_step, "step_over_max": t_step / top,
                     "serial_over_max": (t_comp + t_copy) / top})  # fmt: skip
    return rows


def time_step(n, cfg, dev, backend):
    h, d = cfg["heads"], cfg["dim"]
    q, do, k, v = (randn(1, n, h, d, dev=dev) for _ in range(4))
    ring = Ring("zigzag", True, d**-0.5, backend)
    steady = plan_step(2 * n, 1, 0, 2, "zigzag", True)  # rank 1, rank 0's K/V: q x k[:n/2]
    diag = plan_step(2 * n, 1, 1, 2, "zigzag", True)  # its own K/V: causal n x n
    out = torch.zeros(q.shape, dtype=F32, device=dev)
    lse = torch.full((1, h, n), float("-inf"), device=dev)
    step_fwd(diag, q, k, v, out, lse, ring)  # a real lse and delta for the backward
    delta = ops.attention_delta(do, out.to(BF16), backend=backend)
    dq, dkv = torch.zeros_like(out), torch.zeros((2, *k.shape), dtype=F32, device=dev)
    acc = (out.clone(), lse.clone())  # merged into over and over: same cost, no copies timed
    row = {"tokens_per_rank": n}
    for name, tasks, c in (("", steady, ring), ("raw_", steady, ring._replace(accumulate=False)),
                           ("diag_", diag, ring)):  # fmt: skip
        fwd = lambda tasks=tasks, c=c: step_fwd(tasks, q, k, v, *acc, c)  # noqa: E731
        bwd = lambda tasks=tasks, c=c: step_bwd(tasks, do, q, k, v, lse, delta, dq, dkv, c)  # noqa: E731
        row[f"{name}fwd_ms"] = bench(fwd, dev)
        row[f"{name}fwdbwd_ms"] = bench(lambda fwd=fwd, bwd=bwd: (fwd(), bwd()), dev)
    flops = 2 * h * n * n * d  # half an n x n block: 4 * B * H * n^2 * D * 0.5; fwd+bwd x 3.5
    return row | {"tflops_fwd": flops / row["fwd_ms"] / 1e9,
                  "tflops_fwdbwd": 3.5 * flops / row["fwdbwd_ms"] / 1e9}  # fmt: skip


def multiproc(nproc, out, smoke):
    log, res = out / f"multiproc-W{nproc}.log", out / f"multiproc-W{nproc}.json"
    res.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", os.path.abspath(__file__), "--worker",
           "--out", str(out)]  # fmt: skip
    env = {**os.environ, "RINGATTN_COMM_TIMEOUT": "120", "OMP_NUM_THREADS": "1"}
    try:
        with open(log, "w") as f:
            rc = subprocess.run(cmd + ["--cpu-smoke"] * smoke, stdout=f, stderr=subprocess.STDOUT,
                                env=env, timeout=300).returncode  # fmt: skip
    except subprocess.TimeoutExpired:
        rc = "timeout"
    got = json.loads(res.read_text()) if res.exists() else []
    return got or [{"world": nproc, "layout": "-", "ok": False, "rc": rc, "log": str(log)}]


def worker(smoke, out):
    """One rank of part (e) under torchrun; every rank on GPU 0 (CPU with --cpu-smoke)."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda:0")
    b, s, hq, hkv, d = (SMOKE if smoke else GPU)["mp"]
    rows = []
    for i, layout in enumerate(("zigzag", "striped")):
        torch.manual_seed(100 * world + i)  # the same full tensors on every rank
        q, do, k, v = (torch.randn(b, s, h, d).to(BF16) for h in (hq, hq, hkv, hkv))
        mine = [ringattn.shard_sequence(x, layout=layout).to(dev).requires_grad_()
                for x in (q, k, v)]  # fmt: skip
        out_l, lse = ringattn.ring_attention(*mine, causal=True, layout=layout, return_lse=True)
        out_l.backward(ringattn.shard_sequence(do, layout=layout).to(dev))

        def full(x, dim=1, layout=layout):  # gloo gathers host tensors
            return ringattn.gather_sequence(x.detach().float().cpu(), dim=dim, layout=layout)

        got = {"out": full(out_l), "lse": full(lse, 2)}
        got |= {f"d{n}": full(x.grad) for n, x in zip("qkv", mine, strict=True)}
        if rank == 0:
            res = compare(got, *(x.to(dev) for x in (q, k, v, do)), causal=True)
            rows.append({"world": world, "layout": layout, "device": str(dev), **res})
    if rank == 0:
        (out / f"multiproc-W{world}.json").write_text(json.dumps(rows, indent=1))
    dist.destroy_process_group()


def table(part, rows) -> list[str]:
    cols = SHOW[part].split()
    cell = lambda x: f"{x:.3f}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = [f"({part}) | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    return lines + ["| | " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]


def run_part(part, cfg, dev, backend, out, smoke) -> list[dict]:
    if part == "a":
        return [check(*c, cfg, dev, backend) for c in CHECKS]
    if part == "b":
        return [time_ring(n, w, cfg, dev, backend) for n in cfg["ring_n"] for w in cfg["ring_w"]]
    if part == "c":
        return [r for n in cfg["overlap_n"] for r in time_overlap(n, cfg, dev, backend)]
    if part == "d":
        return [time_step(n, cfg, dev, backend) for n in cfg["step_n"]]
    return [r for nproc in cfg["nprocs"] for r in multiproc(nproc, out, smoke)]


def write_steps(rows, cfg, name, path):
    """Part (d) in the form `ring_model.py --measured` reads."""
    steps = [{"fwd_s": r["fwd_ms"] / 1e3, "fwdbwd_s": r["fwdbwd_ms"] / 1e3, **r} for r in rows]
    meta = {"device": name, "dtype": "bfloat16", "batch": 1, "q_heads": cfg["heads"],
            "kv_heads": cfg["heads"], "head_dim": cfg["dim"], "steps": steps}  # fmt: skip
    path.write_text(json.dumps(meta, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="directory for every result")
    p.add_argument("--parts", default="abcde", help="subset of abcde")
    p.add_argument("--multiproc", action="store_true", help="part (e) only: --parts e")
    p.add_argument("--quick", action="store_true", help="fewer sizes in (b), (c), (d)")
    p.add_argument("--cpu-smoke", action="store_true", help="CPU, backend torch, tiny sizes")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.parts or set(args.parts) - set("abcde"):
        p.error(f"--parts takes letters from abcde; got {args.parts!r}")
    out = Path(args.out)
    if args.worker:
        return worker(args.cpu_smoke, out)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        raise SystemExit("no CUDA device: --cpu-smoke runs the logic on CPU")
    dev, backend = (torch.device("cuda:0"), "triton") if cuda else (torch.device("cpu"), "torch")
    cfg = SMOKE if args.cpu_smoke else QUICK if args.quick else GPU
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference stays float32
    name = torch.cuda.get_device_name(dev) if cuda else "CPU smoke"
    res = {"device": name, "torch": torch.__version__, "config": cfg, "seconds": {}}
    lines = [f"# gpu_ring on {name}, torch {torch.__version__}, bf16, causal unless noted", ""]
    for part in "e" if args.multiproc else args.parts:
        t0 = time.perf_counter()
        torch.manual_seed(ord(part))
        res[part] = run_part(part, cfg, dev, backend, out, args.cpu_smoke)
        res["seconds"][part] = round(time.perf_counter() - t0, 1)
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
        if part == "d":
            write_steps(res["d"], cfg, name, out / "steps.json")
        lines += table(part, res[part]) + [""]
        print(f"({part}) done in {res['seconds'][part]} s", flush=True)
    lines.append(f"seconds per part: {res['seconds']}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    failed = [r for part in "ae" for r in res.get(part, []) if not r["ok"]]
    if failed:
        raise SystemExit(f"FAILED: {len(failed)} correctness check(s); see {out}/results.json")


if __name__ == "__main__":
    main()
