"""The ring-efficiency model's arithmetic: message sizes, the max(compute, transfer) rule, the
rate curve, monotonicity in tokens per rank, and the hide-threshold solver."""

from __future__ import annotations

import json

import pytest

from benchmarks import ring_model as rm

LLAMA = rm.Shape(batch=1, q_heads=32, kv_heads=8, head_dim=128, elem_bytes=2)
NVLINK, IB = rm.LINKS
FLAT = rm.Rate({16384: (500.0, 400.0)})


def test_message_bytes_are_kv_and_fp32_dkv_shards():
    kv, dkv = rm.message_bytes(8192, LLAMA)
    assert kv == 2 * 1 * 8192 * 8 * 128 * 2  # K and V, bf16: 32 MiB
    assert dkv == 2 * kv  # the same elements in float32
    assert rm.message_bytes(8192, rm.Shape(kv_heads=32))[0] == 4 * kv


def test_step_flops_half_block_and_backward_factor():
    fwd, fb = rm.step_flops(1024, LLAMA)
    assert fwd == 0.5 * 4 * 32 * 1024**2 * 128
    assert fb == pytest.approx(3.5 * fwd)


def test_transfer_time_is_latency_plus_bytes_over_bandwidth():
    link = rm.Link("x", bandwidth=1e9, latency=1e-5)
    assert rm.transfer_time(2e6, link) == pytest.approx(1e-5 + 2e-3)


@pytest.mark.parametrize("world", [2, 3, 8, 64], ids=lambda w: f"W{w}")
def test_forward_takes_max_of_compute_and_transfer_per_hop(world):
    assert rm.forward_time(world, 2.0, 1.0) == pytest.approx(world * 2.0)  # hidden
    assert rm.forward_time(world, 1.0, 3.0) == pytest.approx((world - 1) * 3.0 + 1.0)
    assert rm.forward_time(1, 2.0, 5.0) == 2.0  # one rank: nothing to send


def test_backward_counts_kv_and_dkv_hops_and_exposes_the_last():
    c, kv, dkv = 10.0, 1.0, 2.0  # compute-bound: only the final dK/dV hop shows
    assert rm.backward_time(8, c, kv, dkv) == pytest.approx(8 * c + dkv)
    c = 2.5  # between: the middle steps carry both messages (3.0 > c), the ends one each
    assert rm.backward_time(4, c, kv, dkv) == pytest.approx(c + 2 * 3.0 + c + dkv)
    assert rm.backward_time(2, c, kv, dkv) == pytest.approx(c + c + dkv)
    assert rm.backward_time(1, c, kv, dkv) == c


def test_efficiency_is_one_for_a_free_link_and_below_otherwise():
    free = {"c_fwd": 1.0, "c_bwd": 2.5, "x_kv": 0.0, "x_dkv": 0.0}
    assert rm.efficiency(8, free) == (pytest.approx(1.0), pytest.approx(1.0))
    slow = {"c_fwd": 1.0, "c_bwd": 2.5, "x_kv": 2.0, "x_dkv": 4.0}
    fwd, fb = rm.efficiency(8, slow)
    assert fwd == pytest.approx(8 / (7 * 2.0 + 1.0))
    assert 0 < fb < 1


def test_rate_curve_interpolates_in_log2_and_is_flat_above():
    rate = rm.anchor_rate("flash")
    assert rate(16384) == (338.0, 312.0)
    mid = rate(8192)  # halfway between 4096 and 16384 in log2
    assert mid[0] == pytest.approx((253.0 + 338.0) / 2)
    assert rate(2**20) == rate(65536)
    assert rate(2048)[0] == pytest.approx(253.0 - (338.0 - 253.0) / 2)  # extrapolated slope
    assert rate(16)[0] == pytest.approx(rm.FLOOR * 338.0)  # floored
    scaled = rm.anchor_rate("flash", tflops=(676.0, 624.0))
    assert scaled(4096)[0] == pytest.approx(2 * 253.0)
    assert rm.anchor_rate("cudnn", flat=True)(2048) == (623.0, 521.0)


@pytest.mark.parametrize("kernel", sorted(rm.ANCHOR_RATES))
@pytest.mark.parametrize("hkv", [8, 32])
def test_efficiency_never_falls_as_tokens_per_rank_grow(kernel, hkv):
    rate = rm.anchor_rate(kernel)
    for link in rm.LINKS:
        for world in rm.WORLDS:
            rows = rm.predict(rm.Shape(kv_heads=hkv), link, rate, worlds=[world])
            for key in ("eff_fwd", "eff_fwdbwd"):
                effs = [r[key] for r in rows]
                assert all(b >= a - 1e-12 for a, b in zip(effs, effs[1:], strict=False)), effs


@pytest.mark.parametrize("which", ["fwd", "bwd"])
@pytest.mark.parametrize("link", rm.LINKS, ids=lambda link: link.name)
def test_hide_threshold_is_where_compute_meets_transfer(which, link):
    n = rm.hide_threshold(LLAMA, link, FLAT, which)
    assert 64 < n < 2**26

    def slack(m):
        t = rm.step_times(m, LLAMA, link, FLAT)
        return t["c_fwd"] - t["x_kv"] if which == "fwd" else t["c_bwd"] - t["x_kv"] - t["x_dkv"]

    assert slack(n * 1.001) >= 0 > slack(n * 0.999)
    if which == "fwd":  # from the threshold up the forward runs at compute speed
        assert rm.efficiency(8, rm.step_times(n * 1.001, LLAMA, link, FLAT))[0] == pytest.approx(1)


def test_slower_link_and_more_kv_heads_need_more_tokens():
    fwd = lambda shape, link: rm.hide_threshold(shape, link, FLAT, "fwd")  # noqa: E731
    assert fwd(LLAMA, IB) > fwd(LLAMA, NVLINK)
    assert fwd(rm.Shape(kv_heads=32), IB) > fwd(LLAMA, IB)


def test_measured_json_gives_rates_from_step_times(tmp_path):
    fwd_flops, fb_flops = rm.step_flops(8192, rm.Shape(kv_heads=32))
    steps = [{"tokens_per_rank": 8192, "fwd_s": fwd_flops / 400e12, "fwdbwd_s": fb_flops / 300e12}]
    path = tmp_path / "steps.json"
    path.write_text(json.dumps({"batch": 1, "q_heads": 32, "head_dim": 128, "steps": steps}))
    rate = rm.measured_rate(path)
    assert rate(8192) == (pytest.approx(400.0), pytest.approx(300.0))
    assert rate(2048) == rate(8192)  # flat outside the measured sizes


def test_main_writes_labelled_results(tmp_path, capsys):
    rm.main(["--out", str(tmp_path / "model"), "--no-plot"])
    assert "MODEL PREDICTION" in capsys.readouterr().out
    result = json.loads((tmp_path / "model.json").read_text())
    assert result["kind"].startswith("model prediction")
    assert len(result["rows"]) == 2 * 2 * len(rm.WORLDS) * len(rm.TOKENS)
    assert (tmp_path / "model.md").exists()
