"""python benchmarks/decode_cpu.py

Decode latency vs history length on CPU, the sequence's KV cache sharded over W = 1, 2, 4 gloo
ranks (spawned with torch.multiprocessing, file rendezvous). For each W and history length L:
the "small" Llama config (random init), L cached tokens placed as a ring prefill would place
them (zigzag, L / W per rank; their K/V are random: decode cost does not depend on the values),
then greedy `decode_step`s of one token. One row per (W, L): the median per-token latency over
the timed steps, and the tokens each rank holds.

A decode step on every rank runs the whole dense part of the model for the new token
(replicated) and attends over its own L / W cached tokens, then merges by LSE across ranks
(2 collectives per layer). So sharding divides the attention (cache read) time by W and adds
the collectives; the dense part stays. Each rank is one "device" with --threads threads
(default 1: W ranks use W cores; W = 4 on a 2-core machine oversubscribes them 2x, which the
table shows).

Writes benchmarks/results/<date>-decode-cpu.json and .png; --quick runs a smaller sweep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ringattn.cache import ShardedKVCache, decode_step
from ringattn.models.llama import Llama, LlamaConfig

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="small")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--history", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per history length")
    p.add_argument("--steps", type=int, default=6, help="timed steps per history length")
    p.add_argument("--quick", action="store_true", help="history up to 4096, 3 timed steps")
    return p.parse_args()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _rank_main(rank: int, world: int, init_file: str, out_file: str, args: dict) -> None:
    torch.set_num_threads(args["threads"])
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same weights on every rank
    model = Llama(config=LlamaConfig.from_name(args["config"])).eval()
    page = args["page_size"]
    most = max(args["history"]) + args["warmup"] + args["steps"]
    cache = ShardedKVCache.for_model(model, num_pages=most // (world * page) + 3, page_size=page)
    cache.pool.k.normal_()  # every slot holds K/V values, so any placement is a valid history
    cache.pool.v.normal_()
    token = torch.zeros(1, 1, dtype=torch.long)
    rows = []
    for history in args["history"]:
        # Allocate L tokens as ring prefill places them: L / W per rank, in layout order.
        plan = cache.begin_prefill(["h"], history + 1)
        times = []
        for i in range(args["warmup"] + args["steps"]):
            dist.barrier()
            t0 = time.perf_counter()
            token = decode_step(model, cache, token, seq_ids=["h"])[:, -1].argmax(-1)[:, None]
            if i >= args["warmup"]:
                times.append(time.perf_counter() - t0)
        per_rank = [cache.tokens_on_rank("h", r) for r in range(world)]
        rows.append(
            dict(
                world=world,
                history=plan.ring_len,
                ms_per_token=1e3 * statistics.median(times),
                ms_min=1e3 * min(times),
                tokens_per_rank=per_rank,
            )
        )
        cache.free("h")
    if rank == 0:
        Path(out_file).write_text(json.dumps(rows))
    dist.destroy_process_group()


def run_world(world: int, args: dict) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="decode-bench-") as tmp:
        init_file, out_file = os.path.join(tmp, "rendezvous"), os.path.join(tmp, "rows.json")
        mp.spawn(_rank_main, args=(world, init_file, out_file, args), nprocs=world, join=True)
        return json.loads(Path(out_file).read_text())


def plot(rows: list[dict], header: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for world in sorted({r["world"] for r in rows}):
        mine = [r for r in rows if r["world"] == world]
        ax.plot(
            [r["history"] for r in mine],
            [r["ms_per_token"] for r in mine],
            "o-",
            label=f"W={world}",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cached history (tokens)")
    ax.set_ylabel("decode latency (ms / token, median)")
    ax.set_title("\n".join(textwrap.wrap(header, 100)), fontsize=7)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    if args.quick:
        args.history = [h for h in args.history if h <= 4096]
        args.steps = 3
    config = LlamaConfig.from_name(args.config)
    header = (
        f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, float32, gloo; "
        f"{args.config}: {config.n_layers} layers, {config.n_heads} q heads, "
        f"{config.n_kv_heads} kv heads, head dim {config.head_dim}; page size {args.page_size}; "
        f"batch 1, 1 new token per step, {args.threads} thread(s) per rank"
    )
    print(f"# decode latency vs history, {header}")
    print(f"{'W':>2} {'history':>8} {'ms/token':>9} {'min ms':>8}  tokens per rank")
    rows = []
    for world in args.worlds:
        for row in run_world(world, vars(args)):
            rows.append(row)
            print(
                f"{row['world']:>2} {row['history']:>8} {row['ms_per_token']:>9.2f} "
                f"{row['ms_min']:>8.2f}  {row['tokens_per_rank']}"
            )
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{datetime.now():%Y-%m-%d-%H%M%S}-decode-cpu"
    stem.with_suffix(".json").write_text(
        json.dumps(dict(header=header, args=vars(args), rows=rows), indent=1)
    )
    plot(rows, header, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
