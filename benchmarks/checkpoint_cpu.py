"""python benchmarks/checkpoint_cpu.py [--layers 8] [--out benchmarks/results/<date>-checkpoint-cpu]

Activation checkpointing on CPU: peak tensor memory per rank and step time (forward + backward)
against sequence length, for each policy (none, selective, full, offload), on W = 1 and 2 gloo
ranks (one spawned process per rank, one thread each), and the memory planner's prediction for
every measured configuration.

Model: `tiny` with `--layers` blocks (dim 64, 4 query / 2 KV heads x 16, SwiGLU 128, vocab 256),
float32, batch 1, the ring applied by `parallelize` (also at W = 1), zigzag layout, loss
`sequence_parallel_loss`. Lengths: S/W = 512, 1024, 2048 tokens per rank.

Measured per configuration, on every rank (the table shows the busiest rank):
- peak: `MemoryTracker` (every tensor storage alive, parameters included) over one step;
- saved per block: the growth of live memory across each block's forward (forward hooks),
  median over blocks: what one block keeps for its backward (for offload on CPU, the host copy
  of its input, which lives in the same memory);
- step time: forward + backward without the tracker, the fastest of five steps (the slowest
  rank's time per step), the policies' steps interleaved round-robin. The machine is shared:
  the load average is recorded.
Then bfloat16 at S/W = 1024 checks the planner's 16-bit formulas (memory only).

Writes <out>.json, <out>.png (peak memory and step time vs S) and <out>.md (both tables:
measurements, and planner vs measured per configuration).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ringattn.checkpoint import POLICIES, apply_checkpointing
from ringattn.checkpoint.memory import MemoryTracker
from ringattn.checkpoint.planner import Setup, plan_memory, saved_per_block
from ringattn.models import Llama, LlamaConfig
from ringattn.parallel import parallelize, sequence_parallel_loss, shard_batch

TOKENS_PER_RANK = (512, 1024, 2048)
WORLDS = (1, 2)
BF16_TOKENS_PER_RANK = 1024
TIMED_STEPS = 5  # per policy, round-robin; the fastest counts
MIB = 2**20


def _step(model, batch) -> None:
    logits = model(batch["input_ids"], position_ids=batch["position_ids"])  # held in backward
    sequence_parallel_loss(logits, batch["labels"]).backward()


def _tracked(model, batch) -> dict:
    """Peak bytes of one step and the median growth of live bytes across a block's forward."""
    tracker = MemoryTracker()
    tracker.track(*model.parameters())
    after: list[int] = []
    hooks = [b.register_forward_hook(lambda *_: after.append(tracker.live)) for b in model.layers]
    with tracker:
        _step(model, batch)
    for h in hooks:
        h.remove()
    growth = [b - a for a, b in zip(after[:-1], after[1:], strict=True)]
    return {"peak": tracker.peak, "saved_per_block": statistics.median(growth)}


def _measure(config: LlamaConfig, seq_len: int, dtype: str, timed: int) -> dict[str, dict]:
    """One rank's peak, saved bytes per block and step times, by policy, for one length.

    Each policy's model runs one tracked step; then the timed steps go round-robin over the
    policies, so that a change in the machine's load hits every policy alike.
    """
    ids = torch.randint(
        0, config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(1)
    )
    batch = shard_batch(ids)
    models, out = {}, {}
    for policy in POLICIES:
        torch.manual_seed(0)
        model = Llama(config=config).to(getattr(torch, dtype))
        models[policy] = apply_checkpointing(parallelize(model), policy)
        out[policy] = _tracked(models[policy], batch)
        out[policy]["times"] = []
        models[policy].zero_grad(set_to_none=True)
    for _ in range(timed):
        for policy, model in models.items():
            dist.barrier()
            start = time.perf_counter()
            _step(model, batch)
            out[policy]["times"].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    return out


