"""Many LoRA adapters in one batch: each token picks its own adapter (the S-LoRA / Punica setting).

    y[i] += s[a_i] (x[i] A[a_i]^T) B[a_i]^T      for every token i with adapter index a_i >= 0
    x [T, K], y [T, N], A_stack [L, r, K], B_stack [L, N, r], adapter_idx [T] (-1: no adapter), s [L]

A server that hosts hundreds of adapters cannot merge them into W, and running one small GEMM per
adapter wastes the GPU. What Punica, S-LoRA and vLLM do instead, in our own words:

1. run the base GEMM y = x W^T once for the whole batch (cuBLAS), whatever the adapters;
2. "shrink": t[i] = x[i] A[a_i]^T for all tokens in one launch, into a small float32 buffer [T, r];
3. "expand": y[i] += s[a_i] t[i] B[a_i]^T in one more launch, read-modify-write into the base output.

To use tensor cores the kernels need tiles of tokens that share an adapter. The wrapper sorts the token
ids by adapter once (`group_tokens`); program (pid_m, ..., adapter l) then takes the pid_m-th block of
BM tokens among those using adapter l, gathers their rows of x, and multiplies by that adapter's A or B
tile. Programs past an adapter's token count exit at once, and tokens with index -1 are never visited,
so their row of y is left exactly as the base GEMM wrote it. Each token belongs to one adapter, so no two
programs write the same element of y. Adapters of smaller rank are zero-padded in the stack.

`multi_lora_reference` does the same in float32 by gathering every token's A and B; slow, obviously right.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .interpreter import check_runnable, interpreter_requested, padded_rank
from .triton_lora import dot_options

INTERPRET = interpreter_requested()


@dataclass(frozen=True)
class MultiConfig:
    """Tiles: BM tokens per program, BK step of the shrink along K, BN output columns of the expand."""

    BM: int = 16
    BK: int = 128
    BN: int = 128
    num_warps: int = 4
    num_stages: int = 2


INTERPRETER_MULTI = MultiConfig(BM=16, BK=32, BN=32, num_warps=4, num_stages=1)


def default_multi_config(T: int) -> MultiConfig:
    if INTERPRET:
        return INTERPRETER_MULTI
    return MultiConfig(BM=16 if T <= 256 else 64)


def multi_lora_reference(
    y: Tensor, x: Tensor, A_stack: Tensor, B_stack: Tensor, adapter_idx: Tensor, scales: Tensor | float
) -> Tensor:
    """Float32 y + per-token LoRA, computed by gathering each token's adapter. Returns a new tensor."""
    L = A_stack.shape[0]
    scales = _scales(scales, L, x.device)  # [L]
    idx = adapter_idx.long().clamp(min=0)  # [T] -1 mapped to 0, masked out below
    A_tok = A_stack.float()[idx]  # [T, r, K]
    B_tok = B_stack.float()[idx]  # [T, N, r]
    t = torch.einsum("tk,trk->tr", x.float(), A_tok)  # [T, r]
    delta = torch.einsum("tr,tnr->tn", t, B_tok) * scales[idx][:, None]  # [T, N]
    return torch.where((adapter_idx >= 0)[:, None], y.float() + delta, y.float())  # [T, N]


@dataclass(frozen=True)
class TokenGroups:
    """Tokens sorted by adapter: tokens[starts[l] : starts[l] + counts[l]] are the tokens of adapter l."""

    tokens: Tensor  # [T] int32 token ids, tokens without adapter first
    counts: Tensor  # [L] int32
    starts: Tensor  # [L] int32


def group_tokens(adapter_idx: Tensor, num_adapters: int) -> TokenGroups:
    """Sort token ids by adapter with tensor ops only (no device-to-host copy, so CUDA-graph friendly)."""
    idx = adapter_idx.long()  # [T]
    order = torch.argsort(idx, stable=True)  # [T] -1 sorts first
    counts = torch.zeros(num_adapters + 1, dtype=torch.long, device=idx.device)  # slot 0: no adapter
    counts.index_add_(0, idx + 1, torch.ones_like(idx))
    starts = torch.cumsum(counts, 0) - counts  # [L + 1] exclusive prefix sum
    return TokenGroups(order.int(), counts[1:].int(), starts[1:].int())


