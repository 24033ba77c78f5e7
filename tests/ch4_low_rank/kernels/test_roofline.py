"""The roofline model reproduces the figures the chapter quotes (H200-class: 790 TFLOP/s, 4.8 TB/s)."""

import pytest

from chapters.ch4_low_rank.kernels.roofline import (
    H200,
    format_predictions,
    lora_flops,
    roofline_ratios,
    roofline_times,
    variant_kernels,
)

BIG = (4096, 4096, 4096, 16)


def test_base_gemm_time():
    t = roofline_times(*BIG, launch_us=0.0)["base"]
    assert t == pytest.approx(2 * 4096**3 / 790e12 * 1e6)  # compute-bound: 174 us
    assert t == pytest.approx(174.0, abs=0.5)


@pytest.mark.parametrize(
    "variant,expected",
    [
        ("ideal_fused", 1.008),
        ("naive", 1.28),
        ("naive_addmm", 1.12),
        ("split_fused", 1.044),
        ("kloop_fused", 1.129),
    ],
)
def test_ratios_without_launch_cost(variant, expected):
    assert roofline_ratios(*BIG, launch_us=0.0)[variant] == pytest.approx(expected, abs=0.005)


def test_headline_numbers():
    """The design's claims: ideal fused / base about 1.01, naive eager about 1.3."""
    pure = roofline_ratios(*BIG, launch_us=0.0)
    with_launch = roofline_ratios(*BIG)
    assert 1.0 < pure["ideal_fused"] < 1.015
    assert 1.25 < pure["naive"] < 1.35 and 1.3 < with_launch["naive"] < 1.36
    assert pure["ideal_fused"] < pure["split_fused"] < pure["naive_addmm"] < pure["naive"]


def test_rank_64_and_decode():
    r64 = roofline_ratios(4096, 4096, 4096, 64, launch_us=0.0)
    assert r64["kloop_fused"] == pytest.approx(1.516, abs=0.005)  # every N-tile redoes x A^T: +r/BN
    assert r64["ideal_fused"] == pytest.approx(1.031, abs=0.002)
    decode = roofline_ratios(64, 4096, 4096, 16, launch_us=H200.launch_us)
    assert decode["naive"] == pytest.approx(2.11, abs=0.05)  # four extra launches dominate
    assert decode["kloop_fused"] == pytest.approx(1.006, abs=0.003)


def test_kloop_cost_follows_the_tile_width():
    narrow = roofline_ratios(*BIG, launch_us=0.0, block_n=64)["kloop_fused"]
    wide = roofline_ratios(*BIG, launch_us=0.0, block_n=256)["kloop_fused"]
    assert narrow == pytest.approx(1 + 16 / 64 + 16 / 4096, abs=1e-3)
    assert wide == pytest.approx(1 + 16 / 256 + 16 / 4096, abs=1e-3)


def test_bookkeeping():
    kernels = variant_kernels(*BIG)
    assert (
        len(kernels["naive"]) == 5 and len(kernels["naive_addmm"]) == 3 and len(kernels["kloop_fused"]) == 1
    )
    assert lora_flops(*BIG) == kernels["ideal_fused"][0].flops
    text = format_predictions([BIG])
    assert "naive" in text and "4096" in text
