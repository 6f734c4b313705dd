"""parallelize: a sequence-parallel Llama equals the single-process model exactly (fp32)."""

from __future__ import annotations

import pytest
import torch

from ringattn.layout import gather_sequence
from ringattn.models import Llama, LlamaConfig, causal_lm_loss, shift_labels
from ringattn.parallel import (
    allreduce_gradients,
    parallelize,
    sequence_parallel_loss,
    shard_batch,
)
from tests._harness import run_distributed


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Llama(config=LlamaConfig.from_name("tiny"))


def tokens(seq_len, batch=2, seed=1):
    return torch.randint(0, 256, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def _parallel_vs_single(rank, world, layout, seq_len):
    ids = tokens(seq_len)
    labels = shift_labels(ids)
    labels[0, 3] = -100  # an ignored token somewhere
    ref_model = tiny_model()
    ref_logits = ref_model(ids)
    ref_loss = causal_lm_loss(ref_logits, labels)
    ref_loss.backward()

    model = parallelize(tiny_model(), layout=layout)
    batch = shard_batch(ids, labels=labels, layout=layout)
    logits = model(batch["input_ids"], position_ids=batch["position_ids"])
    loss = sequence_parallel_loss(logits, batch["labels"])
    loss.backward()
    allreduce_gradients(model)
    full_logits = gather_sequence(logits.detach(), layout=layout)
    grad_err = max(
        (p.grad - r.grad).abs().max().item()
        for p, r in zip(model.parameters(), ref_model.parameters(), strict=True)
    )
    return (
        (full_logits - ref_logits).abs().max().item(),
        abs(loss.item() - ref_loss.item()),
        grad_err,
    )


@pytest.mark.parametrize("layout", ["zigzag", "striped", "contiguous"])
@pytest.mark.parametrize("world", [2, 3], ids=lambda w: f"W{w}")
def test_parallel_model_equals_single_process(world, layout):
    for logits_err, loss_err, grad_err in run_distributed(_parallel_vs_single, world, layout, 36):
        # fp32 throughout; the ring changes only summation order
        assert logits_err < 1e-5 and loss_err < 1e-6 and grad_err < 1e-5


def _bad_batches(rank, world):
    ids = tokens(10)
    messages = {}
    for case, call in {
        "indivisible": lambda: shard_batch(ids, layout="zigzag"),
        "unshifted": lambda: shard_batch(tokens(12), labels=tokens(12)),
    }.items():
        try:
            call()
            messages[case] = None
        except ValueError as err:
            messages[case] = str(err)
    return messages


def test_bad_batches_raise_on_every_rank():
    for messages in run_distributed(_bad_batches, 3):
        assert "multiple of 6; got 10" in messages["indivisible"]
        assert "labels look unshifted" in messages["unshifted"]


def test_parallelize_needs_an_attention_core():
    with pytest.raises(ValueError, match="no CoreAttention"):
        parallelize(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown strategy 'tree'"):
        parallelize(tiny_model(), strategy="tree")
