"""DeepSpeed integration: Ulysses attention, a data × sequence parallel mesh, ZeRO training.

Ulysses (`ulysses_attention`) swaps the sharded dimension with all-to-alls instead of passing
K/V around a ring. Before: each of the W ranks holds S/W tokens of all H heads. After one
all-to-all each for q, k and v: each holds all S tokens of H/W heads, attends locally, and one
more all-to-all swaps the output back:

    [B, S/W, H, D] --all-to-all--> [B, S, H/W, D] --flash_attn--> [B, S, H/W, D] --all-to-all-->
    [B, S/W, H, D]

The all-to-alls are DeepSpeed's `DistributedAttention` (autograd-aware). After the first one the
sequence is the concatenation of the ranks' shards in rank order, which for zigzag or striped is
a permutation of the true order: the local attention gathers the tokens into global order, runs
causal flash attention, and scatters them back, so every layout is exact.

Training (`ParallelMesh`, `initialize_deepspeed`): the world is a dp × sp grid. Each sp group
runs the sequence-parallel model (ring or Ulysses) over one sample's sequence; each dp group
holds the same sequence position on different samples. The mesh is also DeepSpeed's `mpu`:
ZeRO partitions and reduces gradients over the whole dp × sp world ("sequence data parallel"
group) and divides by dp (= world / sp), i.e. it sums over sp and averages over dp, which is
exactly the gradient of `sequence_parallel_loss` (each sp rank's loss is its share of the
global mean over the sequence):

    world = 4, sp = 2     rank = dp_rank * sp + sp_rank (sp neighbours stay on one node)
    sp groups  [0, 1] [2, 3]      ring / all-to-all traffic
    dp groups  [0, 2] [1, 3]      same tokens, different samples
    sequence data parallel group  [0, 1, 2, 3]   ZeRO partitions + gradient reduction

DeepSpeed runs its collectives through `deepspeed.comm`, which is pointed at the existing
torch.distributed world on first use (no new process group). On CPU that first use also
JIT-compiles DeepSpeed's shared-memory comm op: minutes once per machine, then cached under
~/.cache/torch_extensions.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ringattn.flash import check_qkv, flash_attn
from ringattn.layout import check_seq_len, group_rank_and_size, positions


def _init_deepspeed_comm() -> None:
    """DeepSpeed's collectives go through `deepspeed.comm`; point it at the torch.distributed
    world that already exists (creates no process group)."""
    import deepspeed
    import deepspeed.comm as ds_dist

    if not ds_dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=dist.get_backend(), dist_init_required=False, verbose=False
        )


@functools.lru_cache(maxsize=64)
def _gathered_order(
    seq_len: int, world: int, layout: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gathered, order), LongTensors [S] on `device`: `gathered[j]` is the global position of
    token j of the all-to-all's rank-order concatenation of shards; `order` is its inverse
    (`order[p]` is where the token at global position p sits in that concatenation)."""
    gathered = torch.cat([positions(seq_len, r, world, layout) for r in range(world)])
    return gathered.to(device), torch.argsort(gathered).to(device)


class _GlobalOrderAttention(nn.Module):
    """DistributedAttention's local attention: q [B, S, Hq/W, D], k/v [B, S, Hkv/W, D] with the
    sequence in gathered (rank) order -> out [B, S, Hq/W, D] in the same order. With `layout`
    None the gathered order is taken as the global order (contiguous, or non-causal)."""

    def __init__(
        self, *, layout: str | None, world: int, causal: bool, softmax_scale, backend
    ) -> None:
        super().__init__()
        self.layout, self.world = layout, world
        self.causal, self.softmax_scale, self.backend = causal, softmax_scale, backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.layout is not None:  # gathered order -> global order, along S
            gathered, order = _gathered_order(q.shape[1], self.world, self.layout, q.device)
            q, k, v = (x.index_select(1, order) for x in (q, k, v))
        out = flash_attn(
            q, k, v, causal=self.causal, softmax_scale=self.softmax_scale, backend=self.backend
        )  # [B, S, Hq/W, D]
        if self.layout is not None:  # global order -> gathered order
            out = out.index_select(1, gathered)
        return out


