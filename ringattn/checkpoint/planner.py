"""Predict the per-rank peak memory of one training step of `ringattn.models.Llama` under ring
attention, for each activation checkpointing policy, by enumerating the tensors that exist at
each moment of the step.

Notation (everything per rank). A rank holds n = S/W tokens of each of the B sequences,
T = B·n tokens in all. e = bytes of an activation element (2 for bf16/fp16, 4 for fp32); p =
bytes of a weight and of its gradient (the same dtype). d = dim, Hq / Hkv query / key-value
heads, D = head_dim, F = ffn_dim, V = vocab_size, L = n_layers, N = parameters,
kv = 2·Hkv·D (the elements of one token's K and V, which travel the ring stacked together).

What autograd saves, per token, in one block when nothing is checkpointed (`none`):

    RMSNorm (x2)   4d + 4 + 2·e·d  the float32 input (in fp32 that is the input itself), the
                                   rsqrt [T, 1], the normalized x and the weighted output
    q, k, v        e·(Hq + 2·Hkv)·D  after RoPE (saved by the ring); pre-RoPE q, k are freed
    RoPE cos, sin  4·D             [T, D/2] float32 each, shared by q and k
    ring out, lse  e·Hq·D + 4·Hq    the attention output (also wo's input) and its lse
    SwiGLU         4·e·F           w1 x, silu(w1 x), w3 x and their product

    a_none = 2·(4d + 4 + 2·e·d) + e·(2·Hq + 2·Hkv)·D + 4·D + 4·Hq + 4·e·F

Checkpointed policies keep per block: `full` the block input, e·d; `selective` the block input
plus the ring's cached (out, lse), e·d + e·Hq·D + 4·Hq; `offload` nothing on the device and the
input, e·d, in host memory. Around the blocks: the embedding output is block 0's input, the
final RMSNorm saves 4d + 4 + 2·e·d, and the loss makes float32 logits [T, V] and saves the
cross-entropy's log-softmax [T, V]. The logits (4·V) stay through backward and the optimizer
step when the caller holds them (`Setup.keep_logits`).

Moments whose totals the planner compares (the peak is the largest); "logits" below includes
the held logits where `keep_logits`:

    forward, last ring     (L-1) blocks saved + the last block's tensors so far + ring forward
    forward end            L blocks saved + final norm + logits + log-softmax (8·V)
    backward, loss         L blocks saved + final norm + log-softmax and its two gradients
                           (12·V) + logits
    backward, layer i MLP  i blocks saved + block i live (its saved or recomputed tensors)
                           + e·d + 2·e·F activation gradients + logits
    backward, layer i ring i blocks saved + block i's attention half + e·d + e·Hq·D
                           activation gradients + ring backward buffers + attention workspace
                           + logits
    backward, layer i      full / offload only: block i recomputing up to its ring forward
      recompute ring       + the ring forward's buffers and workspace + logits
    optimizer step         weights + gradients + optimizer state + one fp32 parameter-sized
                           temporary (foreach AdamW's sqrt of the second moment) + logits

Block i's own tensors during its backward: `none` its saved a_none; `full` and `selective`
a_none recomputed beside the kept input (in fp32 the norm's float32 input is that input, so it
counts once: a_none + e·d - [e = 4]·e·d); `offload` the same plus the block output (its inner
backward starts from it) and, for i > 0, the prefetched input of block i - 1. At the ring
moment the MLP half (4·e·F and ffn_norm's 4d + 4 + 2·e·d) has been released.

Gradients appear layer by layer in backward (the LM head's first, then blocks L-1 .. i + 1,
then block i's w2 at the MLP moment and its MLP, ffn_norm and wo at the ring moment); weights
and optimizer state (AdamW: two fp32 moments, SGD: one; fp32 master weights when p < 4) are
there throughout. With `zero` >= 1/2/3 the optimizer state / gradients / weights are sharded
over the W ranks (ZeRO / FSDP); a block's unsharded gradients (zero >= 2) and two blocks'
gathered weights (zero 3) are added back as working copies.

Ring buffers (`ringattn/ring.py`) and the attention workspace (`kernels/attention`) are in
`ring_forward`, `ring_backward`. `device="cpu"` models the torch kernels (float32 tiles of
BLOCK_M x BLOCK_N scores) and counts offloaded host copies as device memory, since they share
it; `device="cuda"` models the Triton kernels, whose tiles live in on-chip memory.

Not modelled: the CUDA caching allocator's fragmentation and reserve, the CUDA context, NCCL
buffers, gloo staging copies, temporaries inside single kernels (matmul's broadcast copies),
element-wise temporaries of RMSNorm and RoPE, and activation memory of ops not in the Llama
block (dropout, biases).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ringattn.checkpoint.policies import POLICIES
from ringattn.kernels.attention.torch_impl import BLOCK_M, BLOCK_N
from ringattn.models.llama import LlamaConfig, param_count

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
OPTIMIZERS = ("adamw", "sgd", "none")
DEVICES = ("cuda", "cpu")
COMPONENTS = (
    "weights",
    "gradients",
    "optimizer",
    "activations",  # saved by the blocks (what the policy keeps) and by the final norm
    "recompute",  # the block in backward: what it holds beyond its saved tensors
    "grad_flow",  # activation gradients in flight
    "ring",  # ring buffers: K/V stack and receive copies, fp32 accumulators, dq and dK/dV
    "workspace",  # attention kernel: partial results, score tiles, merge temporaries
    "logits",  # logits, log-softmax and their gradients
    "host",  # offloaded block inputs, counted here only where host memory is device memory
)
# Score-sized float32 tiles alive at once in the torch kernels' tile loop. attention_fwd: the
# new s and p = exp2(s - max) while the previous tile's s and p are still bound (4), or 3 in a
# call with a single tile. attention_bwd: s, p, dp, dp - delta and ds, plus the next tile's
# s while the previous tile's are bound (6), or 5 with a single tile.
TILES_FORWARD = (3, 4)
TILES_BACKWARD = (5, 6)


@dataclass(frozen=True)
class Setup:
    """One training step to plan for.

    Attributes:
        config: the model.
        seq_len: S, the global sequence length (a multiple of 2·world for the zigzag layout).
        world: W, ranks of the sequence-parallel ring.
        batch: B, sequences per step.
        dtype: "bf16" | "fp16" | "fp32": weights, gradients and activations.
        optimizer: "adamw" (2 fp32 moments) | "sgd" (1 fp32 momentum) | "none"; with a
            16-bit dtype the optimizer also keeps fp32 master weights.
        device: "cuda" (Triton kernels) | "cpu" (torch kernels; host memory is device memory).
        zero: 0 replicates weights, gradients and optimizer state on every rank; 1 shards the
            optimizer state over the W ranks, 2 also the gradients, 3 also the weights.
        keep_logits: the caller holds the float32 logits until backward and the optimizer step
            are done (`logits = model(x); loss = f(logits); loss.backward()`), 4·V per token;
            False when nothing references them once the loss is computed
            (`f(model(x)).backward()`).
    """

    config: LlamaConfig
    seq_len: int
    world: int = 1
    batch: int = 1
    dtype: str = "bf16"
    optimizer: str = "adamw"
    device: str = "cuda"
    zero: int = 0
    keep_logits: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {list(DTYPE_BYTES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; expected one of {DEVICES}")
        if self.zero not in (0, 1, 2, 3):
            raise ValueError(f"zero must be 0, 1, 2 or 3, got {self.zero}")
        if self.world < 1 or self.batch < 1:
            raise ValueError(f"world and batch must be >= 1, got {self.world} and {self.batch}")
        if self.seq_len <= 0 or self.seq_len % (2 * self.world) != 0:
            raise ValueError(
                f"seq_len ({self.seq_len}) must be a positive multiple of 2 * world "
                f"({2 * self.world}) for the zigzag layout"
            )


@dataclass(frozen=True)
class MemoryPlan:
    """A policy's predicted memory for one step of `setup`, in bytes per rank.

    Attributes:
        peak: the largest total over the step's moments (device memory).
        moment: where the peak happens, e.g. "backward, layer 31 ring".
        components: the peak's breakdown by `COMPONENTS` (they sum to `peak`).
        forward_end: the total when the loss has been computed.
        backward_peak: the largest total during backward (and the optimizer step).
        host: offloaded host memory (part of `peak` only on device "cpu").
        moments: every moment's total, by name.
    """

    policy: str
    setup: Setup
    peak: int
    moment: str
    components: dict[str, int]
    forward_end: int
    backward_peak: int
    host: int
    moments: dict[str, int] = field(repr=False)


@dataclass(frozen=True)
class _Sizes:
    """Per-token byte counts of one rank (see the module docstring for the formulas)."""

    e: int  # activation element
    d: int
    hq: int
    hkv: int
    hd: int  # head_dim
    f: int
    v: int

    @property
    def kv(self) -> int:
        return 2 * self.hkv * self.hd

    @property
    def x(self) -> int:  # a residual-stream tensor [T, d]
        return self.e * self.d

    @property
    def alias(self) -> int:  # fp32: the norm's float32 input IS the block input
        return self.x if self.e == 4 else 0

    @property
    def norm(self) -> int:
        return 4 * self.d + 4 + 2 * self.e * self.d

    @property
    def qkv(self) -> int:
        return self.e * (self.hq + 2 * self.hkv) * self.hd

    @property
    def rope(self) -> int:
        return 4 * self.hd

    @property
    def attn_out(self) -> int:  # ring output and lse
        return self.e * self.hq * self.hd + 4 * self.hq

    @property
    def mlp(self) -> int:
        return 4 * self.e * self.f

    @property
    def block(self) -> int:  # a_none
        return 2 * self.norm + self.qkv + self.rope + self.attn_out + self.mlp

    def saved(self, policy: str) -> int:
        """Bytes per token that one block keeps on the device between forward and backward."""
        return {
            "none": self.block,
            "full": self.x,
            "selective": self.x + self.attn_out,
            "offload": 0,
        }[policy]


def saved_per_block(setup: Setup, policy: str) -> int:
    """Bytes one block keeps on the device from its forward to its backward under `policy`:
    a_none, e·d, e·d + e·Hq·D + 4·Hq or 0 per token (module docstring), times B·S/W."""
    return _sizes(setup).saved(policy) * setup.batch * _local(setup)


def _sizes(setup: Setup) -> _Sizes:
    c = setup.config
    return _Sizes(
        e=DTYPE_BYTES[setup.dtype],
        d=c.dim,
        hq=c.n_heads,
        hkv=c.n_kv_heads,
        hd=c.head_dim,
        f=c.ffn_dim,
        v=c.vocab_size,
    )


def _tiles(setup: Setup, rows: int, cols: int, counts: tuple[int, int]) -> int:
    """Bytes of the torch kernels' score tiles in a call on `rows` queries and `cols` keys:
    counts[0] or counts[1] (one tile or several) float32 tiles [B, Hq, m, n], m = min(BLOCK_M,
    rows), n = min(BLOCK_N, cols), and two bool masks [m, n]."""
    m, n = min(BLOCK_M, rows), min(BLOCK_N, cols)
    count = counts[rows > BLOCK_M or cols > BLOCK_N]
    return count * setup.batch * setup.config.n_heads * m * n * 4 + 2 * m * n


def ring_forward(setup: Setup) -> tuple[int, int]:
    """(ring buffers, attention workspace) at the peak of one ring forward, in bytes.

    Buffers: float32 out and lse accumulators, 4·Hq·D + 4·Hq per token, and the stacked K/V,
    e·kv, plus its receive copy on every step but the last.

    Workspace: one block-kernel call on nq queries and nk keys holds its float32 partial
    (out, lse), 4·Hq·D + 4·Hq per query; the torch kernels add score tiles (`_tiles`) and, for
    16-bit inputs, float32 copies of q, k and v. The LSE merge then holds the partial and three
    float32 [T, Hq, D] temporaries (two weighted partials and their sum). Step 0 pairs all
    n = S/W queries with all n keys (causal). A later zigzag step pairs n queries with n/2 keys
    or n/2 queries with n keys, while the previous step's partial is still referenced. The
    peak is the larger of the two.
    """
    s, b, n = _sizes(setup), setup.batch, _local(setup)

    def buffers(copies: int) -> int:
        return b * n * (4 * s.hq * s.hd + 4 * s.hq + copies * s.e * s.kv)

    def partial(nq: int) -> int:
        return b * nq * (4 * s.hq * s.hd + 4 * s.hq)

    def kernel(nq: int, nk: int) -> int:
        out = partial(nq)
        if setup.device == "cpu":
            out += _tiles(setup, nq, nk, TILES_FORWARD)
            if s.e != 4:
                out += b * 4 * (nq * s.hq * s.hd + nk * s.kv)
        return out

    w = setup.world
    step0 = (
        buffers(2 if w > 1 else 1),
        max(kernel(n, n), partial(n) + 3 * b * n * 4 * s.hq * s.hd),
    )
    if w == 1:
        return step0
    later = (buffers(2 if w > 2 else 1), partial(n) + max(kernel(n, n // 2), kernel(n // 2, n)))
    return max(step0, later, key=sum)


def ring_backward(setup: Setup) -> tuple[int, int]:
    """(ring buffers, attention workspace) at the peak of one ring backward, in bytes.

    Buffers: delta [T, Hq] and dq float32, 4·Hq + 4·Hq·D per token; the K/V stack e·kv (and its
    receive copy on every step but the last); the float32 dK/dV being accumulated, 4·kv, and
    from step 1 on (W > 1) two more in flight: the one sent last step and the one being
    received.

    Workspace: one block-kernel call on nq queries and nk keys holds float32 dq, dk and dv,
    4·Hq·D·nq + 4·kv·nk; the torch kernels add the base-2 lse (4·Hq·nq), score tiles (`_tiles`)
    and, for 16-bit inputs, float32 copies of q, dO, k and v; a call on part of the queries copies
    its lse and delta slices. Step 0 pairs all n queries with all n keys; a later zigzag step
    pairs n queries with n/2 keys or n/2 queries with n keys while the previous call's dq, dk,
    dv (step 0's: n queries, n keys) are still referenced. The peak is the larger of step 0
    and a later step.
    """
    s, b, n = _sizes(setup), setup.batch, _local(setup)

    def grads(nq: int, nk: int) -> int:
        return b * (nq * 4 * s.hq * s.hd + nk * 4 * s.kv)

    def kernel(nq: int, nk: int) -> int:
        out = grads(nq, nk)
        if nq < n:
            out += b * nq * 2 * 4 * s.hq
        if setup.device == "cpu":
            out += b * nq * 4 * s.hq + _tiles(setup, nq, nk, TILES_BACKWARD)
            if s.e != 4:
                out += b * 4 * (nq * 2 * s.hq * s.hd + nk * s.kv)
        return out

    fixed = b * n * (4 * s.hq + 4 * s.hq * s.hd)
    copies = 2 if setup.world > 1 else 1
    step0 = (fixed + b * n * (copies * s.e * s.kv + 4 * s.kv), kernel(n, n))
    if setup.world == 1:
        return step0
    later = (  # the last step (W = 2) receives no K/V
        fixed + b * n * ((2 if setup.world > 2 else 1) * s.e * s.kv + 3 * 4 * s.kv),
        grads(n, n) + max(kernel(n, n // 2), kernel(n // 2, n)),
    )
    return max(step0, later, key=sum)


def _local(setup: Setup) -> int:
    return setup.seq_len // setup.world


def _static(setup: Setup) -> dict[str, int]:
    """Per-rank bytes of weights, of all gradients and of the optimizer state, and the
    parameter counts of one block and of the LM head (to place gradients in time)."""
    c, w = setup.config, setup.world
    p = DTYPE_BYTES[setup.dtype]
    n = param_count(c)
    block = param_count(replace(c, n_layers=2)) - param_count(replace(c, n_layers=1))
    head = c.vocab_size * c.dim + c.dim
    moments = {"adamw": 2, "sgd": 1, "none": 0}[setup.optimizer]
    state = 4 * moments * n + (4 * n if moments and p < 4 else 0)
    return {
        "weights": n * p // w + 2 * block * p if setup.zero >= 3 else n * p,
        "optimizer": state // (w if setup.zero >= 1 else 1),
        "params": n,
        "block": block,
        "head": head,
        "p": p,
    }


def _grads(setup: Setup, st: dict[str, int], params: int) -> int:
    """Bytes of `params` gradients held on this rank (sharded with zero >= 2, plus one block's
    unsharded working copy)."""
    if setup.zero >= 2:
        return params * st["p"] // setup.world + st["block"] * st["p"]
    return params * st["p"]


def _moments(setup: Setup, policy: str) -> list[tuple[str, dict[str, int]]]:
    """Every moment of the step (see the module docstring) with its components in bytes."""
    s, st, c = _sizes(setup), _static(setup), setup.config
    t, layers = setup.batch * _local(setup), c.n_layers
    a = s.saved(policy) * t  # one block's saved tensors
    offloaded = layers * s.x * t if policy == "offload" and setup.device == "cpu" else 0
    fwd_ring, fwd_ws = ring_forward(setup)
    bwd_ring, bwd_ws = ring_backward(setup)
    held_logits = 4 * s.v * t if setup.keep_logits else 0  # after the forward

    def moment(grad_params: int = 0, **parts: int) -> dict[str, int]:
        out = dict.fromkeys(COMPONENTS, 0)
        out.update(weights=st["weights"], optimizer=st["optimizer"], host=offloaded)
        out["logits"] = held_logits
        out["gradients"] = _grads(setup, st, grad_params) if grad_params else 0
        out.update(parts)
        return out

    # The last block during its ring forward: what it holds so far. Unsaved tensors (the
    # block input, q, k, v as the ring's arguments) are alive as local variables.
    if policy == "none":
        so_far = s.norm + s.qkv + s.rope + s.x - s.alias
    else:
        so_far = s.x + s.qkv
    final_norm = s.norm * t
    out = [
        (
            "forward, last ring",
            moment(activations=(layers - 1) * a + so_far * t, ring=fwd_ring, workspace=fwd_ws),
        ),
        ("forward end", moment(activations=layers * a + final_norm, logits=8 * s.v * t)),
        (
            "backward, loss",
            moment(activations=layers * a + final_norm, logits=12 * s.v * t + held_logits),
        ),
    ]
    # A block in backward: none holds its own saved tensors; full and selective recompute them
    # beside the checkpointed input (in fp32 the norm's saved input is that input); offload
    # fetches its input, recomputes, keeps the block output for the inner backward, and has
    # already prefetched the input of the block below.
    live = s.block + (s.x - s.alias if policy != "none" else 0)
    if policy == "offload":
        live += s.x
    attention_half = live - s.mlp - s.norm  # after the MLP and its norm have backpropagated
    recomputing_ring = s.x + s.norm - s.alias + s.qkv + s.rope  # full, offload: up to the ring
    own = a if policy != "offload" else 0
    # Gradients present: the LM head's, the blocks above, and of block i at the MLP moment
    # w2's, at the ring moment the MLP's, ffn_norm's and wo's.
    head = st["head"]
    mlp_done = 3 * c.dim * c.ffn_dim + c.dim + c.n_heads * c.head_dim * c.dim

    def block(i: int, name: str, live_now: int, grad_params: int, **parts: int):
        held = live_now * t
        if policy == "offload" and i > 0:
            held += s.x * t  # the input of block i - 1, prefetched
        kept = min(own, held)  # block i's checkpointed share counts as activations
        parts.update(activations=i * a + kept, recompute=held - kept)
        return (f"backward, layer {i} {name}", moment(grad_params, **parts))

    for i in reversed(range(layers)):
        above = head + (layers - 1 - i) * st["block"]
        if policy in ("full", "offload"):  # recomputing the block reruns its ring forward
            out.append(
                block(
                    i,
                    "recompute ring",
                    recomputing_ring,
                    above,
                    grad_flow=s.x * t,
                    ring=fwd_ring,
                    workspace=fwd_ws,
                )
            )
        mlp_flow = (s.x + 2 * s.e * s.f) * t
        out.append(block(i, "MLP", live, above + c.dim * c.ffn_dim, grad_flow=mlp_flow))
        out.append(
            block(
                i,
                "ring",
                attention_half,
                above + mlp_done,
                grad_flow=(s.x + s.e * s.hq * s.hd) * t,
                ring=bwd_ring,
                workspace=bwd_ws,
            )
        )
    if setup.optimizer != "none":
        temp = 4 * st["params"] // (setup.world if setup.zero >= 1 else 1)
        step = moment(st["params"])
        step["optimizer"] += temp
        out.append(("optimizer step", step))
    return out


def plan_memory(setup: Setup, policy: str) -> MemoryPlan:
    """Predicted per-rank memory of one training step of `setup` under `policy`.

    Raises:
        ValueError: unknown policy.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown checkpoint policy {policy!r}; expected one of {POLICIES}")
    moments = _moments(setup, policy)
    totals = {name: sum(parts.values()) for name, parts in moments}
    name, parts = max(moments, key=lambda m: totals[m[0]])
    host = setup.config.n_layers * _sizes(setup).x * setup.batch * _local(setup)
    return MemoryPlan(
        policy=policy,
        setup=setup,
        peak=totals[name],
        moment=name,
        components=parts,
        forward_end=totals["forward end"],
        backward_peak=max(v for k, v in totals.items() if not k.startswith("forward")),
        host=host if policy == "offload" else 0,
        moments=totals,
    )


def max_seq_len(setup: Setup, policy: str, budget: int, *, limit: int = 1 << 26) -> int:
    """The longest sequence, a multiple of 2·W, whose predicted peak fits in `budget` bytes
    (binary search; the peak grows with the length). 0 when not even 2·W tokens fit; `limit`
    caps the search."""
    step = 2 * setup.world

    def fits(units: int) -> bool:
        return plan_memory(replace(setup, seq_len=units * step), policy).peak <= budget

    lo, hi = 0, max(1, limit // step)  # fits(lo) (or lo == 0); search (lo, hi]
    if fits(hi):
        return hi * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo * step


def gib(nbytes: float) -> float:
    """Bytes -> GiB."""
    return nbytes / 2**30


__all__ = [
    "COMPONENTS",
    "DEVICES",
    "DTYPE_BYTES",
    "OPTIMIZERS",
    "MemoryPlan",
    "Setup",
    "gib",
    "max_seq_len",
    "plan_memory",
    "ring_backward",
    "ring_forward",
    "saved_per_block",
]
