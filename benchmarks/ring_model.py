"""python benchmarks/ring_model.py [--rate cudnn|flash] [--tflops FWD FWDBWD] [--measured JSON]

A MODEL, not a measurement: predicted efficiency of a causal zigzag ring over W GPUs, from a
per-step compute time and an assumed link. Prints a table and writes PNG, JSON and markdown
under `--out` (default benchmarks/results/<date>-ring-model.*).

Per ring step, with n = S/W tokens per rank, batch B, Hq query / Hkv key-value heads, head dim D:

    compute   F_fwd(n) = 4·B·Hq·n²·D · 0.5    zigzag: every rank, every step, half an n x n block
              F_fb(n)  = 3.5 · F_fwd(n)         forward + backward (backward = 2.5 x forward)
              c_fwd = F_fwd / R_fwd(n),  c_bwd = F_fb / R_fb(n) - c_fwd
    messages  M_kv(n)  = 2·B·n·Hkv·D·bytes      K and V shard (bf16: 2 bytes)
              M_dkv(n) = 2·B·n·Hkv·D·4          dK/dV shard, float32
    transfer  x(M) = latency + M / bandwidth    one latency per message; both directions of a
                                                link carry traffic at full rate (full duplex)

A step overlaps its compute with the transfer in flight (double buffering) and takes
max(compute, transfer). Following `ringattn/ring.py`:

    forward   W steps, W-1 K/V hops:   T_fwd = (W-1)·max(c_fwd, x_kv) + c_fwd
    backward  W steps, W-1 K/V hops and W dK/dV hops (each rank's buffer returns home):
              T_bwd = max(c_bwd, x_kv) + (W-2)·max(c_bwd, x_kv + x_dkv) + max(c_bwd, x_dkv) + x_dkv
              (K/V and the dK/dV sent after the previous step share the link in steps 1..W-2;
              the last dK/dV hop has no compute to hide behind)
    efficiency = ideal / predicted = W·c_fwd / T_fwd   and   W·(c_fwd + c_bwd) / (T_fwd + T_bwd)

Communication hides once a steady step is compute-bound: c_fwd(n) >= x_kv(n) for the forward,
c_bwd(n) >= x_kv(n) + x_dkv(n) for the backward. Compute grows as n² and transfers as n, so each
condition holds from one threshold n* upward; `hide_threshold` finds it by bisection on log2 n.

Compute rate R(n): ANCHORS.md's measured H200 causal attention at S = n (B=1, H=32, D=128; a
zigzag step does the work of causal attention over n tokens), linear in log2 n between anchor
points, flat above the largest, extrapolated below the smallest with the slope of the first
interval and floored at 25 % of the S=16384 rate (small blocks fill the GPU badly). `--tflops`
rescales the curve to the given S=16384 rates, `--flat-rate` drops the curve, and `--measured`
uses the per-step times `benchmarks/gpu_ring.py` wrote (rate interpolated the same way between
measured sizes, flat outside them; those times include the per-step merge and gradient sums, so
the ideal is then the ring's own compute). Not modelled: SMs that a communication library takes
from the kernel, congestion, and (with anchor rates) the per-step merge work, which gpu_ring.py
measures on one GPU.

Links: NVLink 4 (H100/H200 SXM) 450 GB/s per direction, 10 us per message; InfiniBand NDR,
400 Gb/s = 50 GB/s per GPU, 20 us per message. A ring that spans nodes runs at its slowest hop,
so the IB rows apply to every W larger than the GPUs of one node (8).
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

# Measured on one H200 (ANCHORS.md): causal attention TFLOP/s (fwd, fwd+bwd) by sequence length.
ANCHOR_RATES = {
    "flash": {4096: (253.0, 228.0), 16384: (338.0, 312.0), 65536: (343.0, 324.0)},
    "cudnn": {4096: (442.0, 402.0), 16384: (623.0, 521.0), 65536: (606.0, 551.0)},
}
REF_TOKENS = 16384  # `--tflops` gives the rate at this size
FLOOR = 0.25  # extrapolated rates stay >= this fraction of the REF_TOKENS rate
WORLDS = (8, 16, 32, 64)
TOKENS = tuple(2**p for p in range(11, 18))  # 2k ... 128k tokens per rank
TARGET = 0.95
# Published (ring-flash-attention README, not measured here): zigzag ring, 8 x H800, 8k tokens
# per GPU, Llama-3.1-8B attention (32 q / 8 kv heads, D=128), bf16, vs flash-attn on 8k per GPU.
PUBLISHED = {"world": 8, "tokens_per_rank": 8192, "fwd": 0.852, "fwdbwd": 0.902}
H800_NVLINK = 200e9  # H800 NVLink: 400 GB/s in total, 200 GB/s per direction


@dataclass(frozen=True)
class Shape:
    batch: int = 1
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    elem_bytes: int = 2  # bf16


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes/s per direction
    latency: float  # s per message


LINKS = (Link("NVLink", 450e9, 10e-6), Link("IB", 50e9, 20e-6))


class Rate:
    """TFLOP/s (fwd, fwd+bwd) as a function of tokens per rank: piecewise linear in log2 n."""

    def __init__(self, points: dict[int, tuple[float, float]], *, extrapolate: bool = True):
        self.points = sorted(points.items())
        self.extrapolate = extrapolate and len(self.points) > 1
        ref = points.get(REF_TOKENS, self.points[-1][1])
        self.floor = tuple(FLOOR * r for r in ref)

    def __call__(self, n: float) -> tuple[float, float]:
        sizes = [size for size, _ in self.points]
        if n >= sizes[-1] or len(sizes) == 1:
            return self.points[-1][1]
        if n <= sizes[0] and not self.extrapolate:
            return self.points[0][1]
        i = min(max(bisect.bisect_left(sizes, n) - 1, 0), len(sizes) - 2)  # interval holding n
        (na, ra), (nb, rb) = self.points[i], self.points[i + 1]
        t = (math.log2(n) - math.log2(na)) / (math.log2(nb) - math.log2(na))
        return tuple(max(f, a + t * (b - a)) for a, b, f in zip(ra, rb, self.floor, strict=True))


def anchor_rate(kernel: str, tflops: tuple[float, float] | None = None, flat: bool = False) -> Rate:
    points = ANCHOR_RATES[kernel]
    if tflops is not None:
        ref = points[REF_TOKENS]
        points = {
            n: (r[0] * tflops[0] / ref[0], r[1] * tflops[1] / ref[1]) for n, r in points.items()
        }
    return Rate({REF_TOKENS: points[REF_TOKENS]} if flat else points)


def measured_rate(path: str | Path) -> Rate:
    """Rates from gpu_ring.py's per-step times: {"batch", "q_heads", "head_dim", "steps": [
    {"tokens_per_rank", "fwd_s", "fwdbwd_s"}, ...]} (a step = half an n x n block)."""
    data = json.loads(Path(path).read_text())
    shape = Shape(data["batch"], data["q_heads"], data["q_heads"], data["head_dim"])
    points = {}
    for row in data["steps"]:
        fwd, fb = step_flops(row["tokens_per_rank"], shape)
        points[row["tokens_per_rank"]] = (fwd / row["fwd_s"] / 1e12, fb / row["fwdbwd_s"] / 1e12)
    return Rate(points, extrapolate=False)


def step_flops(n: float, shape: Shape) -> tuple[float, float]:
    """FLOPs of one zigzag ring step on one rank: (forward, forward + backward)."""
    fwd = 4 * shape.batch * shape.q_heads * n * n * shape.head_dim * 0.5
    return fwd, 3.5 * fwd


def message_bytes(n: float, shape: Shape) -> tuple[float, float]:
    """(K/V shard in the input dtype, dK/dV shard in float32) sent per hop."""
    elems = 2 * shape.batch * n * shape.kv_heads * shape.head_dim
    return elems * shape.elem_bytes, elems * 4


def transfer_time(nbytes: float, link: Link) -> float:
    return link.latency + nbytes / link.bandwidth


def step_times(n: float, shape: Shape, link: Link, rate: Rate) -> dict[str, float]:
    """Per-step compute (c_fwd, c_bwd) and transfer (x_kv, x_dkv) times in seconds."""
    f_fwd, f_fb = step_flops(n, shape)
    r_fwd, r_fb = rate(n)
    c_fwd = f_fwd / (r_fwd * 1e12)
    m_kv, m_dkv = message_bytes(n, shape)
    return {
        "c_fwd": c_fwd,
        "c_bwd": f_fb / (r_fb * 1e12) - c_fwd,
        "x_kv": transfer_time(m_kv, link),
        "x_dkv": transfer_time(m_dkv, link),
    }


def forward_time(world: int, c_fwd: float, x_kv: float) -> float:
    return (world - 1) * max(c_fwd, x_kv) + c_fwd


def backward_time(world: int, c_bwd: float, x_kv: float, x_dkv: float) -> float:
    if world == 1:
        return c_bwd
    middle = (world - 2) * max(c_bwd, x_kv + x_dkv)
    return max(c_bwd, x_kv) + middle + max(c_bwd, x_dkv) + x_dkv


def efficiency(world: int, t: dict[str, float]) -> tuple[float, float]:
    """(forward, forward + backward) ideal / predicted time."""
    t_fwd = forward_time(world, t["c_fwd"], t["x_kv"])
    t_bwd = backward_time(world, t["c_bwd"], t["x_kv"], t["x_dkv"])
    ideal_fwd = world * t["c_fwd"]
    return ideal_fwd / t_fwd, (ideal_fwd + world * t["c_bwd"]) / (t_fwd + t_bwd)


def hide_threshold(shape: Shape, link: Link, rate: Rate, which: str) -> float:
    """Smallest tokens per rank at which a steady step's compute covers its transfers.

    which: "fwd" (c_fwd >= x_kv) or "bwd" (c_bwd >= x_kv + x_dkv). Bisection on log2 n over
    [2^6, 2^26]; the slack compute - transfer grows with n (n² against n)."""

    def slack(log_n: float) -> float:
        t = step_times(2**log_n, shape, link, rate)
        if which == "fwd":
            return t["c_fwd"] - t["x_kv"]
        return t["c_bwd"] - t["x_kv"] - t["x_dkv"]

    lo, hi = 6.0, 26.0
    if slack(lo) >= 0:
        return 2**lo
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if slack(mid) >= 0 else (mid, hi)
    return 2**hi


def predict(shape: Shape, link: Link, rate: Rate, worlds=WORLDS, tokens=TOKENS) -> list[dict]:
    rows = []
    for world in worlds:
        for n in tokens:
            t = step_times(n, shape, link, rate)
            fwd, fb = efficiency(world, t)
            m_kv, m_dkv = message_bytes(n, shape)
            rows.append(
                {"link": link.name, "kv_heads": shape.kv_heads, "world": world,
                 "tokens_per_rank": n, "kv_bytes": m_kv, "dkv_bytes": m_dkv, **t,
                 "eff_fwd": fwd, "eff_fwdbwd": fb}
            )  # fmt: skip
    return rows


def _fmt_tokens(n: float) -> str:
    return f"{n / 1024:.0f}k" if n >= 1024 else f"{n:.0f}"


def table(rows: list[dict], tokens=TOKENS) -> list[str]:
    head = "| link   | Hkv | W  | " + " | ".join(f"{_fmt_tokens(n):>11}" for n in tokens) + " |"
    lines = [head, "|" + "|".join("---" for _ in range(3 + len(tokens))) + "|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["link"], r["kv_heads"], r["world"]), []).append(r)
    for (link, hkv, world), rs in groups.items():
        cells = " | ".join(f"{100 * r['eff_fwd']:5.1f}/{100 * r['eff_fwdbwd']:5.1f}" for r in rs)
        lines.append(f"| {link:<6} | {hkv:>3} | {world:>2} | {cells} |")
    return lines


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted(
        {(r["link"], r["kv_heads"]) for r in rows}, key=lambda p: (p[0] != "NVLink", p[1])
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), sharey=True)
    for ax, (link, hkv) in zip(axes, panels, strict=True):
        for world in WORLDS:
            rs = [r for r in rows if (r["link"], r["kv_heads"], r["world"]) == (link, hkv, world)]
            ns = [r["tokens_per_rank"] for r in rs]
            line = ax.plot(ns, [100 * r["eff_fwdbwd"] for r in rs], marker="o", label=f"W={world}")
            ax.plot(ns, [100 * r["eff_fwd"] for r in rs], ls="--", color=line[0].get_color())
        ax.axhline(100 * TARGET, color="k", lw=0.8, ls=":", label="target 95 %")
        if link == "NVLink" and hkv == 8:
            ax.scatter(
                [PUBLISHED["tokens_per_rank"]],
                [100 * PUBLISHED["fwdbwd"]],
                marker="*",
                s=120,
                color="red",
                zorder=5,
                label="published 8xH800 (measured)",
            )
        ax.set_xscale("log", base=2)
        ax.set_title(f"{link}, Hkv={hkv}")
        ax.set_xlabel("tokens per rank")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("efficiency % (solid fwd+bwd, dashed fwd)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def first_reaching(rows: list[dict], goal: float = TARGET) -> dict[tuple, int | None]:
    """Smallest tokens per rank in the grid whose fwd+bwd efficiency reaches `goal`, per
    (link, Hkv, W)."""
    best: dict[tuple, int | None] = {}
    for r in rows:
        key = (r["link"], r["kv_heads"], r["world"])
        best.setdefault(key, None)
        if r["eff_fwdbwd"] >= goal and best[key] is None:
            best[key] = r["tokens_per_rank"]
    return best


def report(rows, thresholds, anchor, title, rate) -> list[str]:
    rates = ", ".join(f"{_fmt_tokens(n)}: {f:.0f}/{fb:.0f}" for n in TOKENS for f, fb in [rate(n)])
    lines = [f"# {title}", "", f"compute rate TFLOP/s fwd/fwd+bwd by tokens per rank: {rates}", ""]
    lines += ["cells: predicted efficiency % forward / forward+backward", ""] + table(rows)
    reach = first_reaching(rows)
    head = " | ".join(f">= 95 % fwd+bwd at W={w}" for w in WORLDS)
    lines += ["", f"| link | Hkv | comm hides (fwd) from | comm hides (bwd) from | {head} |"]
    lines += ["|" + "---|" * (4 + len(WORLDS))]
    for t in thresholds:
        cells = " | ".join(
            _fmt_tokens(n) if (n := reach[(t["link"], t["kv_heads"], w)]) else "-" for w in WORLDS
        )
        lines.append(
            f"| {t['link']} | {t['kv_heads']} | {t['fwd']:.0f} tokens/rank "
            f"| {t['bwd']:.0f} tokens/rank | {cells} |"
        )
    lines += [
        "",
        f"Published anchor (measured by ring-flash-attention, 8xH800, 8k tokens/GPU, FA2): "
        f"{100 * PUBLISHED['fwd']:.1f} % fwd, {100 * PUBLISHED['fwdbwd']:.1f} % fwd+bwd.",
        f"This model under the anchor's conditions (W=8, 8k tokens/rank, Hkv=8, FA2-class rate, "
        f"200 GB/s per direction): {100 * anchor[0]:.1f} % fwd, {100 * anchor[1]:.1f} % "
        "fwd+bwd. The model counts communication only, so the anchor's gap is per-step work "
        "outside it (merging, block kernels on n/2-sized pieces, launches).",
        "IB rows: a ring whose slowest hop is IB (rings across nodes; with 8 GPUs per node, every "
        "W > 8). W=8 on IB is hypothetical (one GPU per node).",
        f"Target: >= {100 * TARGET:.0f} % fwd+bwd. Model predictions, not measurements.",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--rate",
        choices=sorted(ANCHOR_RATES),
        default="cudnn",
        help="anchor curve: cudnn (fastest kernel measured: hardest to hide) or flash",
    )
    p.add_argument(
        "--tflops",
        type=float,
        nargs=2,
        metavar=("FWD", "FWDBWD"),
        help=f"rates at {REF_TOKENS} tokens; the anchor curve is rescaled to them",
    )
    p.add_argument("--flat-rate", action="store_true", help="one rate at every size (no curve)")
    p.add_argument("--measured", help="per-step times JSON written by benchmarks/gpu_ring.py")
    p.add_argument(
        "--out",
        default=f"benchmarks/results/{datetime.date.today()}-ring-model",
        help="output path prefix (.json, .md, .png)",
    )
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)  # fmt: skip
    if args.measured:
        rate, source = measured_rate(args.measured), f"measured per-step times ({args.measured})"
    else:
        rate = anchor_rate(args.rate, args.tflops, args.flat_rate)
        source = f"{args.rate} anchor curve" + (
            f" rescaled to {args.tflops}" if args.tflops else ""
        )
        source += " (flat)" if args.flat_rate else ""

    rows, thresholds = [], []
    for hkv in (8, 32):
        shape = Shape(kv_heads=hkv)
        for link in LINKS:
            rows += predict(shape, link, rate)
            fwd, bwd = (hide_threshold(shape, link, rate, w) for w in ("fwd", "bwd"))
            thresholds.append({"link": link.name, "kv_heads": hkv, "fwd": fwd, "bwd": bwd})
    anchor_link = Link("H800 NVLink", H800_NVLINK, 10e-6)
    anchor = efficiency(8, step_times(8192, Shape(), anchor_link, anchor_rate("flash")))
    title = (
        "MODEL PREDICTION (not measured): causal zigzag ring efficiency, B=1 Hq=32 D=128 bf16; "
        f"compute: {source}"
    )
    lines = report(rows, thresholds, anchor, title, rate)
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    result = {
        "kind": "model prediction, not a measurement", "compute": source,
        "rate_tflops": {str(n): rate(n) for n in TOKENS},
        "links": [asdict(link) for link in LINKS], "shape": asdict(Shape()), "rows": rows,
        "hide_thresholds_tokens_per_rank": thresholds,
        "first_tokens_reaching_target": [
            {"link": k[0], "kv_heads": k[1], "world": k[2], "tokens_per_rank": n}
            for k, n in first_reaching(rows).items()
        ],
        "published_anchor": PUBLISHED, "model_at_anchor": {"fwd": anchor[0], "fwdbwd": anchor[1]},
        "target": TARGET,
    }  # fmt: skip
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_plot:
        plot(rows, Path(f"{args.out}.png"), title)


if __name__ == "__main__":
    main()
