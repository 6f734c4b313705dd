"""DeepSpeed integration: Ulysses attention equals the ring (and float64 attention), and ZeRO
training over a dp x sp mesh reproduces the single-process run step by step."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("deepspeed")

from ringattn.flash import flash_attn  # noqa: E402 - after importorskip
from ringattn.layout import LAYOUTS, gather_sequence, shard_sequence  # noqa: E402
from ringattn.models import Llama, LlamaConfig, causal_lm_loss, shift_labels  # noqa: E402
from ringattn.parallel import (  # noqa: E402
    allreduce_gradients,
    parallelize,
    sequence_parallel_loss,
    shard_batch,
)
from tests._harness import run_distributed  # noqa: E402

# The first job on a worker pool imports deepspeed in every rank (seconds each, on 2 cores).
TIMEOUT_S = 180.0


@pytest.fixture(scope="module", autouse=True)
def _deepspeed_comm_op_built():
    """deepspeed.comm's torch backend JIT-compiles a CPU shared-memory op the first time it
    starts (minutes, once per machine; cached under ~/.cache/torch_extensions). Build it here,
    unbounded, rather than inside a rank with a timeout: a build killed midway leaves a lock
    file that makes every later start wait forever."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and builder.is_compatible():
        builder.load()


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Llama(config=LlamaConfig.from_name("tiny", **overrides))


def tokens(seq_len, batch=2, seed=1):
    return torch.randint(0, 256, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# ulysses_attention


def _ulysses_vs_float64(rank, world):
    """Max error of (out, dq, dk, dv) per (layout, Hq, Hkv) vs float64 single-device attention."""
    from ringattn.integrations.deepspeed import ulysses_attention

    errors = {}
    for layout in LAYOUTS:
        # (4, 2): Hkv divisible by W; (4, 1) MQA and (6, 3): K/V heads repeated to lcm(Hkv, W)
        for hq, hkv in ((4, 2), (4, 1), (6, 3)):
            g = torch.Generator().manual_seed(0)
            q, do = (torch.randn(2, 20, hq, 8, generator=g, dtype=torch.float64) for _ in "qo")
            k, v = (torch.randn(2, 20, hkv, 8, generator=g, dtype=torch.float64) for _ in "kv")
            full = [x.clone().requires_grad_() for x in (q, k, v)]
            ref = flash_attn(*full, causal=True)
            ref.backward(do)
            local = [shard_sequence(x, layout=layout).requires_grad_() for x in (q, k, v)]
            out = ulysses_attention(*local, causal=True, layout=layout)
            out.backward(shard_sequence(do, layout=layout))
            pairs = [(out.detach(), ref)] + [
                (x.grad, f.grad) for x, f in zip(local, full, strict=True)
            ]
            errors[(layout, hq, hkv)] = max(
                (gather_sequence(a, layout=layout) - b.detach()).abs().max().item()
                for a, b in pairs
            )
    return errors


def test_ulysses_attention_matches_single_device():
    for errors in run_distributed(_ulysses_vs_float64, 2, timeout=TIMEOUT_S):
        for case, err in errors.items():
            # float64 inputs; the torch flash twin accumulates in float32 (~1e-7 relative)
            assert err < 1e-6, f"{case}: max error {err:.2e}"


def _ulysses_vs_ring(rank, world, layout, n_kv_heads):
    ids = tokens(24)
    results = []
    for strategy in ("ring", "ulysses"):
        model = parallelize(tiny_model(n_kv_heads=n_kv_heads), layout=layout, strategy=strategy)
        batch = shard_batch(ids, layout=layout)
        logits = model(batch["input_ids"], position_ids=batch["position_ids"])
        sequence_parallel_loss(logits, batch["labels"]).backward()
        allreduce_gradients(model)
        results.append((logits.detach(), [p.grad for p in model.parameters()]))
    (ring_logits, ring_grads), (uly_logits, uly_grads) = results
    grad_err = max((a - b).abs().max().item() for a, b in zip(ring_grads, uly_grads, strict=True))
    return (ring_logits - uly_logits).abs().max().item(), grad_err


@pytest.mark.parametrize("n_kv_heads", [2, 1], ids=["GQA-Hkv2", "MQA-Hkv1"])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_ulysses_model_equals_ring(layout, n_kv_heads):
    results = run_distributed(_ulysses_vs_ring, 2, layout, n_kv_heads, timeout=TIMEOUT_S)
    for logits_err, grad_err in results:
        # fp32; the two strategies differ only in summation order
        assert logits_err < 1e-5 and grad_err < 1e-5, (logits_err, grad_err)


def _indivisible_heads(rank, world):
    from ringattn.integrations.deepspeed import ulysses_attention

    q = torch.randn(1, 4, 3, 8)  # Hq = 3 over W = 2
    k = v = torch.randn(1, 4, 1, 8)
    model = parallelize(tiny_model(n_heads=3, n_kv_heads=1, head_dim=16), strategy="ulysses")
    messages = []
    for call in (
        lambda: ulysses_attention(q, k, v),
        lambda: model(tokens(8, batch=1)[:, :4], position_ids=torch.arange(4)),
    ):
        try:
            call()
            messages.append(None)
        except ValueError as err:
            messages.append(str(err))
    return messages


def test_heads_not_divisible_raise_on_every_rank():
    for messages in run_distributed(_indivisible_heads, 2, timeout=TIMEOUT_S):
        for message in messages:
            assert message is not None and "heads not divisible for Ulysses" in message
            assert "3 query heads (Hq)" in message and "2 ranks (W)" in message


# ---------------------------------------------------------------------------------------------
# deepspeed.initialize over a dp x sp mesh

LR, STEPS, SEQ, MICRO_BATCH, CLIP = 3e-3, 3, 32, 2, 1.0


def step_batches(rows):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (rows, SEQ), generator=g) for _ in range(STEPS)]


