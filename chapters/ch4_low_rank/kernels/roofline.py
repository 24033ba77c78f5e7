"""A roofline time model of the LoRA forward variants, to predict the ratios before measuring them.

Each kernel is charged max(FLOPs / peak FLOP rate, bytes / memory bandwidth) plus a fixed launch cost,
and a variant is the sum of its kernels. Bytes are the minimum traffic: every operand read once and every
output written once; no L2 hits. With y = x W^T + s (x A^T) B^T, x [M, K], W [N, K], A [r, K], B [N, r],
2-byte elements and H200-class numbers (790 TFLOP/s dense bf16, 4.8 TB/s), at M = K = N = 4096, r = 16:

    base GEMM      137 GFLOP, 101 MB          -> compute-bound, 174 us
    naive          + shrink 7 us (reads x again) + expand 7 + scale 14 + add 21  -> 1.28x (1.33x w/ launches)
    naive_addmm    + shrink 7 + expand-accumulate 14 (one read + write of y)    -> 1.12x  (1.15x)
    split_fused    + shrink 7, GEMM over K + r                                  -> 1.044x (1.058x)
    kloop_fused    GEMM + the shrink redone by each of N / BN column tiles      -> 1.129x for BN = 128
    ideal_fused    LoRA FLOPs once, only A and B as extra bytes                 -> 1.008x

So at large M a fused kernel can at best hide the LoRA cost almost entirely, while the eager version
pays about 30%, nearly all of it in memory traffic over [M, N] tensors, not in arithmetic. At decode
sizes (M = 16) the base GEMM is just a 7 us read of W and each extra launch (a few us) dominates.
Pure Python: no torch, no GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class GPUSpec:
    """Peak rates of one GPU. tflops: dense 16-bit tensor-core peak; simt_tflops: float32 CUDA-core peak."""

    name: str
    tflops: float
    tbps: float
    launch_us: float = 2.5
    simt_tflops: float = 67.0


# The figures used in the project's reference note (the official dense bf16 peak of the H200 is about
# 989 TFLOP/s; a sustained 790 is the note's working assumption). Same chip as the H100 SXM.
H200 = GPUSpec("H200 (790 TFLOP/s bf16, 4.8 TB/s)", tflops=790.0, tbps=4.8, launch_us=2.5, simt_tflops=67.0)


@dataclass(frozen=True)
class Kernel:
    """One launch: its floating-point operations and its minimum memory traffic in bytes."""

    name: str
    flops: float
    bytes: float

    def time_us(self, tflops: float, tbps: float, launch_us: float) -> float:
        return max(self.flops / (tflops * 1e12), self.bytes / (tbps * 1e12)) * 1e6 + launch_us


def variant_kernels(
    M: int, K: int, N: int, r: int, block_n: int = 128, elem_bytes: int = 2
) -> dict[str, list[Kernel]]:
    """The kernels each variant launches, with their FLOPs and bytes."""
    e = elem_bytes
    gemm = Kernel("base GEMM x W^T", 2 * M * N * K, e * (M * K + N * K + M * N))
    shrink = Kernel("shrink t = x A^T", 2 * M * K * r, e * (M * K + r * K + M * r))
    expand_new = Kernel("expand u = t B^T", 2 * M * N * r, e * (M * r + N * r + M * N))
    scale = Kernel("scale u * s", M * N, e * 2 * M * N)
    add = Kernel("add y + u", M * N, e * 3 * M * N)
    expand_acc = Kernel("expand y += s t B^T", 2 * M * N * r, e * (M * r + N * r + 2 * M * N))
    merge = Kernel("merge W + s B A", 2 * N * K * r, e * (2 * N * K + N * r + r * K))
    lora_bytes = e * (r * K + N * r)  # A and B
    split_gemm = Kernel("GEMM over K + r", 2 * M * N * (K + r), e * (M * K + N * K + M * N + M * r + N * r))
    n_tiles = math.ceil(N / block_n)  # each column tile recomputes its rows of x A^T
    kloop = Kernel(
        "GEMM + shrink in K loop",
        2 * M * N * K + 2 * M * K * r * n_tiles + 2 * M * N * r,
        e * (M * K + N * K + M * N) + lora_bytes,
    )
    ideal = Kernel(
        "ideal fused", 2 * M * N * K + 2 * M * K * r + 2 * M * N * r, e * (M * K + N * K + M * N) + lora_bytes
    )
    return {
        "base": [gemm],
        "naive": [gemm, shrink, expand_new, scale, add],
        "naive_addmm": [gemm, shrink, expand_acc],
        "merged": [merge, gemm],  # merging on every call; a pre-merged weight costs exactly "base"
        "split_fused": [shrink, split_gemm],
        "kloop_fused": [kloop],
        "ideal_fused": [ideal],
    }


def roofline_times(
    M: int,
    K: int,
    N: int,
    r: int,
    gpu: GPUSpec = H200,
    launch_us: float | None = None,
    block_n: int = 128,
    tflops: float | None = None,
    elem_bytes: int = 2,
) -> dict[str, float]:
    """Predicted microseconds per variant. tflops overrides the compute peak (e.g. gpu.simt_tflops for
    kernels that do not use tensor cores); launch_us overrides the per-launch cost (0: pure roofline)."""
    peak = gpu.tflops if tflops is None else tflops
    launch = gpu.launch_us if launch_us is None else launch_us
    return {
        name: sum(k.time_us(peak, gpu.tbps, launch) for k in kernels)
        for name, kernels in variant_kernels(M, K, N, r, block_n, elem_bytes).items()
    }


def roofline_ratios(
    M: int,
    K: int,
    N: int,
    r: int,
    gpu: GPUSpec = H200,
    launch_us: float | None = None,
    block_n: int = 128,
    tflops: float | None = None,
    elem_bytes: int = 2,
) -> dict[str, float]:
    """Predicted time of each variant divided by the base GEMM's (same engine, same model)."""
    times = roofline_times(M, K, N, r, gpu, launch_us, block_n, tflops, elem_bytes)
    return {name: t / times["base"] for name, t in times.items()}


def lora_flops(M: int, K: int, N: int, r: int) -> float:
    """Useful FLOPs of one LoRA forward (base GEMM + shrink + expand), for TFLOP/s figures."""
    return 2.0 * M * N * K + 2.0 * M * K * r + 2.0 * M * N * r


def format_predictions(shapes: list[tuple[int, int, int, int]], gpu: GPUSpec = H200) -> str:
    """A text table of predicted ratios to the base GEMM, without and with launch costs."""
    names = ["naive", "naive_addmm", "merged", "split_fused", "kloop_fused", "ideal_fused"]
    lines = [
        f"roofline prediction, {gpu.name}; time / base GEMM time (with {gpu.launch_us} us per launch)",
        f"{'M':>6} {'K':>5} {'N':>5} {'r':>3} {'base us':>8} " + " ".join(f"{n:>17}" for n in names),
    ]
    for M, K, N, r in shapes:
        pure = roofline_ratios(M, K, N, r, gpu, launch_us=0.0)
        with_launch = roofline_ratios(M, K, N, r, gpu)
        base_us = roofline_times(M, K, N, r, gpu, launch_us=0.0)["base"]
        cells = " ".join(f"{pure[n]:>7.3f} ({with_launch[n]:>6.3f})" for n in names)
        lines.append(f"{M:>6} {K:>5} {N:>5} {r:>3} {base_us:>8.1f} {cells}")
    return "\n".join(lines)
