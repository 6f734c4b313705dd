"""torchrun --standalone --nproc_per_node 4 launch/selftest.py

Multi-node (the same command on every node; HOST is the first node's address):

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        --rdzv_id ringattn-selftest launch/selftest.py

The distributed correctness suite for a real cluster. On the devices present (NCCL when every
local rank has a GPU of its own, else gloo on CPU) it checks, against references that every rank
computes locally from inputs that every rank draws from the same seed:

- flash_attn forward + backward (GQA/MQA, odd lengths, Sq != Sk, causal or not) vs float64;
- ring_attention forward + backward, every layout x causal/not, GQA, vs float64 full attention
  (sequence length a multiple of 2W for the world size at hand);
- the layouts: shard/gather round trip, global positions, the error on an indivisible length;
- a tiny Llama made sequence-parallel vs the same model in one process: logits, loss, grads.

float32 on CPU, bfloat16 and float16 on GPU. float32 must be within an absolute bound of the
float64 reference; fp16/bf16 within 2 x the error of the same naive computation in that dtype,
plus a floor (the policy of tests/_reference.py). Each check runs on every rank inside a guard;
the ranks all-reduce its failure flags and errors, so all agree on the verdict. Rank 0 prints a
PASS/FAIL table; the exit status is 1 when any check failed on any rank.

Options: --quick (a smaller set), --device auto|cpu|cuda, --dtypes, --seed, --timeout, and
--inject-failure: a self-check of the suite, the last rank perturbs the output of one ring check,
which must then show FAIL on that rank and make the run exit 1.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

import ringattn
from ringattn.kernels.attention.naive import naive_attention
from ringattn.layout import required_multiple
from ringattn.models import Llama, LlamaConfig, causal_lm_loss, shift_labels
from ringattn.parallel import allreduce_gradients, parallelize, sequence_parallel_loss, shard_batch
from ringattn.runtime import init_distributed

# dtype -> absolute bound (float32) or the floor added to 2 x naive low-precision error.
TOLERANCE = {
    # fp32 block-wise accumulation over a few hundred keys of unit-scale values: ~1e-6 rounding.
    torch.float32: 2e-5,
    # fp16 inputs, fp32 accumulation: only the final cast to fp16 is lossy; 1 fp16 ulp at 1.
    torch.float16: 1e-3,
    # bf16 keeps 8 mantissa bits: 1 bf16 ulp at magnitude 1.
    torch.bfloat16: 8e-3,
}
# Sequence-parallel vs single-process tiny Llama in fp32: the same math in another summation
# order. CPU agrees to a few ulps of the O(1) activations; on GPU the matmuls of S/W and S rows
# may pick different cuBLAS kernels (split-K), worth a few more ulps.
MODEL_TOLERANCE = {"cpu": 1e-5, "cuda": 1e-4}
QUANTITIES = ("out", "lse", "dq", "dk", "dv")  # what flash and ring checks compare
LAYOUT_QUANTITIES = ("roundtrip", "holds", "increasing", "tiling", "indivisible")
MODEL_QUANTITIES = ("logits", "loss", "grads")


@dataclass(frozen=True)
class Context:
    rank: int
    world: int
    device: torch.device
    seed: int


@dataclass(frozen=True)
class Check:
    name: str
    quantities: tuple[str, ...]  # the names of the rows `fn` returns, in order
    fn: Callable[[], list[tuple[str, float, float]]]  # -> [(quantity, error, tolerance)]


@dataclass
class Verdict:
    name: str
    failed_ranks: list[int]
    err: float
    tol: float
    worst: str  # the quantity with the largest error relative to its tolerance
    seconds: float


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller set of checks")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated dtypes of the flash and ring checks "
        "(default: float32 on CPU, bfloat16,float16 on GPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds before a stuck collective fails"
    )
    p.add_argument(
        "--inject-failure",
        action="store_true",
        help="self-check of the suite: the last rank perturbs one ring output (must FAIL)",
    )
    return p.parse_args()


# ---------------------------------------------------------------------------- errors, bounds


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |actual - expected| on the CPU in float64; matching infinities (-inf lse rows) agree."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    if not torch.equal(torch.isinf(a), torch.isinf(e)):
        return math.inf
    diff = torch.where(torch.isinf(a) & (a == e), 0.0, a - e).abs()
    return float(diff.max()) if diff.numel() else 0.0


def reference(q, k, v, do, *, scale, offset, dtype=torch.float64, device="cpu"):
    """Naive attention in `dtype` with autograd: [out, lse, dq, dk, dv]."""
    q, k, v = (t.to(device, dtype).requires_grad_() for t in (q, k, v))
    out, lse = naive_attention(q, k, v, scale=scale, offset=offset, dtype=dtype)
    out.backward(do.to(device, dtype))
    return [out.detach(), lse.detach(), q.grad, k.grad, v.grad]


def bounded(
    got: list[torch.Tensor], ref: list[torch.Tensor], dtype: torch.dtype, naive_errs
) -> list[tuple[str, float, float]]:
    """(quantity, error, tolerance) per quantity; `naive_errs` only for fp16/bf16."""
    rows = []
    for i, (name, g, r) in enumerate(zip(QUANTITIES, got, ref, strict=True)):
        tol = TOLERANCE[dtype] + (0.0 if dtype == torch.float32 else 2 * naive_errs[i])
        rows.append((name, max_err(g, r), tol))
    return rows


def naive_errors(q, k, v, do, ref, *, scale, offset, dtype, device) -> list[float] | None:
    """Error of the naive computation in a low-precision `dtype` vs float64 (None for fp32)."""
    if dtype == torch.float32:
        return None
    naive = reference(q, k, v, do, scale=scale, offset=offset, dtype=dtype, device=device)
    return [max_err(n, r) for n, r in zip(naive, ref, strict=True)]


def draw(seed: int, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """Standard normal float32 tensors, identical on every rank for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for shape in shapes]