def single_process_losses(rows):
    """The plain run: full batch, one process, torch AdamW, gradient norm clipped to CLIP."""
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for ids in step_batches(rows):
        loss = causal_lm_loss(model(ids), shift_labels(ids))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _deepspeed_training(rank, world, sp_size, zero_stage, strategy):
    # DeepSpeed's engine insists on LOCAL_RANK (torchrun sets it); these ranks share one host.
    os.environ["LOCAL_RANK"] = str(rank)
    try:
        return _train_with_deepspeed(sp_size, zero_stage, strategy)
    finally:
        del os.environ["LOCAL_RANK"]


def _train_with_deepspeed(sp_size, zero_stage, strategy):
    from deepspeed.utils import groups

    from ringattn.integrations.deepspeed import (
        ParallelMesh,
        deepspeed_config,
        initialize_deepspeed,
    )

    mesh = ParallelMesh.build(sp_size=sp_size)
    model = parallelize(tiny_model(), group=mesh.sp_group, strategy=strategy)
    config = deepspeed_config(
        {"gradient_clipping": CLIP}, micro_batch_size=MICRO_BATCH, zero_stage=zero_stage
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    engine, _ = initialize_deepspeed(model, mesh=mesh, config=config, optimizer=optimizer)
    losses = []
    for ids in step_batches(MICRO_BATCH * mesh.dp_size):
        mine = ids[mesh.dp_rank * MICRO_BATCH : (mesh.dp_rank + 1) * MICRO_BATCH]
        batch = shard_batch(mine, group=mesh.sp_group)
        logits = engine(batch["input_ids"], position_ids=batch["position_ids"])
        loss = sequence_parallel_loss(logits, batch["labels"], group=mesh.sp_group)
        engine.backward(loss)
        engine.step()
        total = loss.detach().reshape(1)
        dist.all_reduce(total, group=mesh.dp_group)  # each dp rank's mean, over equal counts
        losses.append(total.item() / mesh.dp_size)
    mesh.destroy()
    assert groups.mpu is None  # nothing of this mesh is left for the pool's next job
    return losses


@pytest.mark.parametrize(
    "sp_size, zero_stage, strategy",
    [(2, 1, "ring"), (2, 2, "ulysses"), (1, 2, "ring")],
    ids=["dp1-sp2-zero1-ring", "dp1-sp2-zero2-ulysses", "dp2-sp1-zero2"],
)
def test_deepspeed_zero_matches_single_process(sp_size, zero_stage, strategy):
    rows = MICRO_BATCH * (2 // sp_size)
    expected = single_process_losses(rows)
    results = run_distributed(
        _deepspeed_training, 2, sp_size, zero_stage, strategy, timeout=TIMEOUT_S
    )
    for losses in results:
        # fp32: summation order only; AdamW's first steps move every weight by ~LR, so the
        # per-step loss matches closely only if the clipped gradients match at every step
        assert losses == pytest.approx(expected, abs=2e-6), (losses, expected)
