"""The tiny Llama over the sharded cache on W gloo ranks vs plain full forwards of the same model:
logits of prefill, batched decode, chunks and forks; greedy tokens exactly; launch/generate.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ringattn.cache import (
    ShardedKVCache,
    UnknownSequence,
    decode_step,
    greedy_generate,
    prefill,
)
from ringattn.models.llama import Llama, LlamaConfig
from tests._harness import run_distributed

ROOT = Path(__file__).resolve().parents[2]
# float32 logits of a 2-layer model: the same math in another order (paged tiles, a ring, an
# LSE merge over ranks) moves them by a few ulps of their O(1) size.
LOGITS_ATOL = 2e-5


def tiny_model() -> Llama:
    torch.manual_seed(0)  # the same weights on every rank
    return Llama(config=LlamaConfig.from_name("tiny")).eval()


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def full_logits(model: Llama, seq: torch.Tensor) -> torch.Tensor:
    """Plain forward over the whole sequence [S] -> [S, V]."""
    with torch.no_grad():
        return model(seq[None])[0]


def reference_greedy(model: Llama, prompt: torch.Tensor, n: int) -> list[int]:
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, full_logits(model, seq)[-1].argmax()[None]])
    return seq[len(prompt) :].tolist()


def _greedy(rank, world, prompt_len, new_tokens):
    model = tiny_model()
    cache = ShardedKVCache.for_model(model, num_pages=24, page_size=8)
    prompt = tokens(prompt_len, seed=1)
    out = greedy_generate(model, cache, prompt, seq_id="s", new_tokens=new_tokens)
    return out.tolist(), reference_greedy(model, prompt, new_tokens)


@pytest.mark.parametrize(
    ("world", "prompt_len"), [(1, 40), (2, 61), (3, 48)], ids=["W1-S40", "W2-S61", "W3-S48"]
)
def test_distributed_greedy_equals_single_process_greedy(world, prompt_len):
    for got, expected in run_distributed(_greedy, world, prompt_len, 12):
        assert got == expected


def _logits(rank, world):
    """Two prompts of different lengths, batched decode, a chunk of 4, a fork: every logit vs a
    full forward of that sequence's tokens so far."""
    model = tiny_model()
    cache = ShardedKVCache.for_model(model, num_pages=24, page_size=4)
    seqs = {"a": tokens(5, seed=2), "b": tokens(27, seed=3)}
    errors = []

    def check(what, seq_id, logits):  # logits [Sq, V] of the last Sq tokens of seq_id
        ref = full_logits(model, seqs[seq_id])[-logits.shape[0] :]
        errors.append((what, seq_id, float((logits - ref).abs().max())))

    for seq_id, prompt in seqs.items():  # different lengths: one prefill each
        check("prefill", seq_id, prefill(model, cache, prompt[None], seq_ids=[seq_id]))

    def step(seq_ids, sq, seed):
        new = torch.randint(
            0, 256, (len(seq_ids), sq), generator=torch.Generator().manual_seed(seed)
        )
        logits = decode_step(model, cache, new, seq_ids=seq_ids)  # [B, Sq, V]
        for b, seq_id in enumerate(seq_ids):
            seqs[seq_id] = torch.cat([seqs[seq_id], new[b]])
            check(f"step Sq={sq}", seq_id, logits[b])

    for i, sq in enumerate((1, 1, 4, 1)):
        step(["a", "b"], sq, seed=10 + i)
    cache.fork("b", "b2")
    seqs["b2"] = seqs["b"].clone()
    for i, sq in enumerate((1, 3, 1)):  # two continuations of one prompt, one batch
        step(["b", "b2"], sq, seed=20 + i)
    return errors


@pytest.mark.parametrize("world", [1, 2, 3], ids=lambda w: f"W{w}")
def test_logits_equal_full_forward(world):
    for errors in run_distributed(_logits, world):
        assert len(errors) == 2 + 2 * 4 + 2 * 3
        worst = max(errors, key=lambda e: e[-1])
        assert worst[-1] < LOGITS_ATOL, worst


def test_fork_continuations_equal_independent_runs():
    """Single process: fork + two continuations == two sequences prefilled independently."""
    model = tiny_model()
    cache = ShardedKVCache.for_model(model, num_pages=32, page_size=4)
    prompt = tokens(11, seed=4)
    cont = torch.tensor([[7, 8, 9], [1, 2, 3]])
    prefill(model, cache, prompt[None], seq_ids=["p"])
    cache.fork("p", "p2")
    forked = decode_step(model, cache, cont, seq_ids=["p", "p2"])
    prefill(model, cache, torch.stack([prompt, prompt]), seq_ids=["x", "y"])
    independent = decode_step(model, cache, cont, seq_ids=["x", "y"])
    torch.testing.assert_close(forked, independent, rtol=0, atol=1e-6)
    assert cache.pool.allocator.num_shared > 0  # the fork still shares its full prompt pages


def test_bad_model_or_token_ids_raise_and_change_nothing():
    model = tiny_model()
    cache = ShardedKVCache.for_model(model, num_pages=8, page_size=4)
    prefill(model, cache, tokens(6, seed=5)[None], seq_ids=["a"])
    before = (cache.seq_len("a"), cache.pool.allocator.num_used)
    with pytest.raises(ValueError, match=r"token ids of shape \(2, 1\) for 1 sequences"):
        decode_step(model, cache, torch.zeros(2, 1, dtype=torch.long), seq_ids=["a"])
    with pytest.raises(UnknownSequence, match="'zz'"):
        decode_step(model, cache, torch.zeros(1, 1, dtype=torch.long), seq_ids=["zz"])
    torch.manual_seed(0)
    other = Llama(config=LlamaConfig.from_name("tiny", n_kv_heads=4))
    with pytest.raises(ValueError, match=r"\(2, 4, 16\) does not match the cache's \(2, 2, 16\)"):
        decode_step(other, cache, torch.zeros(1, 1, dtype=torch.long), seq_ids=["a"])
    assert (cache.seq_len("a"), cache.pool.allocator.num_used) == before


def test_generate_script_runs_under_torchrun():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["launch/generate.py", "--config", "tiny", "--prompt-len", "64", "--new-tokens", "6"]
    proc = subprocess.run(
        [*cmd, "--check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "prompt tokens     64 (ring prefill 60, chunk 4)" in out
    assert "check vs full-forward greedy: OK" in out
    rows = [line.split() for line in out.splitlines() if line[:4].strip() in ("0", "1")]
    # 30 ring tokens each; then a chunk of 4 and 5 decoded tokens, all within rank 0's first turn
    assert [int(r[1]) for r in rows] == [39, 30]
