"""torchrun --standalone --nproc_per_node 4 launch/demo.py

The main job (`make demo`): zigzag ring attention, forward and backward, over one long random
sequence sharded across the ranks; checked against a float64 reference on a slice of queries;
then a table. gloo on CPU, NCCL when every rank has a GPU. Options: --seq-len, --heads,
--kv-heads, --head-dim, --layout, --dtype, --check-rows.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.distributed as dist

import ringattn
from ringattn.kernels.attention.naive import naive_attention
from ringattn.runtime import init_distributed


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq-len", type=int, default=16384, help="total tokens S")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layout", default="zigzag", choices=ringattn.LAYOUTS)
    p.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (GPU default)")
    p.add_argument("--check-rows", type=int, default=128, help="queries checked in float64")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    args = parse_args()
    device = init_distributed()
    use_cuda = device.type == "cuda"
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype or ("bfloat16" if use_cuda else "float32"))
    b, s, hq, hkv, d = args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim

    # Every rank draws the same full tensors and keeps its shard (a real job would load its shard).
    gen = torch.Generator().manual_seed(args.seed)
    q, k, v, do = (
        torch.randn(b, s, h, d, generator=gen) for h in (hq, hkv, hkv, hq)
    )  # [B, S, H, D] each
    shard = lambda x: ringattn.shard_sequence(x, layout=args.layout).to(device, dtype)  # noqa: E731
    ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
    dol = shard(do)

    # Warm-up on a tiny shard: the first call pays one-off imports and (on GPU) kernel compiles.
    tiny = [x[:, : 2 * world].clone().requires_grad_() for x in (ql, kl, vl)]
    ringattn.ring_attention(*tiny, causal=True, layout=args.layout).sum().backward()
    if use_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    base_mem = torch.cuda.memory_allocated(device) if use_cuda else peak_rss_bytes()
    dist.barrier()
    t0 = time.perf_counter()
    out, lse = ringattn.ring_attention(ql, kl, vl, causal=True, layout=args.layout, return_lse=True)
    if use_cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    out.backward(dol)
    if use_cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    peak = (torch.cuda.max_memory_allocated(device) if use_cuda else peak_rss_bytes()) - base_mem

    # Float64 reference for the last `check_rows` queries (the ones that see the most keys).
    rows = torch.arange(s - args.check_rows, s)
    q64 = q[:, rows].double().requires_grad_()
    ref_out, ref_lse = naive_attention(
        q64, k.double(), v.double(), scale=d**-0.5, offset=s - args.check_rows
    )
    ref_out.backward(do[:, rows].double())
    pos = ringattn.sequence_positions(s, layout=args.layout)
    mine = torch.isin(pos, rows)  # local rows that fall in the checked slice
    ref_idx = pos[mine] - (s - args.check_rows)
    err = torch.tensor(
        [
            (out.detach().cpu()[:, mine].double() - ref_out.detach()[:, ref_idx])
            .abs()
            .max()
            .item(),
            (lse.cpu()[:, :, mine].double() - ref_lse.detach()[:, :, ref_idx]).abs().max().item(),
            (ql.grad.cpu()[:, mine].double() - q64.grad[:, ref_idx]).abs().max().item(),
        ]
        if mine.any()
        else [0.0, 0.0, 0.0]
    )
    stats = torch.tensor([t1 - t0, t2 - t1, float(peak)], dtype=torch.float64)
    every = [None] * world
    dist.all_gather_object(every, (stats.tolist(), err.tolist()))
    if rank == 0:
        full_scores = b * hq * s * s * 4  # one float32 S x S score matrix per (batch, head)
        fwd = max(e[0][0] for e in every)
        bwd = max(e[0][1] for e in every)
        mem = max(e[0][2] for e in every)
        max_err = max(max(e[1]) for e in every)
        dev = (
            f"{world} x {torch.cuda.get_device_name(device)}" if use_cuda else f"{world} CPU ranks"
        )
        print(f"ringattn demo: causal {args.layout} ring attention, {dtype}, {dev}")
        print(f"  B={b} H={hq} (KV heads {hkv}) D={d}")
        header = ("ranks", "tokens", "tokens/rank", "fwd s", "bwd s", "peak MiB/rank",
                  "full attn MiB", "max err")  # fmt: skip
        row = (world, s, s // world, f"{fwd:.2f}", f"{bwd:.2f}", f"{mem / 2**20:.1f}",
               f"{full_scores / 2**20:.1f}", f"{max_err:.1e}")  # fmt: skip
        widths = [max(len(str(h)), len(str(r))) for h, r in zip(header, row, strict=True)]
        for line in (header, row):
            cells = (f"{c!s:>{w}}" for c, w in zip(line, widths, strict=True))
            print("| " + " | ".join(cells) + " |")
        print("  peak: memory added during forward+backward (CPU: growth of peak RSS);")
        print("  full attn: the S x S float32 scores that materializing attention would hold;")
        print(f"  max err: out, lse and dq vs float64 on the last {args.check_rows} queries")
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        if max_err > tol:
            raise SystemExit(f"FAILED: max error {max_err:.2e} > {tol:g}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
