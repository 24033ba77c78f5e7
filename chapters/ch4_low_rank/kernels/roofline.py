"""A roofline time model of the LoRA forward variants, to predict the ratios before measuring them.

Each kernel is charged the largest of three times, compute (FLOPs / peak FLOP rate), memory (bytes /
HBM bandwidth) and L2 (bytes read through L2 / L2 bandwidth), plus a fixed launch cost; a variant is the
sum of its kernels. Memory bytes are the minimum traffic: every operand read once, every output written
once. With y = x W^T + s (x A^T) B^T, x [M, K], W [N, K], A [r, K], B [N, r], 2-byte elements and
H200-class numbers (790 TFLOP/s dense bf16, 4.8 TB/s), at M = K = N = 4096, r = 16:

    base GEMM      137 GFLOP, 101 MB          -> compute-bound, 174 us
    naive          + shrink 7 us (reads x again) + expand 7 + scale 14 + add 21  -> 1.28x (1.33x w/ launches)
    naive_addmm    + shrink 7 + expand-accumulate 14 (one read + write of y)    -> 1.12x  (1.15x)
    split_fused    + shrink 7, GEMM over K + r                                  -> 1.044x (1.058x)
    kloop_fused    GEMM + the shrink redone by each of N / BN column tiles      -> 1.129x for BN = 128
    ideal_fused    LoRA FLOPs once, only A and B as extra bytes                 -> 1.008x

Three effects of the kernels *as written* are charged as well, when the caller says so:

- The K-loop kernel reads its A tile [r, K] once per program, i.e. ceil(M / BM) * ceil(N / BN) times,
  from L2 (`block_m`). At M = 16 with 16 x 32 tiles and r = 64 that is 67 MB of L2 reads for a 34 MB
  GEMM; the minimum-traffic model would charge A once (0.5 MB).
- Occupancy (`ctas`): how many programs (CTAs) of a kernel fit on one SM, from its registers and shared
  memory (`ctas_per_sm`). With fewer resident CTAs the SM has less work to switch to while one waits.
  Model: each resident CTA keeps the SM busy a share `cta_busy` of the time, independently, so c CTAs
  keep it busy 1 - (1 - cta_busy)^c of the time; a kernel's time is scaled by that share for the base
  GEMM over its own. With cta_busy = 0.7: 1 CTA against 2 costs 1.3x, 2 against 3 about 1.07x.
- The split-K shrink adds into a zeroed buffer: a memset, i.e. one more launch (`split_k` > 1).

So at large M a fused kernel can at best hide the LoRA cost almost entirely, while the eager version
pays about 30%, nearly all of it in memory traffic over [M, N] tensors, not in arithmetic. At decode
sizes (M = 16) the base GEMM is just a 7 us read of W and each extra launch (a few us) dominates.
The L2 bandwidth and cta_busy are working assumptions, not datasheet figures: the benchmark tests them.
Pure Python: no torch, no GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class GPUSpec:
    """One GPU. tflops: dense 16-bit tensor-core peak; tbps: HBM bandwidth; l2_tbps: L2 read bandwidth
    (assumed); simt_tflops: what the CUDA-core kernels of lora_cuda.cu can reach (see H200); the rest are
    the per-SM limits that decide occupancy, and cta_busy the occupancy model's assumption."""

    name: str
    tflops: float
    tbps: float
    launch_us: float = 2.5
    simt_tflops: float = 33.0
    l2_tbps: float = 12.0
    sms: int = 132
    regs_per_sm: int = 65536
    shared_per_sm: int = 228 * 1024
    threads_per_sm: int = 2048
    ctas_per_sm_max: int = 32
    cta_busy: float = 0.7


# The figures used in the project's reference note (the official dense bf16 peak of the H200 is about
# 989 TFLOP/s; a sustained 790 is the note's working assumption). Same chip as the H100 SXM: 132 SMs,
# 67 TFLOP/s of float32 FMA on the CUDA cores. The CUDA kernels issue 8 shared-memory loads per 16 FMAs
# (each thread reads 4 x and 4 W values per k for its 4 x 4 outputs); an SM serves one warp-wide shared
# load per clock but four warp-wide FMAs, so at best the FMA units work half the time: 33 TFLOP/s.
H200 = GPUSpec("H200 (790 TFLOP/s bf16, 4.8 TB/s)", tflops=790.0, tbps=4.8, launch_us=2.5)