def _worker(rank: int, world: int, init_file: str, jobs: list, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results.put((rank, [_measure(*job) for job in jobs]))  # job: (config, S, dtype, steps)
    finally:
        dist.destroy_process_group()


def _run(world: int, jobs: list) -> list[list[dict]]:
    """Run `jobs` on `world` spawned ranks; per job, the ranks' results."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="ringattn-bench-") as tmp:
        init = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_worker, args=(r, world, init, jobs, results)) for r in range(world)
        ]
        for p in procs:
            p.start()
        by_rank = dict(results.get(timeout=1800) for _ in procs)
        for p in procs:
            p.join()
    return [[by_rank[r][j] for r in range(world)] for j in range(len(jobs))]


def _row(config, world, seq_len, policy, dtype, ranks: list[dict]) -> dict:
    setup = Setup(
        config,
        seq_len,
        world,
        dtype={"float32": "fp32", "bfloat16": "bf16"}[dtype],
        optimizer="none",
        device="cpu",
        keep_logits=True,  # _step holds `logits` through backward
    )
    predicted = plan_memory(setup, policy)
    peak = max(r["peak"] for r in ranks)
    steps = [max(r["times"][i] for r in ranks) for i in range(len(ranks[0]["times"]))]
    return {
        "world": world,
        "seq_len": seq_len,
        "policy": policy,
        "dtype": dtype,
        "peak_mib": peak / MIB,
        "peak_mib_per_rank": [r["peak"] / MIB for r in ranks],
        "predicted_mib": predicted.peak / MIB,
        "predicted_at": predicted.moment,
        "error": predicted.peak / peak - 1,
        "saved_per_block_mib": max(r["saved_per_block"] for r in ranks) / MIB,
        "predicted_saved_per_block_mib": (
            saved_per_block(setup, policy) + (predicted.host // config.n_layers)
        )
        / MIB,
        "step_s": min(steps) if steps else None,
    }


def _hardware() -> dict:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__}


def _markdown(meta: dict, rows: list[dict]) -> str:
    hw = meta["hardware"]
    lines = [
        f"# Activation checkpointing on CPU: memory and step time ({meta['date']})",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Hardware: {hw['cpu']}, {hw['cores']} cores, torch {hw['torch']}; one process per rank, "
        f"one thread each, gloo. Load average (1 min) at start {meta['load'][0]:.1f}, at end "
        f"{meta['load'][1]:.1f} on {hw['cores']} cores: the machine was shared, so step times "
        "are noisy (each is the fastest of five, policies interleaved).",
        "",
        f"Model: tiny with {meta['layers']} layers (dim 64, 4/2 heads x 16, ffn 128, vocab 256), "
        "batch 1, ring attention (zigzag) at every W, torch kernels. Peak: `MemoryTracker` "
        "(parameters included), the busiest rank. Saved/block: growth of live memory across a "
        "block's forward. Predicted: `ringattn.checkpoint.planner` (device cpu, no optimizer).",
        "",
        "## Measurements (float32)",
        "",
        "| W | S | policy | peak MiB | predicted MiB | error | saved/block MiB | predicted "
        "saved/block | step s | time / none |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fp32 = [r for r in rows if r["dtype"] == "float32"]
    none_time = {(r["world"], r["seq_len"]): r["step_s"] for r in fp32 if r["policy"] == "none"}
    for r in fp32:
        ratio = r["step_s"] / none_time[(r["world"], r["seq_len"])]
        lines.append(
            f"| {r['world']} | {r['seq_len']} | {r['policy']} | {r['peak_mib']:.2f} | "
            f"{r['predicted_mib']:.2f} | {100 * r['error']:+.1f} % | "
            f"{r['saved_per_block_mib']:.3f} | {r['predicted_saved_per_block_mib']:.3f} | "
            f"{r['step_s']:.2f} | {ratio:.2f} |"
        )
    lines += [
        "",
        "## Planner vs measured peak, per configuration",
        "",
        "predicted / measured MiB (error); the planner's peak moment is in the JSON.",
        "",
        "| W | S | dtype | " + " | ".join(POLICIES) + " |",
        "|---:|---:|---|" + "---:|" * len(POLICIES),
    ]
    configs = sorted({(r["world"], r["seq_len"], r["dtype"]) for r in rows})
    for world, seq_len, dtype in configs:
        cells = []
        for policy in POLICIES:
            (r,) = [
                x
                for x in rows
                if (x["world"], x["seq_len"], x["dtype"], x["policy"])
                == (world, seq_len, dtype, policy)
            ]
            cells.append(
                f"{r['predicted_mib']:.1f} / {r['peak_mib']:.1f} ({100 * r['error']:+.1f} %)"
            )
        lines.append(f"| {world} | {seq_len} | {dtype} | " + " | ".join(cells) + " |")
    worst = max(rows, key=lambda r: abs(r["error"]))
    lines += [
        "",
        f"Largest planner error: {100 * worst['error']:+.1f} % (W={worst['world']}, "
        f"S={worst['seq_len']}, {worst['dtype']}, {worst['policy']}).",
        "",
        "## Findings",
        "",
    ]
    lines += _findings(fp32, none_time)
    return "\n".join(lines) + "\n"


def _findings(fp32: list[dict], none_time: dict) -> list[str]:
    out = []
    for world in WORLDS:
        longest = max(r["seq_len"] for r in fp32 if r["world"] == world)
        at = {r["policy"]: r for r in fp32 if (r["world"], r["seq_len"]) == (world, longest)}
        base = at["none"]
        saved = ", ".join(f"{p} {at[p]['saved_per_block_mib']:.2f}" for p in POLICIES)
        peaks = ", ".join(f"{p} {at[p]['peak_mib']:.1f}" for p in POLICIES)
        times = ", ".join(
            f"{p} {at[p]['step_s'] / base['step_s']:.2f} x" for p in POLICIES if p != "none"
        )
        out += [
            f"- W={world}, S={longest}: saved per block (MiB) {saved}; peak (MiB) {peaks}.",
            f"- W={world}, S={longest}: step time vs none: {times}.",
        ]
    ratios = {
        p: [r["step_s"] / none_time[(r["world"], r["seq_len"])] for r in fp32 if r["policy"] == p]
        for p in POLICIES
        if p != "none"
    }
    out.append(
        "- Step time / none over all configurations (median): "
        + ", ".join(f"{p} {statistics.median(v):.2f} x" for p, v in ratios.items())
        + ". Expected: selective <= 1.25 x, full ~ 1.33 x (one more forward, ring included)."
    )
    return out


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for policy, color in zip(POLICIES, ("C0", "C1", "C2", "C3"), strict=True):
        for world, style in zip(WORLDS, ("-", "--"), strict=True):
            sel = [
                r
                for r in rows
                if (r["policy"], r["world"], r["dtype"]) == (policy, world, "float32")
            ]
            s = [r["seq_len"] for r in sel]
            label = f"{policy} W={world}"
            ax_mem.plot(
                s, [r["peak_mib"] for r in sel], style, color=color, marker="o", label=label
            )
            ax_mem.plot(s, [r["predicted_mib"] for r in sel], "x", color=color)
            times = [r["step_s"] for r in sel]
            ax_time.plot(s, times, style, color=color, marker="o", label=label)
    for ax, title in ((ax_mem, "peak memory per rank, MiB (x: planner)"), (ax_time, "step s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length S")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax_time.set_yscale("log")
    ax_mem.legend(fontsize=7, ncol=2)
    fig.suptitle("activation checkpointing on CPU: tiny Llama, float32, ring attention")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    date = datetime.date.today().isoformat()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", default=f"benchmarks/results/{date}-checkpoint-cpu")
    args = parser.parse_args()
    config = LlamaConfig.from_name("tiny", n_layers=args.layers)
    load_start = os.getloadavg()[0]
    rows = []
    header = (
        f"{'W':>2} {'S':>6} {'policy':>9} {'dtype':>8} {'peak MiB':>9} {'pred MiB':>9} "
        f"{'err':>7} {'saved/blk':>9} {'step s':>7}"
    )
    print(f"{_hardware()}, load {load_start:.1f}\n{header}")
    for world in WORLDS:
        jobs = [(config, n * world, "float32", TIMED_STEPS) for n in TOKENS_PER_RANK]
        jobs.append((config, BF16_TOKENS_PER_RANK * world, "bfloat16", 0))
        for (_, seq_len, dtype, _), ranks in zip(jobs, _run(world, jobs), strict=True):
            for policy in POLICIES:
                r = _row(config, world, seq_len, policy, dtype, [x[policy] for x in ranks])
                rows.append(r)
                step = f"{r['step_s']:7.2f}" if r["step_s"] is not None else f"{'-':>7}"
                print(
                    f"{world:>2} {seq_len:>6} {policy:>9} {dtype:>8} {r['peak_mib']:9.2f} "
                    f"{r['predicted_mib']:9.2f} {100 * r['error']:+6.1f}% "
                    f"{r['saved_per_block_mib']:9.3f} {step}",
                    flush=True,
                )
    meta = {
        "date": date,
        "command": "python benchmarks/checkpoint_cpu.py",
        "hardware": _hardware(),
        "load": [load_start, os.getloadavg()[0]],
        "layers": args.layers,
        "tokens_per_rank": TOKENS_PER_RANK,
        "timed_steps": TIMED_STEPS,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(_markdown(meta, rows))
    _plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}.json, .md, .png")


if __name__ == "__main__":
    main()
