"""torchrun --standalone --nproc_per_node 2 launch/train.py --config tiny --seq-len 256 --steps 5

Train the Llama of `ringattn.models` with sequence parallelism: the world is split into
dp = world / sp data-parallel replicas, each a group of `--sp` ranks that shares one sequence
through ring attention (`--strategy ring`) or DeepSpeed-Ulysses all-to-all (`--strategy
ulysses`). Data is random tokens (seeded) unless `--data FILE` (bytes as tokens, vocab 256).
One line per step on rank 0: loss (global mean over all tokens of the step), tokens/s, model
TFLOP/s (`flops_per_token` x tokens / step time, all ranks together; recomputation not
counted), and the peak memory of the busiest rank (CUDA max_memory_allocated, CPU peak RSS).

    # 4 ranks: 2 replicas x 2-way ring, each block recomputed in backward
    torchrun --standalone --nproc_per_node 4 launch/train.py --sp 2 --checkpoint full
    # ZeRO through DeepSpeed (ds.json e.g. {"zero_optimization": {"stage": 2}})
    torchrun --standalone --nproc_per_node 2 launch/train.py --deepspeed ds.json
    # two nodes of 8 GPUs (run on each node; MASTER is the first node's address)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint MASTER:29500 \\
        --rdzv-id train1 launch/train.py --config llama3-1b --seq-len 131072 --sp 8

gloo on CPU, NCCL when every rank has a GPU. Gradients: each rank's loss is its share of the
global mean, so gradients are summed over sp and averaged over dp (one all-reduce here, or
DeepSpeed's own reduction over its "sequence data parallel" group with `--deepspeed`), then
clipped to `--grad-clip` (DeepSpeed: config `gradient_clipping`, filled from the flag).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from ringattn.checkpoint import CHOICES, apply_checkpointing
from ringattn.layout import LAYOUTS
from ringattn.models import CONFIGS, Llama, LlamaConfig, flops_per_token, param_count
from ringattn.parallel import (
    STRATEGIES,
    allreduce_gradients,
    parallelize,
    sequence_parallel_loss,
    shard_batch,
)
from ringattn.runtime import init_distributed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="tiny", choices=sorted(CONFIGS), help="model shapes")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence S")
    p.add_argument("--batch", type=int, default=1, help="sequences per data-parallel replica")
    p.add_argument("--layout", default="zigzag", choices=LAYOUTS)
    p.add_argument("--strategy", default="ring", choices=STRATEGIES)
    p.add_argument("--sp", type=int, default=None, help="sequence-parallel size (default: world)")
    p.add_argument("--checkpoint", default="none", choices=CHOICES)
    p.add_argument("--deepspeed", metavar="CONFIG.json", help="train through deepspeed.initialize")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", metavar="FILE", help="text file, tokenized bytewise (vocab 256)")
    p.add_argument("--fixed-batch", action="store_true", help="train on the first batch only")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="autocast (default: bf16 CUDA, fp32 CPU)"
    )
    p.add_argument("--progress", action="store_true", help="ETA on stderr (default: if a TTY)")
    return p.parse_args(argv)


class Batches:
    """The global batch [dp * batch, S] of each step, identical on every rank (seeded)."""

    def __init__(self, args: argparse.Namespace, *, rows: int, vocab_size: int):
        self.rows, self.seq_len, self.vocab_size = rows, args.seq_len, vocab_size
        self.gen = torch.Generator().manual_seed(args.seed)
        self.text = None
        if args.data:
            with open(args.data, "rb") as f:
                self.text = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
            if vocab_size < 256:
                raise ValueError(f"--data needs a vocabulary of 256 bytes; model has {vocab_size}")
            if len(self.text) < self.seq_len:
                raise ValueError(f"--data has {len(self.text)} bytes; need {self.seq_len}")
        self.fixed = self._draw() if args.fixed_batch else None

    def _draw(self) -> torch.Tensor:
        if self.text is None:
            return torch.randint(0, self.vocab_size, (self.rows, self.seq_len), generator=self.gen)
        starts = torch.randint(
            0, len(self.text) - self.seq_len + 1, (self.rows,), generator=self.gen
        )
        return torch.stack([self.text[s : s + self.seq_len] for s in starts.tolist()])

    def next(self) -> torch.Tensor:
        return self.fixed if self.fixed is not None else self._draw()


class Progress:
    """A one-line ETA on stderr, rewritten in place on a TTY."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.tty = total, enabled, sys.stderr.isatty()
        self.start = time.perf_counter()

    def clear(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\r\033[K")

    def update(self, step: int) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / step * (self.total - step)
        width = 30
        bar = "#" * (width * step // self.total) + "." * (width - width * step // self.total)
        text = f"[{bar}] {step}/{self.total}  elapsed {elapsed:.0f}s  eta {eta:.0f}s"
        sys.stderr.write(f"\r{text}" if self.tty else f"{text}\n")
        sys.stderr.flush()


def significant(x: float, digits: int = 3) -> str:
    """`x` with at least `digits` significant digits and no exponent: 0.0000123, 1.23, 1234."""
    if x <= 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(x)))}f}"


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reduce_gradients(model: nn.Module, *, dp_size: int) -> None:
    """Sum over sp, mean over dp: one sum over the world (dp x sp), then / dp."""
    allreduce_gradients(model, group=None)
    if dp_size > 1:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(dp_size)


