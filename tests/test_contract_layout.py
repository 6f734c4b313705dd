"""Contract tests for `shard_sequence`, `gather_sequence` and `sequence_positions`.

The expected layouts are written out here from DESIGN.md, not taken from the library:
- contiguous: rank r holds tokens [r*S/W, (r+1)*S/W);
- zigzag: 2W equal chunks, rank r holds chunks r and 2W-1-r, in that order;
- striped: rank r holds tokens r, r+W, r+2W, ...
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from ringattn import gather_sequence, sequence_positions, shard_sequence
from tests._harness import run_distributed

LAYOUTS = ["contiguous", "zigzag", "striped"]
WORLD_SIZES = [1, 2, 3, 4]
SEQ_LEN = 48  # divisible by 2W for every W in 1..4


def expected_positions(seq_len: int, world_size: int, rank: int, layout: str) -> torch.Tensor:
    """Global token positions that `rank` of `world_size` holds, straight from DESIGN.md."""
    if layout == "contiguous":
        size = seq_len // world_size
        return torch.arange(rank * size, (rank + 1) * size)
    if layout == "zigzag":
        chunk = seq_len // (2 * world_size)
        first = torch.arange(rank * chunk, (rank + 1) * chunk)
        last_index = 2 * world_size - 1 - rank
        second = torch.arange(last_index * chunk, (last_index + 1) * chunk)
        return torch.cat([first, second])
    if layout == "striped":
        return torch.arange(rank, seq_len, world_size)
    raise AssertionError(layout)


def test_expected_positions_helper_partitions_the_sequence() -> None:
    """Guard the test's own helper: every layout is a partition of range(S)."""
    for world_size in WORLD_SIZES:
        for layout in LAYOUTS:
            parts = [expected_positions(24, world_size, r, layout) for r in range(world_size)]
            assert torch.equal(torch.cat(parts).sort().values, torch.arange(24))
    assert expected_positions(12, 3, 1, "zigzag").tolist() == [2, 3, 8, 9]


def full_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A BSHD tensor [2, S, 3, 4] and a BHSD tensor [2, 3, S, 4], identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    bshd = torch.randn(2, SEQ_LEN, 3, 4, generator=gen)
    bhsd = torch.randn(2, 3, SEQ_LEN, 4, generator=gen)
    return bshd, bhsd


def _layout_worker(rank: int, world_size: int, layout: str) -> dict:
    bshd, bhsd = full_tensors()
    local = shard_sequence(bshd, layout=layout)
    local_dim2 = shard_sequence(bhsd, dim=2, layout=layout)
    local_neg = shard_sequence(bhsd, dim=-2, layout=layout)
    return {
        "rank": dist.get_rank(),
        "positions": sequence_positions(SEQ_LEN, layout=layout),
        "local": local,
        "gathered": gather_sequence(local, layout=layout),
        "local_dim2": local_dim2,
        "gathered_dim2": gather_sequence(local_dim2, dim=2, layout=layout),
        "local_neg": local_neg,
        "gathered_neg": gather_sequence(local_neg, dim=-2, layout=layout),
    }


def _id(world_size: int, layout: str) -> str:
    return f"W{world_size}-{layout}"


@pytest.mark.parametrize(
    ("world_size", "layout"),
    [(w, lay) for w in WORLD_SIZES for lay in LAYOUTS],
    ids=[_id(w, lay) for w in WORLD_SIZES for lay in LAYOUTS],
)
def test_layout_positions_shard_and_gather(world_size: int, layout: str) -> None:
    results = run_distributed(_layout_worker, world_size, layout, timeout=60.0)
    bshd, bhsd = full_tensors()
    for rank, res in enumerate(results):
        assert res["rank"] == rank
        expected = expected_positions(SEQ_LEN, world_size, rank, layout)
        positions = res["positions"]
        assert positions.dtype == torch.int64, f"positions dtype {positions.dtype}"
        assert positions.tolist() == expected.tolist(), f"rank {rank}: {positions.tolist()}"
        assert torch.equal(res["local"], bshd[:, expected])
        assert torch.equal(res["gathered"], bshd)
        assert torch.equal(res["local_dim2"], bhsd[:, :, expected])
        assert torch.equal(res["gathered_dim2"], bhsd)
        assert torch.equal(res["local_neg"], bhsd[:, :, expected])
        assert torch.equal(res["gathered_neg"], bhsd)


