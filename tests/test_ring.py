"""ring_attention on W gloo ranks against full-sequence float64 attention."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

import ringattn
from ringattn.layout import LAYOUTS
from tests._harness import run_distributed
from tests._reference import max_err, reference_attention


def full_problem(seq_len, hq, hkv, d, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(batch, seq_len, h, d, generator=g) for h in (hq, hkv, hkv, hq))
    return q, k, v, do


def ring_errors(q, k, v, do, *, causal, layout, group=None, dtype=torch.float32, backend=None):
    """This rank's max errors of (out, lse, dq, dk, dv) vs float64 full attention."""
    d = q.shape[-1]
    ref_out, ref_lse, ref_grads = reference_attention(
        q, k, v, scale=d**-0.5, offset=0 if causal else None, do=do
    )
    shard = lambda x, dim=1: ringattn.shard_sequence(x, group=group, dim=dim, layout=layout)  # noqa: E731
    ql, kl, vl = (shard(x).to(dtype).requires_grad_() for x in (q, k, v))
    out, lse = ringattn.ring_attention(
        ql, kl, vl, causal=causal, layout=layout, group=group, return_lse=True, backend=backend
    )
    out.backward(shard(do).to(dtype))
    errs = [max_err(out, shard(ref_out)), max_err(lse, shard(ref_lse, dim=2))]
    errs += [max_err(t.grad, shard(r)) for t, r in zip((ql, kl, vl), ref_grads, strict=True)]
    return errs


def _matrix(rank, world, seq_len):
    """Every layout x causal x (GQA, MHA) on this world; max error per config."""
    results = {}
    for layout, causal, (hq, hkv) in itertools.product(LAYOUTS, (True, False), ((4, 2), (2, 2))):
        q, k, v, do = full_problem(seq_len, hq, hkv, d=12)
        results[(layout, causal, hq, hkv)] = max(
            ring_errors(q, k, v, do, causal=causal, layout=layout)
        )
    return results


@pytest.mark.parametrize("world", [1, 2, 3, 4], ids=lambda w: f"W{w}")
def test_ring_matches_full_attention(world):
    # S = 24 splits for every layout at W <= 4 (zigzag needs S % 2W == 0).
    for rank_results in run_distributed(_matrix, world, 24):
        for config, err in rank_results.items():
            assert err < 2e-5, f"W{world} {config}: max error {err:.2e}"


def _error_growth(rank, world):
    q, k, v, do = full_problem(48, 4, 2, 16, seed=1)
    return max(ring_errors(q, k, v, do, causal=True, layout="zigzag"))


def test_error_does_not_grow_with_world_size():
    base = max(run_distributed(_error_growth, 1))
    wide = max(run_distributed(_error_growth, 4))
    # Partials merge in fp32 and are cast once: W=4 stays within 1.5x of W=1 (+1 ulp-ish floor).
    assert wide <= 1.5 * base + 1e-7, (base, wide)


def _low_precision(rank, world, dtype):
    q, k, v, do = full_problem(32, 4, 2, 16, seed=2)
    ring = ring_errors(q, k, v, do, causal=True, layout="zigzag", dtype=dtype)
    naive = reference_attention(q, k, v, scale=0.25, offset=0, do=do, dtype=dtype)
    ref = reference_attention(q, k, v, scale=0.25, offset=0, do=do)
    naive_errs = [max_err(naive[0], ref[0]), max_err(naive[1], ref[1])]
    naive_errs += [max_err(a, b) for a, b in zip(naive[2], ref[2], strict=True)]
    return ring, naive_errs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_ring_low_precision_within_twice_naive_error(dtype):
    from tests._reference import bound

    for ring, naive in run_distributed(_low_precision, 2, dtype):
        for name, r, n in zip(("out", "lse", "dq", "dk", "dv"), ring, naive, strict=True):
            # local shards vs the naive full-sequence error in the same dtype
            assert r <= bound(dtype, "torch", n), f"{name}: {r:.2e} vs naive {n:.2e}"


def _subgroup(rank, world, members):
    group = dist.new_group(members)
    if rank not in members:
        return None
    q, k, v, do = full_problem(24, 4, 2, 8, seed=3)
    return max(ring_errors(q, k, v, do, causal=True, layout="zigzag", group=group))


@pytest.mark.parametrize("members", [[1, 2], [3, 1, 0]], ids=["ranks1-2", "ranks3-1-0"])
def test_ring_on_a_subgroup(members):
    results = run_distributed(_subgroup, 4, members)
    for rank, err in enumerate(results):
        if rank in members:
            assert err < 2e-5, (rank, err)
        else:
            assert err is None


def _striped_short(rank, world):
    # One token per rank: under striped causal, a later rank's keys are all invisible to an
    # earlier rank's single query (a fully skipped step) and the first token sees only itself.
    q, k, v, do = full_problem(3, 2, 1, 8, seed=4)
    return max(ring_errors(q, k, v, do, causal=True, layout="striped"))


def test_striped_one_token_per_rank():
    assert max(run_distributed(_striped_short, 3)) < 2e-5


def _catch(fn):
    try:
        fn()
    except ValueError as err:
        return str(err)
    return None


def _bad_inputs(rank, world):
    x = torch.randn(1, 4, 4, 8)
    kv = torch.randn(1, 4, 2, 8)
    return {
        "kv-shape": _catch(lambda: ringattn.ring_attention(x, kv, kv[:, :3])),
        "dtype": _catch(lambda: ringattn.ring_attention(x, kv.double(), kv)),
        "heads": _catch(lambda: ringattn.ring_attention(x[:, :, :3], kv, kv)),
        "layout": _catch(lambda: ringattn.ring_attention(x, kv, kv, layout="spiral")),
        "indivisible": _catch(lambda: ringattn.ring_attention(x[:, :3], kv[:, :3], kv[:, :3])),
    }


def test_bad_input_raises_on_every_rank():
    expected = {
        "kv-shape": "k and v shapes differ",
        "dtype": "dtypes differ",
        "heads": "query heads (3) must be a multiple of key/value heads (2)",
        "layout": "unknown layout 'spiral'",
        "indivisible": "multiple of 6; got 9",
    }
    for messages in run_distributed(_bad_inputs, 3):
        for case, fragment in expected.items():
            assert messages[case] is not None and fragment in messages[case], (case, messages)


def _uneven_lengths(rank, world):
    n = 4 if rank == 0 else 6
    x, kv = torch.randn(1, n, 2, 8), torch.randn(1, n, 2, 8)
    return _catch(lambda: ringattn.ring_attention(x, kv, kv))


def test_ranks_with_different_lengths_raise_everywhere(monkeypatch):
    monkeypatch.setenv("RINGATTN_VALIDATE", "1")
    for message in run_distributed(_uneven_lengths, 2, timeout=30):
        assert message is not None and "(1, 4, 2, 8)" in message and "(1, 6, 2, 8)" in message


def _one_rank_bad(rank, world):
    q = torch.randn(1, 4, 3 if rank == 1 else 2, 8)
    kv = torch.randn(1, 4, 2, 8)
    return _catch(lambda: ringattn.ring_attention(q, kv, kv))


def test_one_bad_rank_fails_every_rank_with_validation(monkeypatch):
    monkeypatch.setenv("RINGATTN_VALIDATE", "1")
    for message in run_distributed(_one_rank_bad, 2, timeout=30):
        assert message is not None and "rank 1" in message and "(3)" in message
