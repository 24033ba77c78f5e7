"""The roofline model reproduces the figures the chapter quotes (H200-class: 790 TFLOP/s, 4.8 TB/s)."""

import pytest

from chapters.ch4_low_rank.kernels.roofline import (
    CUDA_SM90,
    H200,
    TRITON_SM90,
    busy_share,
    ctas_per_sm,
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
    assert len(kernels["split_fused"]) == 2 and len(variant_kernels(*BIG, split_k=2)["split_fused"]) == 3
    assert lora_flops(*BIG) == kernels["ideal_fused"][0].flops
    text = format_predictions([BIG])
    assert "naive" in text and "4096" in text


# ---- the kernels as written: A re-read per tile, occupancy, the split shrink's memset ----------------


def test_kloop_reads_A_once_per_program():
    """M = 16 with 16 x 32 tiles and r = 64: 128 programs each read A [64, 4096] (512 KiB) through L2."""
    decode = dict(block_n=32, block_m=16)
    (kloop,) = variant_kernels(16, 4096, 4096, 64, **decode)["kloop_fused"]
    assert kloop.l2_bytes - kloop.bytes == pytest.approx(2 * 64 * 4096 * 127)  # 66.6 MB beyond the minimum
    assert kloop.l2_bytes / 1e6 == pytest.approx(101.4, abs=0.1)
    t = roofline_times(16, 4096, 4096, 64, launch_us=0.0, **decode)
    assert t["kloop_fused"] == pytest.approx(kloop.l2_bytes / 12e12 * 1e6)  # L2-bound: 8.5 us
    assert t["kloop_fused"] / t["base"] == pytest.approx(1.20, abs=0.005)
    # r = 16: a quarter of the re-reads, hidden behind the read of W
    assert roofline_ratios(16, 4096, 4096, 16, launch_us=0.0, **decode)["kloop_fused"] == pytest.approx(1.0, abs=0.01)
    # without block_m the minimum-traffic model charges A once
    assert roofline_ratios(16, 4096, 4096, 64, launch_us=0.0, block_n=32)["kloop_fused"] < 1.05


@pytest.mark.parametrize(
    "key,ctas",
    [
        (("kloop", 128, 64), 1),  # 149 registers x 256 threads, 136 KiB of shared memory
        (("base", 128, 16), 2),
        (("split", 128, 64), 2),
        (("kloop", 64, 64), 2),
        (("base", 64, 16), 3),
        (("base", 16, 16), 6),
        (("kloop", 16, 64), 2),
    ],
)
def test_triton_occupancy(key, ctas):
    assert ctas_per_sm(*TRITON_SM90[key]) == ctas


def test_cuda_occupancy():
    keys = [("base", 16), ("kloop", 16), ("kloop", 32), ("kloop", 64)]
    assert [ctas_per_sm(*CUDA_SM90[k]) for k in keys] == [4, 3, 2, 2]  # 56, 80, 126, 127 registers


def test_ctas_per_sm_limits():
    assert ctas_per_sm(32, 0, 4) == 16  # threads: 2048 / 128
    assert ctas_per_sm(255, 0, 8) == 1  # registers: 256 x 256 = 65536
    assert ctas_per_sm(32, 100 * 1024, 1) == 2  # shared memory
    assert busy_share(1) == pytest.approx(0.7) and busy_share(2) == pytest.approx(0.91)


def test_occupancy_slows_the_kloop_kernel_at_rank_64():
    """At M = 4096, r = 64 the K-loop kernel holds 1 CTA per SM against the base's 2: 0.91 / 0.7 = 1.3x."""
    occ = {"base": 2, "kloop": 1}
    plain = roofline_ratios(4096, 4096, 4096, 64, launch_us=0.0)["kloop_fused"]
    with_occ = roofline_ratios(4096, 4096, 4096, 64, launch_us=0.0, ctas=occ)["kloop_fused"]
    assert with_occ == pytest.approx(plain * 1.3, rel=1e-9)
    assert with_occ == pytest.approx(1.971, abs=0.005)
    same = roofline_ratios(*BIG, launch_us=0.0, ctas={"base": 2, "kloop": 2})["kloop_fused"]
    assert same == pytest.approx(1.129, abs=0.005)  # as many CTAs as the base: no change


def test_split_shrink_memset_is_a_third_launch():
    one = roofline_times(16, 4096, 4096, 16, split_k=1)
    many = roofline_times(16, 4096, 4096, 16, split_k=32)
    assert many["split_fused"] - one["split_fused"] == pytest.approx(H200.launch_us, abs=0.05)
    assert many["naive_addmm_splitk"] - one["naive_addmm_splitk"] == pytest.approx(H200.launch_us, abs=0.05)
    assert roofline_ratios(16, 4096, 4096, 16, split_k=32)["split_fused"] == pytest.approx(1.534, abs=0.005)
