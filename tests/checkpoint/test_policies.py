"""Checkpoint policies: identical gradients, counted ring traffic, offloaded inputs."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import ringattn.ring as ring_module
from ringattn.checkpoint import CHOICES, apply_checkpointing
from ringattn.models import Llama, LlamaConfig
from ringattn.parallel import allreduce_gradients, parallelize, sequence_parallel_loss, shard_batch
from tests._harness import run_distributed


def _model(policy, world):
    torch.manual_seed(0)
    model = Llama(config=LlamaConfig.from_name("tiny", n_layers=3))
    if world > 1:
        parallelize(model)
    return apply_checkpointing(model, policy)


def _train_step(rank, world, policy):
    """One step's loss, gradients, and ring forwards run during forward / backward."""
    model = _model(policy, world)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    batch = shard_batch(ids)
    calls = {"forward": 0, "backward": 0}
    phase = "forward"
    real = ring_module._ring_forward

    def counting(*args):
        calls[phase] += 1
        return real(*args)

    ring_module._ring_forward = counting
    try:
        logits = model(batch["input_ids"], position_ids=batch["position_ids"])
        loss = sequence_parallel_loss(logits, batch["labels"])
        phase = "backward"
        loss.backward()
    finally:
        ring_module._ring_forward = real
    allreduce_gradients(model)
    return loss.item(), [p.grad.clone() for p in model.parameters()], calls


@pytest.mark.parametrize("world", [1, 2, 3], ids=lambda w: f"W{w}")
def test_gradients_identical_across_policies(world):
    results = {p: run_distributed(_train_step, world, p) for p in CHOICES}
    for policy in CHOICES:
        for rank in range(world):
            loss, grads, _ = results[policy][rank]
            ref_loss, ref_grads, _ = results["none"][rank]
            assert loss == pytest.approx(ref_loss, abs=1e-6), policy
            for g, r in zip(grads, ref_grads, strict=True):
                # recomputation repeats the same fp32 ops: differences are summation-order only
                torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


def test_ring_traffic_during_recomputation():
    # 3 layers on 2 ranks: each forward ring runs once per layer in forward; full recompute
    # runs each ring again in backward, selective never does.
    expected = {"none": 0, "full": 3, "selective": 0, "offload": 3, "deepspeed": 3}
    for policy, extra in expected.items():
        for _, _, calls in run_distributed(_train_step, 2, policy):
            assert calls == {"forward": 3, "backward": extra}, (policy, calls)


def test_offload_moves_block_inputs_off_the_compute_tensors():
    # With offload, nothing on the compute side keeps a block's input alive after forward:
    # only the host copy does. With plain full checkpointing, the input stays referenced.
    def block_inputs_alive(policy):
        model = _model(policy, 1)
        refs = []

        def remember(module, args, kwargs):
            refs.append(weakref.ref(args[0]))

        hooks = [b.register_forward_pre_hook(remember, with_kwargs=True) for b in model.layers]
        ids = torch.randint(0, 256, (1, 16))
        loss = model(ids).sum()
        gc.collect()
        alive = [r() is not None for r in refs[1:]]  # block 0's input is the embedding output
        chain = model.layers[0]._ringattn_offload_chain
        loss.backward()
        for h in hooks:
            h.remove()
        return alive, chain

    alive, chain = block_inputs_alive("offload")
    assert not any(alive) and len(chain) == 3
    assert all(c.host.device.type == "cpu" for c in chain)
    alive_full, _ = block_inputs_alive("full")
    assert all(alive_full)


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown checkpoint policy 'some'"):
        apply_checkpointing(_model("none", 1), "some")
