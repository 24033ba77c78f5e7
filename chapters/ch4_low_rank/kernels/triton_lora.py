"""LoRA forward in Triton: a base GEMM and two ways to fuse the low-rank path into it.

    y = x W^T + s (x A^T) B^T        x [M, K], W [N, K], A [r, K], B [N, r]

All three variants run the *same* tiled GEMM kernel (`lora_matmul_kernel`), so the base GEMM is a fair
yardstick for the fused ones: any difference is the LoRA work, not a better or worse GEMM.

- `triton_base`: the plain GEMM, x W^T. Each program owns one [BM, BN] tile of y and walks K in steps
  of BK, multiplying an x tile [BM, BK] by a W^T tile [BK, BN] into a float32 accumulator.

- `triton_split_fused` ("split fusion", the idea of the LoRAFusion paper): first a small shrink kernel
  computes t = x A^T [M, r] in float32. Then the GEMM *starts* its accumulator at s * t_tile B^T_tile
  instead of zero and runs its K loop unchanged. This equals one GEMM over K + r on [x | s t] and
  [W | B], without building the concatenation. Cost over the base: one extra read of x by the shrink.

- `triton_kloop_fused` (single kernel, as in a fused MoE+LoRA kernel of a vLLM fork): the shrink happens
  inside the K loop, reusing the x tile already in on-chip memory: xa += x_tile A^T_tile. After the loop
  the expand runs in the epilogue: acc += s * xa B^T_tile. One launch and no extra pass over x, but every
  program along N recomputes the same xa, so the shrink FLOPs are repeated N / BN times (+r/BN work).

The rank is padded to a power of two >= 16 (the tensor-core dot needs an inner dimension of at least
16); masked loads supply the padding as zeros. Accumulation is float32; the shrink result is rounded to
the input dtype only where it enters a 16-bit `tl.dot`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .interpreter import check_runnable, interpreter_requested, padded_rank

# True when running on CPU through TRITON_INTERPRET=1 (set by this package's __init__ without a GPU).
INTERPRET = interpreter_requested()


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch options of the GEMM (BM x BN output tile, BK step along K)."""

    BM: int = 128
    BN: int = 128
    BK: int = 64
    GROUP_M: int = 8  # programs that share a W^T column stripe are launched together (L2 reuse)
    num_warps: int = 8
    num_stages: int = 3


@dataclass(frozen=True)
class ShrinkConfig:
    """Tiles of the shrink t = x A^T: BM rows per program, BK step, K split over SPLIT_K programs."""

    BM: int = 64
    BK: int = 128
    SPLIT_K: int = 1
    num_warps: int = 4
    num_stages: int = 3


# Small tiles that keep the CPU interpreter fast; all dims >= 16 so they also compile for a GPU.
INTERPRETER_TILES = TileConfig(BM=16, BN=32, BK=32, GROUP_M=2, num_warps=4, num_stages=1)
INTERPRETER_SHRINK = ShrinkConfig(BM=16, BK=32, SPLIT_K=1, num_warps=4, num_stages=1)


def default_tiles(M: int) -> TileConfig:
    """The tiles the wrappers use: small ones in the CPU interpreter, else `gpu_tiles(M)`."""
    return INTERPRETER_TILES if INTERPRET else gpu_tiles(M)