def _scales(scales: Tensor | float, L: int, device: torch.device) -> Tensor:
    if isinstance(scales, (int, float)):
        return torch.full((L,), float(scales), device=device, dtype=torch.float32)
    assert scales.shape == (L,), f"one scale per adapter: expected ({L},), got {tuple(scales.shape)}"
    return scales.to(device=device, dtype=torch.float32)


@triton.jit
def multi_lora_shrink_kernel(
    x_ptr, a_ptr, t_ptr, tokens_ptr, counts_ptr, starts_ptr,
    K, r,
    stride_xm, stride_xk, stride_al, stride_ar, stride_ak, stride_tm, stride_tr,
    R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """t[tok] = x[tok] A[l]^T for the pid_m-th block of BM tokens of adapter l = program_id(1)."""
    pid_m = tl.program_id(0)
    lora = tl.program_id(1)
    count = tl.load(counts_ptr + lora)
    if pid_m * BM >= count:  # this adapter has fewer tokens: nothing to do
        return
    start = tl.load(starts_ptr + lora)
    offs = pid_m * BM + tl.arange(0, BM)  # [BM] position among this adapter's tokens
    m_mask = offs < count
    tok = tl.load(tokens_ptr + start + offs, mask=m_mask, other=0)  # [BM] token ids (gather)
    offs_r = tl.arange(0, R)
    offs_k = tl.arange(0, BK)
    r_mask = offs_r < r

    acc = tl.zeros((BM, R), dtype=tl.float32)  # [BM, R]
    a_base = a_ptr + lora.to(tl.int64) * stride_al
    for k0 in range(0, K, BK):
        kk = k0 + offs_k
        x = tl.load(
            x_ptr + tok[:, None].to(tl.int64) * stride_xm + kk[None, :] * stride_xk,
            mask=m_mask[:, None] & (kk[None, :] < K),
            other=0.0,
        )  # [BM, BK]
        a = tl.load(
            a_base + kk[:, None] * stride_ak + offs_r[None, :] * stride_ar,
            mask=(kk[:, None] < K) & r_mask[None, :],
            other=0.0,
        )  # [BK, R] = A[l]^T tile
        if UPCAST:
            x = x.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
    tl.store(
        t_ptr + tok[:, None].to(tl.int64) * stride_tm + offs_r[None, :] * stride_tr,
        acc,
        mask=m_mask[:, None] & r_mask[None, :],
    )  # scatter back to the tokens' rows


@triton.jit
def multi_lora_expand_kernel(
    t_ptr, b_ptr, y_ptr, scale_ptr, tokens_ptr, counts_ptr, starts_ptr,
    N, r,
    stride_tm, stride_tr, stride_bl, stride_bn, stride_br, stride_ym, stride_yn,
    R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """y[tok, n-tile] += s[l] t[tok] B[l]^T for the pid_m-th block of tokens of adapter l = program_id(2)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    lora = tl.program_id(2)
    count = tl.load(counts_ptr + lora)
    if pid_m * BM >= count:
        return
    start = tl.load(starts_ptr + lora)
    offs = pid_m * BM + tl.arange(0, BM)  # [BM]
    m_mask = offs < count
    tok = tl.load(tokens_ptr + start + offs, mask=m_mask, other=0).to(tl.int64)  # [BM]
    offs_n = pid_n * BN + tl.arange(0, BN)  # [BN]
    offs_r = tl.arange(0, R)  # [R]
    n_mask = offs_n < N
    r_mask = offs_r < r

    t = tl.load(
        t_ptr + tok[:, None] * stride_tm + offs_r[None, :] * stride_tr,
        mask=m_mask[:, None] & r_mask[None, :],
        other=0.0,
    )  # [BM, R] float32
    b = tl.load(
        b_ptr + lora.to(tl.int64) * stride_bl + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
        mask=r_mask[:, None] & n_mask[None, :],
        other=0.0,
    )  # [R, BN] = B[l]^T tile
    if UPCAST:
        b = b.to(tl.float32)
    s = tl.load(scale_ptr + lora)
    delta = tl.dot((t * s).to(b.dtype), b, input_precision=PRECISION)  # [BM, BN] float32
    y_ptrs = y_ptr + tok[:, None] * stride_ym + offs_n[None, :] * stride_yn  # [BM, BN]
    y_mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=y_mask)


def multi_lora_shrink(
    x: Tensor,
    A_stack: Tensor,
    adapter_idx: Tensor,
    groups: TokenGroups | None = None,
    config: MultiConfig | None = None,
) -> Tensor:
    """t [T, r] float32, t[i] = x[i] A[a_i]^T; rows of tokens without adapter are 0."""
    check_runnable(multi_lora_shrink_kernel, x.device)
    T, K = x.shape
    L, r, K2 = A_stack.shape
    assert K2 == K and adapter_idx.shape == (T,) and x.dtype == A_stack.dtype
    groups = group_tokens(adapter_idx, L) if groups is None else groups
    cfg = config or default_multi_config(T)
    upcast, precision = dot_options(x.dtype)
    t = torch.zeros((T, r), device=x.device, dtype=torch.float32)  # [T, r]
    if T == 0 or L == 0:
        return t
    grid = (triton.cdiv(T, cfg.BM), L)
    multi_lora_shrink_kernel[grid](
        x, A_stack, t, groups.tokens, groups.counts, groups.starts, K, r,
        x.stride(0), x.stride(1), A_stack.stride(0), A_stack.stride(1), A_stack.stride(2),
        t.stride(0), t.stride(1),
        R=padded_rank(r), BM=cfg.BM, BK=cfg.BK, UPCAST=upcast, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return t


def multi_lora_expand_(
    y: Tensor,
    t: Tensor,
    B_stack: Tensor,
    adapter_idx: Tensor,
    scales: Tensor | float,
    groups: TokenGroups | None = None,
    config: MultiConfig | None = None,
) -> Tensor:
    """In place: y[i] += s[a_i] t[i] B[a_i]^T for tokens with an adapter. Returns y."""
    check_runnable(multi_lora_expand_kernel, y.device)
    T, N = y.shape
    L, N2, r = B_stack.shape
    assert N2 == N and t.shape == (T, r) and adapter_idx.shape == (T,) and y.dtype == B_stack.dtype
    groups = group_tokens(adapter_idx, L) if groups is None else groups
    cfg = config or default_multi_config(T)
    upcast, precision = dot_options(y.dtype)
    s = _scales(scales, L, y.device)  # [L]
    if T == 0 or L == 0:
        return y
    grid = (triton.cdiv(T, cfg.BM), triton.cdiv(N, cfg.BN), L)
    multi_lora_expand_kernel[grid](
        t, B_stack, y, s, groups.tokens, groups.counts, groups.starts, N, r,
        t.stride(0), t.stride(1), B_stack.stride(0), B_stack.stride(1), B_stack.stride(2),
        y.stride(0), y.stride(1),
        R=padded_rank(r), BM=cfg.BM, BN=cfg.BN, UPCAST=upcast, PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


def add_multi_lora_(
    y: Tensor,
    x: Tensor,
    A_stack: Tensor,
    B_stack: Tensor,
    adapter_idx: Tensor,
    scales: Tensor | float,
    config: MultiConfig | None = None,
    groups: TokenGroups | None = None,
) -> Tensor:
    """y += per-token LoRA (y is the base output x W^T). Two launches after one token sort. Returns y.
    Pass `groups` (from `group_tokens(adapter_idx, L)`) to reuse one sort across layers of a step."""
    groups = group_tokens(adapter_idx, A_stack.shape[0]) if groups is None else groups
    t = multi_lora_shrink(x, A_stack, adapter_idx, groups, config)  # [T, r] float32
    return multi_lora_expand_(y, t, B_stack, adapter_idx, scales, groups, config)