def _expand_kv_heads(k: torch.Tensor, hq: int, world: int) -> torch.Tensor:
    """k [B, S/W, Hkv, D] -> [B, S/W, lcm(Hkv, W), D], each head repeated in place.

    The all-to-all splits heads into W contiguous blocks, so Hkv must be a multiple of W. With
    Hq % W == 0 and Hq % Hkv == 0, lcm(Hkv, W) divides Hq: query head i still reads (a copy of)
    key head i // (Hq / Hkv), and the copies' gradients add up in `repeat_interleave`'s backward.
    """
    hkv = k.shape[2]
    if hkv % world == 0:
        return k
    repeats = math.lcm(hkv, world) // hkv
    assert hq % (hkv * repeats) == 0  # follows from Hq % W == 0 and Hq % Hkv == 0
    return k.repeat_interleave(repeats, dim=2)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    group: dist.ProcessGroup | None = None,
    layout: str = "zigzag",
    softmax_scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Exact attention over a sequence sharded across `group`, by all-to-all over heads
    (DeepSpeed-Ulysses, `deepspeed.sequence.layer.DistributedAttention`).

    Args:
        q: [B, S/W, Hq, D] this rank's queries, the tokens `layout` assigns to it. Hq % W == 0.
        k, v: [B, S/W, Hkv, D] this rank's keys and values; Hq % Hkv == 0. When Hkv is not a
            multiple of W, K/V heads are repeated to lcm(Hkv, W) heads before the all-to-all
            (exact; lcm(Hkv, W) / Hkv times the K/V traffic).
        causal: causal masking by global position.
        group: the sequence-parallel process group (default: the world group).
        layout: "contiguous" | "zigzag" | "striped", as the shards were taken.
        softmax_scale: default D ** -0.5.
        backend: flash kernel backend, as in `flash_attn`.

    Returns:
        out [B, S/W, Hq, D], this rank's shard, in q's dtype. Differentiable in q, k, v.

    Raises:
        ValueError: Hq not divisible by W ("heads not divisible for Ulysses"), bad shapes, or a
            length the layout cannot split. Every rank raises before any communication
            (given the same shapes on every rank, as the model guarantees).
    """
    check_qkv(q, k, v, what="ulysses_attention")
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"ulysses_attention: q holds {q.shape[1]} tokens but k/v hold {k.shape[1]}"
        )
    _, world = group_rank_and_size(group)
    hq = q.shape[2]
    if hq % world != 0:
        raise ValueError(
            f"ulysses_attention: heads not divisible for Ulysses: {hq} query heads (Hq) over "
            f"{world} ranks (W); Hq must be a multiple of W (use the ring strategy instead)"
        )
    check_seq_len(q.shape[1] * world, layout, world)
    if world == 1:
        return flash_attn(q, k, v, causal=causal, softmax_scale=softmax_scale, backend=backend)

    from deepspeed.sequence.layer import DistributedAttention

    _init_deepspeed_comm()
    k, v = _expand_kv_heads(k, hq, world), _expand_kv_heads(v, hq, world)
    reorder = causal and layout != "contiguous"  # else gathered order is global, or irrelevant
    local = _GlobalOrderAttention(
        layout=layout if reorder else None,
        world=world,
        causal=causal,
        softmax_scale=softmax_scale,
        backend=backend,
    )
    attention = DistributedAttention(
        local,
        group if group is not None else dist.group.WORLD,
        scatter_idx=2,  # heads are split ...
        gather_idx=1,  # ... and the sequence gathered (BSHD)
    )
    return attention(q, k, v, batch_dim_idx=0)


class ParallelMesh:
    """The world as a dp × sp grid of ranks (rank = dp_rank * sp + sp_rank), with its groups.

    Build it with `ParallelMesh.build(sp_size=...)` (a collective: every rank calls it). Pass
    `sp_group` to `parallelize` / `shard_batch` / `sequence_parallel_loss`; pass the mesh itself
    as DeepSpeed's `mpu` (the `get_*` methods below are the names DeepSpeed queries; model,
    tensor and pipeline parallelism are 1). Call `destroy()` when done with it.
    """

    def __init__(
        self,
        *,
        dp_size: int,
        sp_size: int,
        dp_group: dist.ProcessGroup,
        sp_group: dist.ProcessGroup,
        sequence_data_group: dist.ProcessGroup,
        self_group: dist.ProcessGroup,
    ):
        self.dp_size, self.sp_size = dp_size, sp_size
        self.dp_group = dp_group  # ranks holding the same tokens of different samples
        self.sp_group = sp_group  # ranks sharing one sequence: ring / all-to-all traffic
        self.sequence_data_group = sequence_data_group  # dp × sp: ZeRO partitions, grad reduce
        self.self_group = self_group  # this rank alone: the (trivial) model-parallel group
        self.dp_rank, self.sp_rank = divmod(dist.get_rank(), sp_size)

    @classmethod
    def build(cls, *, sp_size: int) -> ParallelMesh:
        """Split the initialized world into dp = world / sp_size groups of sp_size consecutive
        ranks. A collective: every rank of the world calls it with the same sp_size.

        Raises:
            ValueError: sp_size does not divide the world size (on every rank).
        """
        world, rank = dist.get_world_size(), dist.get_rank()
        if sp_size < 1 or world % sp_size != 0:
            raise ValueError(f"sequence-parallel size {sp_size} must divide the world size {world}")
        dp_size = world // sp_size
        sp_group = dp_group = None
        for d in range(dp_size):  # new_group is collective over the world: same order everywhere
            ranks = list(range(d * sp_size, (d + 1) * sp_size))
            group = dist.new_group(ranks)
            if rank in ranks:
                sp_group = group
        for s in range(sp_size):
            ranks = list(range(s, world, sp_size))
            group = dist.new_group(ranks)
            if rank in ranks:
                dp_group = group
        return cls(
            dp_size=dp_size,
            sp_size=sp_size,
            dp_group=dp_group,
            sp_group=sp_group,
            sequence_data_group=dist.new_group(list(range(world))),
            self_group=dist.new_group([rank], use_local_synchronization=True),
        )

    def destroy(self) -> None:
        """Destroy this mesh's process groups (not the world), and drop DeepSpeed's reference
        to it (`deepspeed.initialize(mpu=...)` keeps the mpu in a module-level variable that a
        later engine without an mpu would otherwise still consult)."""
        groups = sys.modules.get("deepspeed.utils.groups")  # only if DeepSpeed was imported
        if groups is not None and getattr(groups, "mpu", None) is self:
            groups.mpu = None
        for group in {self.dp_group, self.sp_group, self.sequence_data_group, self.self_group}:
            dist.destroy_process_group(group)

    # DeepSpeed's mpu protocol (Megatron names). Data parallel: dp only.
    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.dp_group)

    # Sequence parallel, and the dp × sp group over which ZeRO partitions and reduces.
    def get_sequence_parallel_group(self) -> dist.ProcessGroup:
        return self.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.sp_size

    def get_sequence_parallel_rank(self) -> int:
        return self.sp_rank

    def get_sequence_data_parallel_group(self) -> dist.ProcessGroup:
        return self.sequence_data_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.dp_size * self.sp_size

    def get_sequence_data_parallel_rank(self) -> int:
        return dist.get_rank()

    # No model (tensor) parallelism: a group of one. Not the sp group: DeepSpeed counts a
    # replicated parameter's gradient norm only on model-parallel rank 0, and ZeRO shards that
    # norm over the sp ranks too.
    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.self_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def __repr__(self) -> str:
        return (
            f"ParallelMesh(dp={self.dp_size}, sp={self.sp_size}, "
            f"dp_rank={self.dp_rank}, sp_rank={self.sp_rank})"
        )


def deepspeed_config(
    config: dict[str, Any] | None = None, *, micro_batch_size: int, zero_stage: int | None = None
) -> dict[str, Any]:
    """A copy of `config` with the batch size filled in (fp32, ZeRO stage 1 unless given).

    `train_micro_batch_size_per_gpu` is the batch of one dp replica (an sp group counts as one
    "GPU" of DeepSpeed's data parallelism); gradient accumulation defaults to 1. Note that
    DeepSpeed clips the gradient norm to 1.0 unless `gradient_clipping` says otherwise.
    """
    config = dict(config or {})
    config.setdefault("train_micro_batch_size_per_gpu", micro_batch_size)
    config.setdefault("gradient_accumulation_steps", 1)
    zero = dict(config.get("zero_optimization", {}))
    if zero_stage is not None:
        zero["stage"] = zero_stage
    zero.setdefault("stage", 1)
    config["zero_optimization"] = zero
    return config


def initialize_deepspeed(
    model: nn.Module,
    *,
    mesh: ParallelMesh,
    config: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[Any, Any]:
    """`deepspeed.initialize` for a model made sequence-parallel over `mesh.sp_group`.

    ZeRO (stage 1 or 2) partitions optimizer state (and gradients) over all dp × sp ranks and
    reduces each gradient as sum over sp, mean over dp; the training step is then

        logits = engine(batch["input_ids"], position_ids=batch["position_ids"])
        loss = sequence_parallel_loss(logits, batch["labels"], group=mesh.sp_group)
        engine.backward(loss)
        engine.step()

    with no `allreduce_gradients` call (DeepSpeed does the reduction). torch.distributed must
    be initialized (DeepSpeed's own comm layer is pointed at it) and LOCAL_RANK set (torchrun
    sets it; DeepSpeed's engine requires it).

    Args:
        model: already `parallelize`d over `mesh.sp_group`, identical on every rank.
        mesh: the dp × sp layout; handed to DeepSpeed as its `mpu`.
        config: DeepSpeed config dict (see `deepspeed_config`).
        optimizer: a torch optimizer over model.parameters(); None uses the config's.

    Returns:
        (engine, optimizer) as `deepspeed.initialize` returns them.
    """
    import deepspeed

    _init_deepspeed_comm()
    engine, ds_optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=None if optimizer is not None else model.parameters(),
        mpu=mesh,
        config=config,
        dist_init_required=False,
    )
    return engine, ds_optimizer