# ---------------------------------------------------------------------------- checks


def check_flash(ctx: Context, *, b, sq, sk, hq, hkv, d, causal, dtype):
    q, k, v, do = draw(ctx.seed, (b, sq, hq, d), (b, sk, hkv, d), (b, sk, hkv, d), (b, sq, hq, d))
    scale, offset = d**-0.5, (sk - sq if causal else None)
    ref = reference(q, k, v, do, scale=scale, offset=offset)
    x = [t.to(ctx.device, dtype).requires_grad_() for t in (q, k, v)]
    out, lse = ringattn.flash_attn(*x, causal=causal, return_lse=True)
    out.backward(do.to(ctx.device, dtype))
    naive = naive_errors(
        q, k, v, do, ref, scale=scale, offset=offset, dtype=dtype, device=ctx.device
    )
    return bounded([out, lse, *(t.grad for t in x)], ref, dtype, naive)


def check_ring(ctx: Context, *, layout, causal, hq, hkv, d, chunk, dtype, inject=False):
    s = 2 * ctx.world * chunk  # splits for every layout
    q, k, v, do = draw(ctx.seed, (2, s, hq, d), (2, s, hkv, d), (2, s, hkv, d), (2, s, hq, d))
    scale, offset = d**-0.5, (0 if causal else None)
    ref = reference(q, k, v, do, scale=scale, offset=offset)

    def shard(t, dim=1):
        return ringattn.shard_sequence(t, dim=dim, layout=layout)

    x = [shard(t).to(ctx.device, dtype).requires_grad_() for t in (q, k, v)]
    out, lse = ringattn.ring_attention(*x, causal=causal, layout=layout, return_lse=True)
    out.backward(shard(do).to(ctx.device, dtype))
    if inject:
        out = out.detach() + 0.1
    naive = naive_errors(
        q, k, v, do, ref, scale=scale, offset=offset, dtype=dtype, device=ctx.device
    )
    local_ref = [shard(ref[0]), shard(ref[1], dim=2), *(shard(g) for g in ref[2:])]
    return bounded([out, lse, *(t.grad for t in x)], local_ref, dtype, naive)