def ctas_per_sm(regs: int, shared_bytes: int, warps: int, gpu: GPUSpec = H200) -> int:
    """Programs (CTAs) of one kernel that fit on an SM at once: the tightest of registers (allocated per
    warp in units of 256, i.e. per thread rounded up to 8), shared memory (+1 KiB reserved per CTA),
    threads, and the CTA limit."""
    regs_per_warp = math.ceil(regs / 8) * 8 * 32
    by_regs = (gpu.regs_per_sm // regs_per_warp) // warps
    by_shared = gpu.shared_per_sm // (shared_bytes + 1024) if shared_bytes else gpu.ctas_per_sm_max
    by_threads = gpu.threads_per_sm // (32 * warps)
    return max(0, min(by_regs, by_shared, by_threads, gpu.ctas_per_sm_max))


def busy_share(ctas: int, gpu: GPUSpec = H200) -> float:
    """Share of the time an SM with `ctas` resident CTAs has work to issue: 1 - (1 - cta_busy)^ctas."""
    return 1.0 - (1.0 - gpu.cta_busy) ** ctas


# Registers, shared memory and warps per program on sm_90 in bf16, read from the compilers (aot.py for
# Triton: cuobjdump's REG count and the compiled kernel's shared memory; nvcc -Xptxas -v for the .cu).
# Triton: (mode, BM of gpu_tiles(M), padded rank R) -> (registers, shared bytes, warps).
TRITON_SM90 = {
    ("base", 16, 16): (48, 36864, 4),
    ("split", 16, 16): (48, 36864, 4),
    ("split", 16, 64): (53, 36864, 4),
    ("kloop", 16, 16): (82, 49152, 4),
    ("kloop", 16, 64): (106, 86016, 4),
    ("base", 64, 16): (70, 65536, 4),
    ("split", 64, 16): (79, 67584, 4),
    ("split", 64, 64): (91, 73728, 4),
    ("kloop", 64, 16): (90, 75776, 4),
    ("kloop", 64, 64): (122, 106496, 4),
    ("base", 128, 16): (108, 98304, 8),
    ("split", 128, 16): (128, 102400, 8),
    ("split", 128, 64): (121, 114688, 8),
    ("kloop", 128, 16): (114, 108544, 8),
    ("kloop", 128, 64): (149, 139264, 8),
}
# lora_cuda.cu's GEMM, 64 x 64 tiles, 256 threads: (mode, padded rank R) -> (registers, shared bytes, warps)
CUDA_SM90 = {
    ("base", 16): (56, 8448, 8),
    ("kloop", 16): (80, 18048, 8),
    ("kloop", 32): (126, 27264, 8),
    ("kloop", 64): (127, 45696, 8),
}


@dataclass(frozen=True)
class Kernel:
    """One launch: its floating-point operations, its minimum memory traffic in bytes, the bytes all its
    programs read through L2 (0: not charged), and its CTAs per SM (None: as the base GEMM)."""

    name: str
    flops: float
    bytes: float
    l2_bytes: float = 0.0
    ctas: int | None = None

    def time_us(self, tflops: float, gpu: GPUSpec, launch_us: float, ref_ctas: int | None = None) -> float:
        t = max(self.flops / (tflops * 1e12), self.bytes / (gpu.tbps * 1e12), self.l2_bytes / (gpu.l2_tbps * 1e12))
        if self.ctas is not None and ref_ctas is not None:
            t *= busy_share(ref_ctas, gpu) / busy_share(self.ctas, gpu)
        return t * 1e6 + launch_us


def variant_kernels(
    M: int, K: int, N: int, r: int, block_n: int = 128, elem_bytes: int = 2, block_m: int | None = None,
    split_k: int = 1, ctas: dict[str, int] | None = None,
) -> dict[str, list[Kernel]]:  # fmt: skip
    """The kernels each variant launches, with their FLOPs and bytes.

    block_m: the K-loop kernel's tile height; given, its A re-reads through L2 are charged. split_k > 1:
    the split shrink (Triton split_fused, CUDA naive) zeroes its output first (a memset launch). ctas:
    CTAs per SM of "base", "split" and "kloop" (the three GEMM kernels), for the occupancy model."""
    e = elem_bytes
    occ = ctas or {}
    gemm = Kernel("base GEMM x W^T", 2 * M * N * K, e * (M * K + N * K + M * N), ctas=occ.get("base"))
    shrink = Kernel("shrink t = x A^T", 2 * M * K * r, e * (M * K + r * K + M * r))
    expand_new = Kernel("expand u = t B^T", 2 * M * N * r, e * (M * r + N * r + M * N))
    scale = Kernel("scale u * s", M * N, e * 2 * M * N)
    add = Kernel("add y + u", M * N, e * 3 * M * N)
    expand_acc = Kernel("expand y += s t B^T", 2 * M * N * r, e * (M * r + N * r + 2 * M * N))
    merge = Kernel("merge W + s B A", 2 * N * K * r, e * (2 * N * K + N * r + r * K))
    lora_bytes = e * (r * K + N * r)  # A and B
    memset = [Kernel("memset t = 0", 0, 4 * M * r)] if split_k > 1 else []
    # t is float32; with split_k > 1 every slice reads and writes it (atomic adds)
    split_shrink = Kernel("shrink t = x A^T (split K)", 2 * M * K * r,
                          e * (M * K + r * K) + 4 * M * r * (2 * split_k - 1))  # fmt: skip
    split_gemm = Kernel("GEMM over K + r", 2 * M * N * (K + r), e * (M * K + N * K + M * N + N * r) + 4 * M * r,
                        ctas=occ.get("split"))  # fmt: skip
    n_tiles = math.ceil(N / block_n)  # each column tile recomputes its rows of x A^T
    kloop_bytes = e * (M * K + N * K + M * N) + lora_bytes
    a_rereads = 0.0 if block_m is None else e * r * K * (math.ceil(M / block_m) * n_tiles - 1)
    kloop = Kernel(
        "GEMM + shrink in K loop",
        2 * M * N * K + 2 * M * K * r * n_tiles + 2 * M * N * r,
        kloop_bytes,
        l2_bytes=kloop_bytes + a_rereads if block_m is not None else 0.0,
        ctas=occ.get("kloop"),
    )
    ideal = Kernel(
        "ideal fused", 2 * M * N * K + 2 * M * K * r + 2 * M * N * r, e * (M * K + N * K + M * N) + lora_bytes
    )
    return {
        "base": [gemm],
        "naive": [gemm, shrink, expand_new, scale, add],
        "naive_addmm": [gemm, shrink, expand_acc],
        "naive_addmm_splitk": [gemm, *memset, split_shrink, expand_acc],  # lora_cuda.cu's naive path
        "merged": [merge, gemm],  # merging on every call; a pre-merged weight costs exactly "base"
        "split_fused": [*memset, split_shrink, split_gemm],
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
    block_m: int | None = None,
    split_k: int = 1,
    ctas: dict[str, int] | None = None,
) -> dict[str, float]:
    """Predicted microseconds per variant. tflops overrides the compute peak (e.g. gpu.simt_tflops for
    kernels that do not use tensor cores); launch_us overrides the per-launch cost (0: pure roofline);
    block_m, split_k, ctas: see `variant_kernels`."""
    peak = gpu.tflops if tflops is None else tflops
    launch = gpu.launch_us if launch_us is None else launch_us
    ref = (ctas or {}).get("base")
    return {
        name: sum(k.time_us(peak, gpu, launch, ref) for k in kernels)
        for name, kernels in variant_kernels(M, K, N, r, block_n, elem_bytes, block_m, split_k, ctas).items()
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
    block_m: int | None = None,
    split_k: int = 1,
    ctas: dict[str, int] | None = None,
) -> dict[str, float]:
    """Predicted time of each variant divided by the base GEMM's (same engine, same model)."""
    times = roofline_times(M, K, N, r, gpu, launch_us, block_n, tflops, elem_bytes, block_m, split_k, ctas)
    return {name: t / times["base"] for name, t in times.items()}


def lora_flops(M: int, K: int, N: int, r: int) -> float:
    """Useful FLOPs of one LoRA forward (base GEMM + shrink + expand), for TFLOP/s figures."""
    return 2.0 * M * N * K + 2.0 * M * K * r + 2.0 * M * N * r


def format_predictions(shapes: list[tuple[int, int, int, int]], gpu: GPUSpec = H200) -> str:
    """A text table of predicted ratios to the base GEMM (minimum-traffic model), without and with launches."""
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
