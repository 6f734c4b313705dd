"""Contract tests for `ring_attention` on W gloo ranks, against a float64 full-sequence reference.

Every rank builds the same full q, k, v, dout from one seed, takes its shard with `shard_sequence`,
runs `ring_attention` and backprops its shard of dout. The parent compares each rank's output, lse
and gradients with the matching rows of the float64 reference, using positions computed here from
DESIGN.md (`expected_positions`), not the library's.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from ringattn import ring_attention, shard_sequence
from tests._harness import DistributedTestError, run_distributed
from tests.test_contract_flash import reference_attention
from tests.test_contract_layout import expected_positions

LAYOUTS = ["contiguous", "zigzag", "striped"]

# fp32 ring vs float64 reference: partials are merged in fp32, so errors stay ~1e-6.
ATOL_OUT = 2e-5  # outputs are O(1): a few fp32 roundings per ring step, bounded generously
ATOL_LSE = 2e-5  # lse is O(log S): same reasoning
RTOL_GRAD = 1e-4  # gradients sum over S keys/queries: bound relative to the largest entry


@dataclass(frozen=True)
class RingCase:
    seq_len: int
    heads_q: int
    heads_kv: int
    head_dim: int
    causal: bool
    layout: str
    batch: int = 2
    softmax_scale: float | None = None

    def tag(self) -> str:
        mask = "causal" if self.causal else "full"
        if self.heads_kv == self.heads_q:
            heads = "mha"
        elif self.heads_kv == 1:
            heads = "mqa"
        else:
            heads = "gqa"
        scale = "" if self.softmax_scale is None else f"-scale{self.softmax_scale}"
        return f"{self.layout}-{mask}-{heads}{scale}"


def full_inputs(case: RingCase, dtype: torch.dtype = torch.float32, seed: int = 0):
    """q, k, v, dout for the whole sequence; identical on every rank and in the parent."""
    gen = torch.Generator().manual_seed(seed)

    def randn(heads: int) -> torch.Tensor:
        return torch.randn(case.batch, case.seq_len, heads, case.head_dim, generator=gen).to(dtype)

    return randn(case.heads_q), randn(case.heads_kv), randn(case.heads_kv), randn(case.heads_q)


def reference(case: RingCase, dtype: torch.dtype = torch.float32) -> dict:
    """Float64 out, lse and gradients of the full sequence."""
    q, k, v, dout = full_inputs(case, dtype)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out, lse = reference_attention(*leaves, causal=case.causal, softmax_scale=case.softmax_scale)
    (out * dout.double()).sum().backward()
    return {
        "out": out.detach(),
        "lse": lse,
        "dq": leaves[0].grad,
        "dk": leaves[1].grad,
        "dv": leaves[2].grad,
    }


@contextmanager
def nan_poisoned_empty() -> Iterator[None]:
    """In a worker, fill `torch.empty`/`torch.empty_like` results with NaN (as conftest does in
    the parent), so reading memory nobody wrote fails every time instead of now and then."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **kw: poison(real_empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(real_empty_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def _ring_worker(
    rank: int,
    world_size: int,
    case: RingCase,
    members: list[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict | None:
    group = None if members is None else dist.new_group(members)
    if members is not None and rank not in members:
        return None
    q, k, v, dout = full_inputs(case, dtype)
    with nan_poisoned_empty():
        local = [
            shard_sequence(t, group=group, layout=case.layout).detach().requires_grad_()
            for t in (q, k, v)
        ]
        kwargs = {"causal": case.causal, "group": group, "layout": case.layout}
        if case.softmax_scale is not None:
            kwargs["softmax_scale"] = case.softmax_scale
        out, lse = ring_attention(*local, return_lse=True, **kwargs)
        out.backward(shard_sequence(dout, group=group, layout=case.layout))
        out_only = ring_attention(*(t.detach() for t in local), **kwargs)
    return {
        "group_rank": rank if group is None else dist.get_group_rank(group, rank),
        "group_size": world_size if group is None else len(members),
        "out": out.detach(),
        "lse": lse.detach(),
        "out_only": out_only,
        "dq": local[0].grad,
        "dk": local[1].grad,
        "dv": local[2].grad,
    }


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    both_inf = torch.isinf(actual) & (actual == expected)
    return (actual - expected).abs().masked_fill(both_inf, 0.0).max().item()


def check_rank_results(case: RingCase, results: list, dtype: torch.dtype = torch.float32) -> None:
    ref = reference(case, dtype)
    checked = 0
    for global_rank, res in enumerate(results):
        if res is None:
            continue
        checked += 1
        where = f"global rank {global_rank} (group rank {res['group_rank']})"
        pos = expected_positions(case.seq_len, res["group_size"], res["group_rank"], case.layout)
        local_len = case.seq_len // res["group_size"]
        assert res["out"].dtype == dtype, f"{where}: out dtype {res['out'].dtype}"
        assert res["out"].shape == (case.batch, local_len, case.heads_q, case.head_dim)
        assert res["lse"].dtype == torch.float32, f"{where}: lse dtype {res['lse'].dtype}"
        assert res["lse"].shape == (case.batch, case.heads_q, local_len), where
        assert isinstance(res["out_only"], torch.Tensor), f"{where}: return_lse=False gave a tuple"
        torch.testing.assert_close(res["out_only"], res["out"], rtol=0, atol=0)
        for name in ("out", "dq", "dk", "dv"):
            assert not torch.isnan(res[name]).any(), f"{where}: NaN in {name}"
        err = max_error(res["out"], ref["out"][:, pos])
        assert err <= ATOL_OUT, f"{where}: out max err {err:.3e}"
        err = max_error(res["lse"], ref["lse"][:, :, pos])
        assert err <= ATOL_LSE, f"{where}: lse max err {err:.3e}"
        for name in ("dq", "dk", "dv"):
            expected = ref[name][:, pos]
            bound = RTOL_GRAD * max(1.0, ref[name].abs().max().item())
            err = max_error(res[name], expected)
            assert err <= bound, f"{where}: {name} max err {err:.3e} > {bound:.3e}"
    assert checked > 0


MATRIX = [
    (w, RingCase(48, 4, 2, 16, causal, layout))
    for w in (1, 2, 3, 4)
    for layout in LAYOUTS
    for causal in (True, False)
]


@pytest.mark.parametrize(("world_size", "case"), MATRIX, ids=[f"W{w}-{c.tag()}" for w, c in MATRIX])
def test_ring_attention_matches_full_sequence_float64(world_size: int, case: RingCase) -> None:
    results = run_distributed(_ring_worker, world_size, case, timeout=60.0)
    check_rank_results(case, results)


HEAD_CASES = [
    (3, RingCase(36, 3, 3, 40, True, "zigzag", batch=1)),
    (2, RingCase(40, 4, 1, 24, True, "striped", batch=1)),
    (4, RingCase(32, 6, 2, 8, False, "contiguous", batch=1)),
    (3, RingCase(24, 2, 2, 8, True, "zigzag", batch=1, softmax_scale=0.8)),
]


@pytest.mark.parametrize(
    ("world_size", "case"), HEAD_CASES, ids=[f"W{w}-{c.tag()}" for w, c in HEAD_CASES]
)
def test_ring_attention_mha_mqa_and_other_head_dims(world_size: int, case: RingCase) -> None:
    results = run_distributed(_ring_worker, world_size, case, timeout=60.0)
    check_rank_results(case, results)


SUBGROUPS = [
    (3, [1, 2], "zigzag"),
    (4, [0, 2], "striped"),
    (4, [3, 1], "zigzag"),
    (4, [1, 2, 3], "contiguous"),
]


@pytest.mark.parametrize(
    ("world_size", "members", "layout"),
    SUBGROUPS,
    ids=[f"W{w}-group{''.join(map(str, m))}-{lay}" for w, m, lay in SUBGROUPS],
)
def test_ring_attention_on_sub_group(world_size: int, members: list[int], layout: str) -> None:
    case = RingCase(24, 4, 2, 8, True, layout)
    results = run_distributed(_ring_worker, world_size, case, members, timeout=60.0)
    for rank, res in enumerate(results):
        assert (res is None) == (rank not in members)
    check_rank_results(case, results)


def _errors(world_size: int, case: RingCase, dtype: torch.dtype) -> dict[str, float]:
    """Max abs error of out and dq over all ranks, each over max(1, |reference|.max())."""
    results = run_distributed(_ring_worker, world_size, case, None, dtype, timeout=60.0)
    ref = reference(case, dtype)
    errors = {"out": 0.0, "dq": 0.0}
    for res in results:
        assert res["out"].dtype == dtype
        pos = expected_positions(case.seq_len, world_size, res["group_rank"], case.layout)
        for name in errors:
            scale = max(1.0, ref[name].abs().max().item())
            err = max_error(res[name], ref[name][:, pos]) / scale
            errors[name] = max(errors[name], err)
    return errors


@pytest.mark.parametrize(
    ("dtype", "floor"),
    [
        # fp32: errors are ~1e-6 relative; the floor absorbs summation-order noise of that size.
        (torch.float32, 5e-7),
        # bf16: fp32 accumulation means W=4 rounds once like W=1; a per-step cast would not.
        (torch.bfloat16, 1e-3),
    ],
    ids=["fp32", "bf16"],
)
def test_ring_error_does_not_grow_with_world_size(dtype: torch.dtype, floor: float) -> None:
    case = RingCase(256, 2, 1, 16, True, "zigzag", batch=1)
    errors_1 = _errors(1, case, dtype)
    errors_4 = _errors(4, case, dtype)
    for name, err_1 in errors_1.items():
        err_4 = errors_4[name]
        assert err_4 <= 1.5 * err_1 + floor, f"{name}: W=4 err {err_4:.3e} vs W=1 {err_1:.3e}"


# ---------------------------------------------------------------- bad input and failures


def _capture_ring_error(q, k, v, group, **kwargs) -> str:
    try:
        ring_attention(q, k, v, group=group, **kwargs)
    except ValueError as err:
        return str(err)
    return "NO ERROR"


def _bad_input_worker(rank: int, world_size: int, name: str) -> dict:
    group = dist.new_group(list(range(world_size)))  # fresh group: a wrong call cannot stall others
    bad = {
        "head-dim-16-vs-24": ((1, 8, 4, 16), (1, 8, 4, 24), (1, 8, 4, 24), {}),
        "kv-seq-10-vs-14": ((1, 10, 4, 16), (1, 10, 4, 16), (1, 14, 4, 16), {}),
        "heads-6-vs-4": ((1, 8, 6, 16), (1, 8, 4, 16), (1, 8, 4, 16), {}),
        "dtype-fp16-k": ((1, 8, 4, 16), (1, 8, 4, 16), (1, 8, 4, 16), {"k": torch.float16}),
        "layout-diagonal": ((1, 8, 4, 16), (1, 8, 4, 16), (1, 8, 4, 16), {"layout": "diagonal"}),
    }[name]
    q_shape, k_shape, v_shape, extra = bad
    q = torch.randn(*q_shape)
    k = torch.randn(*k_shape).to(extra.pop("k", torch.float32))
    v = torch.randn(*v_shape)
    message = _capture_ring_error(q, k, v, group, causal=True, **extra)
    # Nothing corrupted: a correct call on the same group right after still gives the right answer.
    case = RingCase(24, 2, 1, 8, True, "zigzag", batch=1)
    fq, fk, fv, _ = full_inputs(case)
    local = [shard_sequence(t, group=group, layout=case.layout) for t in (fq, fk, fv)]
    out = ring_attention(*local, causal=True, group=group, layout=case.layout)
    return {"message": message, "out": out, "rank": rank}


BAD_RING = {
    "head-dim-16-vs-24": ["16", "24"],
    "kv-seq-10-vs-14": ["10", "14"],
    "heads-6-vs-4": ["6", "4"],
    "dtype-fp16-k": ["float16"],
    "layout-diagonal": ["diagonal"],
}


@pytest.mark.parametrize("name", list(BAD_RING))
@pytest.mark.parametrize("world_size", [2, 3], ids=["W2", "W3"])
def test_ring_bad_input_raises_value_error_on_every_rank(world_size: int, name: str) -> None:
    results = run_distributed(_bad_input_worker, world_size, name, timeout=60.0)
    case = RingCase(24, 2, 1, 8, True, "zigzag", batch=1)
    ref = reference(case)["out"]
    for rank, res in enumerate(results):
        message = res["message"]
        assert message != "NO ERROR", f"rank {rank}: no ValueError"
        for token in BAD_RING[name]:
            assert token in message, f"rank {rank}: {message!r} does not quote {token!r}"
        pos = expected_positions(case.seq_len, world_size, rank, case.layout)
        assert max_error(res["out"], ref[:, pos]) <= ATOL_OUT


def _uneven_lengths_worker(rank: int, world_size: int, lengths: list[int]) -> str:
    group = dist.new_group(list(range(world_size)))
    local_len = lengths[rank]
    q, k, v = (torch.randn(1, local_len, 2, 8) for _ in range(3))
    return _capture_ring_error(q, k, v, group, causal=True)


@pytest.mark.parametrize(
    ("world_size", "lengths"), [(2, [8, 12]), (3, [8, 8, 12])], ids=["W2-8-12", "W3-8-8-12"]
)
def test_ring_validate_rejects_different_local_lengths_on_every_rank(
    monkeypatch: pytest.MonkeyPatch, world_size: int, lengths: list[int]
) -> None:
    monkeypatch.setenv("RINGATTN_VALIDATE", "1")
    monkeypatch.setenv("RINGATTN_COMM_TIMEOUT", "5")  # a rank that skips validation fails fast
    messages = run_distributed(_uneven_lengths_worker, world_size, lengths, timeout=30.0)
    for rank, message in enumerate(messages):
        assert message != "NO ERROR", f"rank {rank}: no ValueError"
        assert "8" in message and "12" in message, f"rank {rank}: {message!r}"


def _peer_absent_worker(rank: int, world_size: int) -> dict | None:
    group = dist.new_group([0, 1])  # used for nothing else, so a stalled op cannot leak
    if rank == 1:
        return None
    q, k, v = (torch.randn(1, 8, 2, 8) for _ in range(3))
    start = time.monotonic()
    try:
        ring_attention(q, k, v, causal=True, group=group)
    except Exception as err:  # noqa: BLE001 - any error class is fine, its message is checked
        return {"message": f"{type(err).__name__}: {err}", "elapsed": time.monotonic() - start}
    return {"message": "NO ERROR", "elapsed": time.monotonic() - start}


def test_ring_absent_peer_times_out_naming_the_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RINGATTN_COMM_TIMEOUT", "2")
    results = run_distributed(_peer_absent_worker, 2, timeout=30.0)
    assert results[1] is None
    message, elapsed = results[0]["message"], results[0]["elapsed"]
    assert message != "NO ERROR", "ring_attention returned although rank 1 never took part"
    assert re.search(r"\b(rank|peer)\b\D{0,16}\b1\b", message, re.IGNORECASE), message
    assert re.search(r"time", message, re.IGNORECASE), message
    assert elapsed < 10.0, f"gave up after {elapsed:.1f}s with RINGATTN_COMM_TIMEOUT=2"


def _peer_raises_worker(rank: int, world_size: int) -> str:
    group = dist.new_group([0, 1])  # used for nothing else, so a stalled op cannot leak
    if rank == 1:
        raise RuntimeError("rank 1 gives up before the ring")
    q, k, v = (torch.randn(1, 8, 2, 8) for _ in range(3))
    ring_attention(q, k, v, causal=True, group=group)
    return "finished"


def test_ring_peer_that_raises_fails_the_run_quickly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RINGATTN_COMM_TIMEOUT", "3")
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match="gives up before the ring"):
        run_distributed(_peer_raises_worker, 2, timeout=30.0)
    assert time.monotonic() - start < 20.0