def check_layout(ctx: Context, *, layout, chunk):
    s = 2 * ctx.world * chunk
    (x,) = draw(ctx.seed, (2, s, 3, 5))
    local = ringattn.shard_sequence(x.to(ctx.device), layout=layout)
    roundtrip = max_err(ringattn.gather_sequence(local, layout=layout), x)
    pos = ringattn.sequence_positions(s, layout=layout)
    # The shard holds exactly the tokens at `pos`, in increasing order, and the shards of all
    # ranks tile 0..S-1: gathering the positions gives arange(S).
    holds = max_err(local, x[:, pos])
    increasing = int((pos.diff() <= 0).sum())
    gathered = ringattn.gather_sequence(pos.to(ctx.device)[None], layout=layout)[0].cpu()
    misplaced = int((gathered != torch.arange(s)).sum())
    # A length the layout cannot split raises a ValueError naming the required multiple.
    multiple = required_multiple(layout, ctx.world)
    bad = s + 1
    try:
        ringattn.shard_sequence(x[:, :1].expand(2, bad, 3, 5), layout=layout)
        raised = bad % multiple == 0
    except ValueError as err:
        raised = f"multiple of {multiple}" in str(err)
    errors = (roundtrip, holds, float(increasing), float(misplaced), 0.0 if raised else 1.0)
    return [(name, err, 0.0) for name, err in zip(LAYOUT_QUANTITIES, errors, strict=True)]


def check_model(ctx: Context, *, layout, chunk):
    s = 2 * ctx.world * chunk
    ids = torch.randint(0, 256, (2, s), generator=torch.Generator().manual_seed(ctx.seed))
    labels = shift_labels(ids)
    labels[0, 3] = -100  # an ignored token somewhere
    ids, labels = ids.to(ctx.device), labels.to(ctx.device)
    torch.manual_seed(ctx.seed)  # same weights on every rank
    ref_model = Llama(config=LlamaConfig.from_name("tiny")).to(ctx.device)
    model = parallelize(copy.deepcopy(ref_model), layout=layout)

    ref_logits = ref_model(ids)
    ref_loss = causal_lm_loss(ref_logits, labels)
    ref_loss.backward()
    batch = shard_batch(ids, labels=labels, layout=layout)
    logits = model(batch["input_ids"], position_ids=batch["position_ids"])
    loss = sequence_parallel_loss(logits, batch["labels"])
    loss.backward()
    allreduce_gradients(model)

    tol = MODEL_TOLERANCE[ctx.device.type]
    full_logits = ringattn.gather_sequence(logits.detach(), layout=layout)
    grad_err = max(
        max_err(p.grad, r.grad)
        for p, r in zip(model.parameters(), ref_model.parameters(), strict=True)
    )
    errors = (max_err(full_logits, ref_logits), max_err(loss, ref_loss), grad_err)
    return [(name, err, tol) for name, err in zip(MODEL_QUANTITIES, errors, strict=True)]