def gpu_tiles(M: int) -> TileConfig:
    """Hand-picked (not autotuned) GPU tiles: skinny tiles for few tokens, 128 x 128 for many."""
    if M <= 64:  # decode-like: the GEMM is a read of W; use many narrow programs to keep all SMs busy
        return TileConfig(BM=16, BN=32, BK=128, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 256:
        return TileConfig(BM=64, BN=64, BK=64, GROUP_M=8, num_warps=4, num_stages=4)
    return TileConfig()


@functools.lru_cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def shrink_split_k(M: int, K: int, n_sm: int) -> int:
    """Programs along K of the GPU shrink: about one program per SM in all, at most one per BK = 128 of K."""
    return max(1, min(n_sm // triton.cdiv(M, 16 if M <= 64 else 64), triton.cdiv(K, 128)))


def default_shrink(M: int, K: int, device: torch.device) -> ShrinkConfig:
    """Split K so that about one program per SM is busy even when M is small (the shrink is memory-bound).
    With SPLIT_K > 1 the programs add into t, which must be zeroed first: one more launch (a memset)."""
    if INTERPRET:
        return INTERPRETER_SHRINK
    n_sm = _sm_count(device.index or 0) if device.type == "cuda" else 1
    return ShrinkConfig(BM=16 if M <= 64 else 64, BK=128, SPLIT_K=shrink_split_k(M, K, n_sm))


@triton.jit
def lora_shrink_kernel(
    x_ptr, a_ptr, t_ptr,
    M, K, r,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_tm, stride_tr,
    R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """t[M, r] (+)= x[M, K] A[r, K]^T. Program (pid_m, pid_k) sums the K blocks pid_k, pid_k + SPLIT_K, ..."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)  # [BM] int64: offs_m * stride_xm may pass 2^31
    offs_r = tl.arange(0, R)  # [R]
    offs_k = tl.arange(0, BK)  # [BK]
    m_mask = offs_m < M
    r_mask = offs_r < r  # rows r..R-1 of A are padding: loaded as 0

    acc = tl.zeros((BM, R), dtype=tl.float32)  # [BM, R]
    for k0 in range(pid_k * BK, K, BK * SPLIT_K):
        kk = k0 + offs_k  # [BK]
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
            mask=m_mask[:, None] & (kk[None, :] < K),
            other=0.0,
        )  # [BM, BK]
        a = tl.load(
            a_ptr + kk[:, None] * stride_ak + offs_r[None, :] * stride_ar,
            mask=(kk[:, None] < K) & r_mask[None, :],
            other=0.0,
        )  # [BK, R] = A^T tile
        if UPCAST:
            x = x.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)

    t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr  # [BM, R]
    t_mask = m_mask[:, None] & r_mask[None, :]
    if SPLIT_K == 1:
        tl.store(t_ptrs, acc, mask=t_mask)
    else:  # several programs own the same t tile: add the partial sums (t was zeroed by the wrapper)
        tl.atomic_add(t_ptrs, acc, mask=t_mask)


@triton.jit
def lora_matmul_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, t_ptr, y_ptr,
    M, N, K, r, scale,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_bn, stride_br, stride_tm, stride_tr, stride_ym, stride_yn,
    SPLIT_FUSED: tl.constexpr, KLOOP_FUSED: tl.constexpr,
    R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One [BM, BN] tile of y = x W^T (+ s (x A^T) B^T). The two flags pick where the LoRA work happens;
    with both False this is the base GEMM and the LoRA code is compiled out."""
    # Map the 1-D program id to a tile, GROUP_M tile-rows at a time, so programs running together
    # share W^T column stripes in L2 (the "grouped ordering" of the Triton matmul tutorial).
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    # int64 row and column indices: with M * K, N * K or M * N above 2^31 elements, int32 offsets
    # (index * stride) would wrap around and address the wrong memory.
    offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)  # [BM]
    offs_n = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)  # [BN]
    offs_k = tl.arange(0, BK)  # [BK]
    offs_r = tl.arange(0, R)  # [R]
    m_mask = offs_m < M
    n_mask = offs_n < N
    r_mask = offs_r < r

    acc = tl.zeros((BM, BN), dtype=tl.float32)  # [BM, BN]
    if SPLIT_FUSED or KLOOP_FUSED:
        b = tl.load(
            b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )  # [R, BN] = B^T tile
        if UPCAST:
            b = b.to(tl.float32)

    if SPLIT_FUSED:  # the accumulator starts from the low-rank product s * t B^T
        t = tl.load(
            t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
            mask=m_mask[:, None] & r_mask[None, :],
            other=0.0,
        )  # [BM, R] float32
        acc = tl.dot((t * scale).to(b.dtype), b, acc, input_precision=PRECISION)
    if KLOOP_FUSED:
        xa = tl.zeros((BM, R), dtype=tl.float32)  # [BM, R] this tile-row's x A^T, built along K

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BM, BK]
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # [BK, BN] = W^T tile
    a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar  # [BK, R]  = A^T tile
    for k0 in range(0, K, BK):
        k_mask = (k0 + offs_k) < K  # [BK] ragged last step
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # [BK, BN]
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if KLOOP_FUSED:  # shrink on the x tile we already hold
            a = tl.load(a_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)  # [BK, R]
            if UPCAST:
                a = a.to(tl.float32)
            xa = tl.dot(x, a, xa, input_precision=PRECISION)
        x_ptrs += BK * stride_xk
        w_ptrs += BK * stride_wk
        a_ptrs += BK * stride_ak

    if KLOOP_FUSED:  # epilogue expand: acc += s * xa B^T
        acc = tl.dot((xa * scale).to(b.dtype), b, acc, input_precision=PRECISION)

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn  # [BM, BN]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def dot_options(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, PRECISION) for a dtype. bf16 is upcast in the interpreter, whose bf16 dot is wrong.
    float32 dots use exact IEEE products ("tf32" would round the inputs to 10 mantissa bits on a GPU)."""
    upcast = INTERPRET and dtype == torch.bfloat16
    precision = "ieee" if (upcast or dtype == torch.float32) else "tf32"
    return upcast, precision


def _check(x: Tensor, W: Tensor, A: Tensor, B: Tensor) -> tuple[int, int, int, int]:
    assert x.dim() == 2 and W.dim() == 2 and A.dim() == 2 and B.dim() == 2, "x, W, A, B must be 2-D"
    M, K = x.shape
    N, r = B.shape
    assert W.shape == (N, K) and A.shape == (r, K), (
        f"shapes x{tuple(x.shape)} W{tuple(W.shape)} A{tuple(A.shape)}"
    )
    assert x.dtype == W.dtype == A.dtype == B.dtype, "x, W, A, B must share one dtype"
    assert x.device == W.device == A.device == B.device
    check_runnable(lora_matmul_kernel, x.device)
    return M, K, N, r


def lora_shrink(x: Tensor, A: Tensor, config: ShrinkConfig | None = None) -> Tensor:
    """t = x A^T in float32, shape [M, r]."""
    M, K = x.shape
    r = A.shape[0]
    cfg = config or default_shrink(M, K, x.device)
    upcast, precision = dot_options(x.dtype)
    alloc = torch.zeros if cfg.SPLIT_K > 1 else torch.empty  # split-K programs add into t
    t = alloc((M, r), device=x.device, dtype=torch.float32)  # [M, r]
    if M == 0:
        return t
    grid = (triton.cdiv(M, cfg.BM), cfg.SPLIT_K)
    lora_shrink_kernel[grid](
        x, A, t, M, K, r,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), t.stride(0), t.stride(1),
        R=padded_rank(r), BM=cfg.BM, BK=cfg.BK, SPLIT_K=cfg.SPLIT_K, UPCAST=upcast, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return t


def _matmul(x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float, t: Tensor | None, split: bool, kloop: bool,
            config: TileConfig | None) -> Tensor:  # fmt: skip
    M, K, N, r = _check(x, W, A, B)
    cfg = config or default_tiles(M)
    upcast, precision = dot_options(x.dtype)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)  # [M, N]
    if M == 0 or N == 0:
        return y
    t_arg = t if t is not None else y  # an unused pointer when not split-fused (the code is compiled out)
    grid = (triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN),)
    lora_matmul_kernel[grid](
        x, W, A, B, t_arg, y, M, N, K, r, float(s),
        x.stride(0), x.stride(1), W.stride(0), W.stride(1), A.stride(0), A.stride(1),
        B.stride(0), B.stride(1), t_arg.stride(0), t_arg.stride(1), y.stride(0), y.stride(1),
        SPLIT_FUSED=split, KLOOP_FUSED=kloop, R=padded_rank(r),
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M, UPCAST=upcast, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


def triton_base(
    x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float, config: TileConfig | None = None
) -> Tensor:
    """y = x W^T with the same kernel as the fused variants (A, B, s are ignored)."""
    return _matmul(x, W, A, B, s, None, split=False, kloop=False, config=config)


def triton_split_fused(x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float, config: TileConfig | None = None,
                       shrink_config: ShrinkConfig | None = None) -> Tensor:  # fmt: skip
    """Two launches: t = x A^T, then the GEMM with its accumulator initialised to s t B^T."""
    _check(x, W, A, B)
    t = lora_shrink(x, A, shrink_config)  # [M, r] float32
    return _matmul(x, W, A, B, s, t, split=True, kloop=False, config=config)


def triton_kloop_fused(
    x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float, config: TileConfig | None = None
) -> Tensor:
    """One launch: shrink inside the K loop on the shared x tile, expand in the epilogue."""
    return _matmul(x, W, A, B, s, None, split=False, kloop=True, config=config)


# name -> function, all with the signature f(x, W, A, B, s) -> y
TRITON_VARIANTS = {
    "triton_base": triton_base,
    "triton_split_fused": triton_split_fused,
    "triton_kloop_fused": triton_kloop_fused,
}
