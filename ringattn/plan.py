"""How much memory a ring-attention training step needs per rank, and the longest sequence that
fits, for each activation checkpointing policy.

    python -m ringattn.plan --model llama3-8b --seq-len 131072 --world 8 --gpu-mem 80GiB

prints one column per policy (none, selective, full, offload) with the predicted peak by
component in GiB, where in the step the peak happens, and the longest sequence (a multiple of
2·W, the zigzag layout's unit) whose peak fits in `--gpu-mem`. From Python:

    from ringattn.plan import plan

    report = plan("llama3-8b", seq_len=131072, world=8, gpu_mem="80GiB")
    report.plans["selective"].peak, report.max_seq_len["selective"]
    text = report.table()  # the table the command line prints

The formulas are in `ringattn.checkpoint.planner`: they enumerate what autograd saves in the
Llama block under each policy, the ring's buffers and the attention workspace, and compare
the totals at each moment of the step (forward end, loss backward, each layer's backward).
On CPU (torch kernels, float32 and bfloat16) they were checked against measured peaks within a
few percent (`tests/checkpoint/test_planner.py`, `benchmarks/checkpoint_cpu.py`).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ringattn.checkpoint.planner import (
    COMPONENTS,
    DEVICES,
    DTYPE_BYTES,
    OPTIMIZERS,
    MemoryPlan,
    Setup,
    gib,
    max_seq_len,
    plan_memory,
    saved_per_block,
)
from ringattn.checkpoint.policies import POLICIES
from ringattn.models.llama import CONFIGS, LlamaConfig, param_count

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str | int) -> int:
    """ "80GiB" -> 85899345920. Units: B, KB/MB/GB/TB (powers of 10), KiB/MiB/GiB/TiB (of 2).

    Raises:
        ValueError: not a number followed by one of those units.
    """
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; expected e.g. 80GiB, 141GB, 512MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class PlanReport:
    """Predicted memory per policy for one setup.

    Attributes:
        name: the model's name (for the table's header).
        setup: the training step planned for.
        plans: policy -> `MemoryPlan` (peak, moment, components, forward end, backward peak).
        budget: bytes of device memory per rank, or None.
        max_seq_len: policy -> the longest sequence that fits `budget` (0: none does);
            empty without a budget.
    """

    name: str
    setup: Setup
    plans: dict[str, MemoryPlan]
    budget: int | None
    max_seq_len: dict[str, int]

    def table(self) -> str:
        """The report as text: a header, then by policy the components at the peak, the peak,
        the forward end and backward peak, and the fits; in GiB (MiB for peaks under 1 GiB)."""
        s, c = self.setup, self.setup.config
        policies = list(self.plans)
        params = param_count(c)
        count = f"{params / 1e9:.3g}B" if params >= 1e9 else f"{params / 1e6:.3g}M"
        header = (
            f"{self.name}: {count} params, {c.n_layers} layers, dim {c.dim}, "
            f"heads {c.n_heads}/{c.n_kv_heads} x {c.head_dim}, ffn {c.ffn_dim}, "
            f"vocab {c.vocab_size}\n"
            f"S={s.seq_len} over W={s.world} ranks ({s.seq_len // s.world} tokens/rank), "
            f"batch {s.batch}, {s.dtype}, optimizer {s.optimizer}, device {s.device}, "
            f"zero {s.zero}, logits {'kept' if s.keep_logits else 'freed'} after the loss"
        )
        unit, scale = ("GiB", 2**30)
        if max(self.plans[p].peak for p in policies) < 2**30:
            unit, scale = ("MiB", 2**20)
        width = max(11, *(len(p) + 2 for p in policies))
        lines = [
            header,
            "",
            f"{'per rank, ' + unit:<22}" + "".join(f"{p:>{width}}" for p in policies),
        ]

        def row(label: str, nbytes: Sequence[int], fmt: str = ".2f") -> None:
            cells = "".join(f"{v / scale:>{width}{fmt}}" for v in nbytes)
            lines.append(f"{label:<22}" + cells)

        for name in COMPONENTS:
            values = [self.plans[p].components[name] for p in policies]
            if name == "host" and not any(values):
                continue
            row(name.replace("_", " "), values)
        lines.append("-" * (22 + width * len(policies)))
        row("saved per block", [saved_per_block(s, p) for p in policies], ".3f")
        row("peak", [self.plans[p].peak for p in policies])
        row("forward end", [self.plans[p].forward_end for p in policies])
        row("backward peak", [self.plans[p].backward_peak for p in policies])
        if any(self.plans[p].host for p in policies) and s.device != "cpu":
            row("host (offloaded)", [self.plans[p].host for p in policies])
        if self.budget is not None:
            fits = ["yes" if self.plans[p].peak <= self.budget else "NO" for p in policies]
            label = f"fits {gib(self.budget):g} GiB"
            lines.append(f"{label:<22}" + "".join(f"{f:>{width}}" for f in fits))
            longest = "".join(f"{self.max_seq_len[p]:>{width}d}" for p in policies)
            lines.append(f"{'longest S that fits':<22}" + longest)
            none_fit = [p for p in policies if self.max_seq_len[p] == 0]
            if none_fit:
                shortest = replace(s, seq_len=2 * s.world)
                floor = min(plan_memory(shortest, p).peak for p in none_fit)
                hint = " (--zero 1/2/3 shards the states over the ranks)" if s.zero < 3 else ""
                lines.append(
                    f"nothing fits for {', '.join(none_fit)}: even S={2 * s.world} needs "
                    f"{gib(floor):.2f} GiB per rank{hint}"
                )
        lines.append("")
        lines += [f"{p} peak at: {self.plans[p].moment}" for p in policies]
        return "\n".join(lines)


def plan(
    model: str | LlamaConfig,
    *,
    seq_len: int,
    world: int = 1,
    gpu_mem: int | str | None = None,
    policies: Sequence[str] = POLICIES,
    batch: int = 1,
    dtype: str = "bf16",
    optimizer: str = "adamw",
    device: str = "cuda",
    zero: int = 0,
    keep_logits: bool = True,
) -> PlanReport:
    """Predict per-rank peak memory for each policy, and the longest sequence that fits.

    Args:
        model: a name from `ringattn.models.llama.CONFIGS` or a `LlamaConfig`.
        seq_len: global sequence length S, a multiple of 2·world (zigzag).
        world: ranks W of the sequence-parallel ring.
        gpu_mem: device memory per rank ("80GiB", or bytes); None skips the fit search.
        policies: which checkpoint policies to plan.
        batch, dtype, optimizer, device, zero, keep_logits: see
            `ringattn.checkpoint.planner.Setup`.

    Returns:
        A `PlanReport`; `report.table()` formats it.

    Raises:
        ValueError: unknown model, policy, dtype, optimizer or device; a length the layout
            cannot split; an unreadable `gpu_mem`.
    """
    if isinstance(model, LlamaConfig):
        name, config = "custom", model
    else:
        name, config = model, LlamaConfig.from_name(model)
    setup = Setup(
        config,
        seq_len,
        world,
        batch=batch,
        dtype=dtype,
        optimizer=optimizer,
        device=device,
        zero=zero,
        keep_logits=keep_logits,
    )
    plans = {p: plan_memory(setup, p) for p in policies}
    budget = None if gpu_mem is None else parse_bytes(gpu_mem)
    longest = {} if budget is None else {p: max_seq_len(setup, p, budget) for p in policies}
    return PlanReport(name=name, setup=setup, plans=plans, budget=budget, max_seq_len=longest)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m ringattn.plan",
        description="Per-rank memory of a ring-attention training step, by checkpoint policy.",
    )
    parser.add_argument("--model", choices=sorted(CONFIGS), default="llama3-8b")
    parser.add_argument("--seq-len", type=int, required=True, help="global sequence length S")
    parser.add_argument("--world", type=int, default=1, help="ranks W of the ring")
    parser.add_argument("--gpu-mem", default=None, help="memory per rank, e.g. 80GiB")
    parser.add_argument(
        "--policy", action="append", choices=POLICIES, help="repeat for several; default all"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--device", choices=DEVICES, default="cuda")
    parser.add_argument(
        "--zero", type=int, choices=(0, 1, 2, 3), default=0, help="shard states over W (ZeRO)"
    )
    parser.add_argument(
        "--keep-logits",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the training loop holds the logits through backward (default: yes)",
    )
    args = parser.parse_args(argv)
    try:
        report = plan(
            args.model,
            seq_len=args.seq_len,
            world=args.world,
            gpu_mem=args.gpu_mem,
            policies=args.policy or POLICIES,
            batch=args.batch,
            dtype=args.dtype,
            optimizer=args.optimizer,
            device=args.device,
            zero=args.zero,
            keep_logits=args.keep_logits,
        )
    except ValueError as err:
        parser.error(str(err))
    print(report.table())  # noqa: T201 - the command's output


if __name__ == "__main__":
    main()