def train(args: argparse.Namespace, device: torch.device) -> None:
    from ringattn.integrations.deepspeed import ParallelMesh

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = ParallelMesh.build(sp_size=args.sp or world)
    try:
        _train(args, device, mesh, rank, world)
    finally:
        mesh.destroy()


def _train(args, device, mesh, rank: int, world: int) -> None:
    config = LlamaConfig.from_name(args.config, max_seq_len=args.seq_len)
    torch.manual_seed(args.seed)  # every rank builds the same weights
    with torch.device(device):
        model = Llama(config=config)
    if mesh.sp_size > 1:
        parallelize(model, group=mesh.sp_group, layout=args.layout, strategy=args.strategy)
    apply_checkpointing(model, args.checkpoint)
    engine, trainer = None, "torch AdamW"
    if args.deepspeed:
        from ringattn.integrations.deepspeed import deepspeed_config, initialize_deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        with open(args.deepspeed) as f:
            ds_config = deepspeed_config(json.load(f), micro_batch_size=args.batch)
        ds_config.setdefault("gradient_clipping", args.grad_clip)
        optimizer = None  # DeepSpeed builds the one its config names, else our AdamW:
        if "optimizer" not in ds_config:
            optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        engine, _ = initialize_deepspeed(model, mesh=mesh, config=ds_config, optimizer=optimizer)
        trainer = f"deepspeed ZeRO-{ds_config['zero_optimization']['stage']}"
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    batches = Batches(args, rows=args.batch * mesh.dp_size, vocab_size=config.vocab_size)
    tokens_per_step = args.batch * mesh.dp_size * args.seq_len
    flops_per_step = flops_per_token(config, args.seq_len) * tokens_per_step
    progress = Progress(args.steps, enabled=rank == 0 and (args.progress or sys.stderr.isatty()))
    if rank == 0:
        print(
            f"# {args.config}: {param_count(config) / 1e6:.2f}M params | world {world} = "
            f"dp {mesh.dp_size} x sp {mesh.sp_size} | {args.strategy} {args.layout} | "
            f"S {args.seq_len} | batch {args.batch}/replica | checkpoint {args.checkpoint} | "
            f"{trainer} | {device.type} {str(dtype).removeprefix('torch.')}",
            flush=True,
        )
    for step in range(1, args.steps + 1):
        rows = batches.next()[mesh.dp_rank * args.batch : (mesh.dp_rank + 1) * args.batch]
        batch = {
            k: v.to(device)
            for k, v in shard_batch(rows, group=mesh.sp_group, layout=args.layout).items()
        }
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = (engine or model)(batch["input_ids"], position_ids=batch["position_ids"])
        loss = sequence_parallel_loss(logits, batch["labels"], group=mesh.sp_group)
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            reduce_gradients(model, dp_size=mesh.dp_size)
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        loss_sum = loss.detach().double().reshape(1)  # the global mean over sp; sum over dp
        dist.all_reduce(loss_sum, group=mesh.dp_group)
        slowest = torch.tensor(  # the slowest rank's step time, the largest peak memory
            [elapsed, peak_memory_bytes(device)], dtype=torch.float64, device=device
        )
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        mean_loss = loss_sum.item() / mesh.dp_size
        step_s, peak = slowest.tolist()
        if rank == 0:
            progress.clear()
            print(
                f"step {step}/{args.steps} | loss {mean_loss:.6f} | "
                f"{tokens_per_step / step_s:,.0f} tok/s | "
                f"{significant(flops_per_step / step_s / 1e12)} TFLOP/s | "
                f"peak {peak / 2**20:.0f} MiB/rank",
                flush=True,
            )
            progress.update(step)
        if not math.isfinite(mean_loss):
            raise SystemExit(f"loss is {mean_loss} at step {step}")
    progress.clear()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = init_distributed()
    try:
        train(args, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