def _capture_value_error(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except ValueError as err:
        return str(err)
    return "NO ERROR"


def _bad_layout_worker(rank: int, world_size: int, seq_len: int, layout: str) -> dict:
    x = torch.zeros(1, seq_len, 2, 4)
    return {
        "shard": _capture_value_error(shard_sequence, x, layout=layout),
        "positions": _capture_value_error(sequence_positions, seq_len, layout=layout),
    }


# (W, layout, S, required multiple): S is a multiple of W but not of 2W in the zigzag cases.
INDIVISIBLE = [
    (1, "zigzag", 5, 2),
    (2, "zigzag", 6, 4),
    (3, "zigzag", 21, 6),
    (4, "zigzag", 12, 8),
    (3, "contiguous", 10, 3),
    (4, "contiguous", 18, 4),
    (3, "striped", 11, 3),
    (2, "striped", 9, 2),
]


@pytest.mark.parametrize(
    ("world_size", "layout", "seq_len", "multiple"),
    INDIVISIBLE,
    ids=[f"W{w}-{lay}-S{s}" for w, lay, s, _ in INDIVISIBLE],
)
def test_indivisible_length_raises_naming_required_multiple(
    world_size: int, layout: str, seq_len: int, multiple: int
) -> None:
    results = run_distributed(_bad_layout_worker, world_size, seq_len, layout, timeout=60.0)
    for rank, res in enumerate(results):
        for what, message in res.items():
            assert message != "NO ERROR", f"rank {rank} {what}: no ValueError for S={seq_len}"
            assert re.search(rf"\b{multiple}\b", message), (
                f"rank {rank} {what}: {message!r} does not name the multiple {multiple}"
            )


def _unknown_layout_worker(rank: int, world_size: int) -> dict:
    x = torch.zeros(1, 12, 2, 4)
    return {
        "shard": _capture_value_error(shard_sequence, x, layout="diagonal"),
        "gather": _capture_value_error(gather_sequence, x, layout="diagonal"),
        "positions": _capture_value_error(sequence_positions, 12, layout="diagonal"),
    }


@pytest.mark.parametrize("world_size", [1, 2], ids=["W1", "W2"])
def test_unknown_layout_raises_value_error(world_size: int) -> None:
    results = run_distributed(_unknown_layout_worker, world_size, timeout=60.0)
    for rank, res in enumerate(results):
        for what, message in res.items():
            assert message != "NO ERROR", f"rank {rank} {what}: no ValueError"
            assert "diagonal" in message, f"rank {rank} {what}: {message!r}"


def _subgroup_layout_worker(rank: int, world_size: int, members: list[int]) -> dict | None:
    group = dist.new_group(members)
    if rank not in members:
        return None
    bshd, _ = full_tensors()
    local = shard_sequence(bshd, group=group, layout="zigzag")
    return {
        "group_rank": dist.get_group_rank(group, rank),
        "positions": sequence_positions(SEQ_LEN, group=group, layout="zigzag"),
        "local": local,
        "gathered": gather_sequence(local, group=group, layout="zigzag"),
    }


@pytest.mark.parametrize(
    ("world_size", "members"), [(3, [1, 2]), (4, [3, 1])], ids=["W3-group12", "W4-group31"]
)
def test_layout_on_sub_group_uses_group_ranks(world_size: int, members: list[int]) -> None:
    results = run_distributed(_subgroup_layout_worker, world_size, members, timeout=60.0)
    bshd, _ = full_tensors()
    for rank, res in enumerate(results):
        if rank not in members:
            assert res is None
            continue
        expected = expected_positions(SEQ_LEN, len(members), res["group_rank"], "zigzag")
        assert res["positions"].tolist() == expected.tolist()
        assert torch.equal(res["local"], bshd[:, expected])
        assert torch.equal(res["gathered"], bshd)