def build_checks(
    ctx: Context, *, dtypes: list[torch.dtype], quick: bool, inject: bool
) -> list[Check]:
    """The checks, the same on every rank. `inject`: perturb one ring output."""
    flash_shapes = [  # (B, Sq, Sk, Hq, Hkv, D, causal)
        (2, 97, 97, 4, 2, 59, True),
        (2, 97, 97, 4, 2, 59, False),
        (1, 70, 33, 2, 2, 32, True),  # Sq > Sk: the first 37 rows see no key
    ]
    if not quick:
        flash_shapes += [
            (1, 33, 300, 4, 1, 64, True),  # MQA, bottom-right diagonal over two key tiles
            (2, 1, 129, 8, 2, 128, False),  # a decode-like single query
            (1, 257, 257, 2, 1, 80, True),  # crosses a 256-row tile
        ]
    checks = []
    for dtype in dtypes:
        dt = str(dtype).removeprefix("torch.")
        for b, sq, sk, hq, hkv, d, causal in flash_shapes:
            name = f"flash B{b}-Sq{sq}-Sk{sk}-H{hq}/{hkv}-D{d}{' causal' if causal else ''} {dt}"
            fn = partial(check_flash, b=b, sq=sq, sk=sk, hq=hq, hkv=hkv, d=d, causal=causal)
            checks.append(Check(name, QUANTITIES, partial(fn, ctx, dtype=dtype)))

    # Odd chunks, S = 2W * chunk; at large W shorter chunks keep the float64 reference small.
    chunk = max(1, min(13 if quick else 37, 640 // (2 * ctx.world)) | 1)
    s = 2 * ctx.world * chunk
    ring_configs = [  # (layout, causal, Hq, Hkv)
        (layout, causal, 4, 2) for layout in ringattn.LAYOUTS for causal in (True, False)
    ]
    if not quick:
        ring_configs += [("zigzag", True, 4, 1), ("zigzag", True, 3, 3)]  # MQA, MHA
    for dtype in dtypes[:1] if quick else dtypes:
        dt = str(dtype).removeprefix("torch.")
        for layout, causal, hq, hkv in ring_configs:
            name = f"ring {layout}{' causal' if causal else ''} S{s}-H{hq}/{hkv}-D40 {dt}"
            fn = partial(check_ring, ctx, layout=layout, causal=causal, hq=hq, hkv=hkv, d=40)
            fn = partial(fn, chunk=chunk, dtype=dtype, inject=inject)
            checks.append(Check(name, QUANTITIES, fn))
            inject = False  # perturb the first ring check only

    for layout in ringattn.LAYOUTS:
        name = f"layout {layout} S{2 * ctx.world * 6}"
        fn = partial(check_layout, ctx, layout=layout, chunk=6)
        checks.append(Check(name, LAYOUT_QUANTITIES, fn))
    for layout in ("zigzag",) if quick else ringattn.LAYOUTS:
        name = f"model tiny Llama {layout} S{2 * ctx.world * 8} fp32"
        fn = partial(check_model, ctx, layout=layout, chunk=8)
        checks.append(Check(name, MODEL_QUANTITIES, fn))
    return checks


# ---------------------------------------------------------------------------- running


def _badness(err: float, tol: float) -> float:
    """err / tol; NaN anywhere is worst, and with tol 0 any error is."""
    if math.isnan(err) or math.isnan(tol):
        return math.inf
    return err / tol if tol > 0 else (0.0 if err == 0 else math.inf)


def run_check(ctx: Context, check: Check) -> Verdict:
    """Run one check on this rank, then agree with every rank on its verdict."""
    t0 = time.perf_counter()
    try:
        rows = check.fn()
        assert [q for q, _, _ in rows] == list(check.quantities), rows
        worst = max(range(len(rows)), key=lambda i: _badness(*rows[i][1:]))
        failed = any(not e <= t for _, e, t in rows)  # NaN fails
        _, err, tol = rows[worst]
        if failed:
            detail = ", ".join(f"{q} {e:.2e} (tol {t:.1e})" for q, e, t in rows)
            print(f"[rank {ctx.rank}] FAIL {check.name}: {detail}", file=sys.stderr, flush=True)
    except Exception:  # noqa: BLE001 - a raising check is a failed check, reported by its rank
        trace = traceback.format_exc()
        print(f"[rank {ctx.rank}] FAIL {check.name} raised:\n{trace}", file=sys.stderr, flush=True)
        failed, err, tol, worst = True, math.nan, math.nan, -1
    seconds = time.perf_counter() - t0

    # Slots per rank: [failed | err | tol | worst index | seconds]; SUM puts each rank's in place.
    w, r = ctx.world, ctx.rank
    vec = torch.zeros(5, w, dtype=torch.float64, device=ctx.device)
    vec[:, r] = torch.tensor([float(failed), err, tol, float(worst), seconds], dtype=torch.float64)
    dist.all_reduce(vec)
    vec = vec.cpu().tolist()
    i = max(range(w), key=lambda j: _badness(vec[1][j], vec[2][j]))  # the worst rank
    return Verdict(
        name=check.name,
        failed_ranks=[j for j in range(w) if vec[0][j] > 0],
        err=vec[1][i],
        tol=vec[2][i],
        worst=check.quantities[int(vec[3][i])] if vec[3][i] >= 0 else "raised",
        seconds=max(vec[4]),
    )


def print_table(verdicts: list[Verdict], *, world: int, header: str) -> None:
    width = max(len(v.name) for v in verdicts)
    print(header)
    print(
        f"| {'check':<{width}} | {'ranks':<14} | {'worst':<11} | {'max error':>9} "
        f"| {'tolerance':>9} | {'s':>5} | verdict |"
    )
    print(f"|{'-' * (width + 2)}|{'-' * 16}|{'-' * 13}|{'-' * 11}|{'-' * 11}|{'-' * 7}|---------|")
    for v in verdicts:
        ranks = (
            f"{world}/{world} ok"
            if not v.failed_ranks
            else ("failed on " + ",".join(map(str, v.failed_ranks)))
        )
        verdict = "FAIL" if v.failed_ranks else "PASS"
        print(
            f"| {v.name:<{width}} | {ranks:<14} | {v.worst:<11} | {v.err:>9.2e} "
            f"| {v.tol:>9.1e} | {v.seconds:>5.1f} | {verdict:<7} |"
        )
    n_failed = sum(bool(v.failed_ranks) for v in verdicts)
    if n_failed:
        print(f"FAILED: {n_failed} of {len(verdicts)} checks")
    else:
        print(f"PASSED: all {len(verdicts)} checks on {world} ranks")


def setup(args: argparse.Namespace) -> Context:
    os.environ.setdefault("RINGATTN_COMM_TIMEOUT", str(args.timeout))
    try:
        device = init_distributed(device=args.device, timeout_s=args.timeout)
    except ValueError as err:
        raise SystemExit(f"--device {args.device}: {err}") from err
    return Context(dist.get_rank(), dist.get_world_size(), device, args.seed)


def main() -> int:
    args = parse_args()
    ctx = setup(args)
    try:
        inject = args.inject_failure and ctx.rank == ctx.world - 1
        if args.dtypes:
            names = {str(dtype).removeprefix("torch."): dtype for dtype in TOLERANCE}
            unknown = set(args.dtypes.split(",")) - set(names)
            if unknown:
                raise SystemExit(f"--dtypes: unknown {sorted(unknown)}; choose from {list(names)}")
            dtypes = [names[name] for name in args.dtypes.split(",")]
        elif ctx.device.type == "cuda":
            dtypes = [torch.bfloat16, torch.float16]
        else:
            dtypes = [torch.float32]
        checks = build_checks(ctx, dtypes=dtypes, quick=args.quick, inject=inject)
        t0 = time.perf_counter()
        verdicts = [run_check(ctx, check) for check in checks]
        if ctx.rank == 0:
            backend = dist.get_backend()
            where = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
            header = (
                f"ringattn selftest: {ctx.world} ranks ({backend}, {where}), torch "
                f"{torch.__version__}, seed {args.seed}{', quick' if args.quick else ''}"
                f"{', INJECTED FAILURE' if args.inject_failure else ''}, "
                f"{time.perf_counter() - t0:.1f} s"
            )
            print_table(verdicts, world=ctx.world, header=header)
            sys.stdout.flush()
        return 1 if any(v.failed_ranks for v in verdicts) else 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
