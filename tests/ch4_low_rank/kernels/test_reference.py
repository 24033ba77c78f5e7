"""Identities of the LoRA forward that every variant must satisfy, checked on the eager PyTorch versions."""

import inspect

import pytest
import torch

from chapters.ch4_low_rank.kernels import reference
from chapters.ch4_low_rank.kernels.reference import (
    TORCH_VARIANTS,
    lora_merged,
    lora_naive,
    lora_naive_addmm,
    lora_reference,
    merge_weight,
)

ALL = {"reference": lora_reference, **TORCH_VARIANTS}


def make(M=13, K=24, N=20, r=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=dtype)
    W = torch.randn(N, K, generator=g, dtype=dtype)
    A = torch.randn(r, K, generator=g, dtype=dtype)
    B = torch.randn(N, r, generator=g, dtype=dtype)
    return x, W, A, B


def test_same_signature():
    for name, fn in ALL.items():
        params = list(inspect.signature(fn).parameters)[:5]
        assert params == ["x", "W", "A", "B", "s"], name


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_B_gives_exactly_the_base_gemm(name, dtype):
    x, W, A, B = make(dtype=dtype)
    y = ALL[name](x, W, A, torch.zeros_like(B), 0.7)
    base = x.float() @ W.float().T if name == "reference" else x @ W.T
    assert torch.equal(y, base), f"{name}: B = 0 must leave x W^T bit for bit"


@pytest.mark.parametrize("name", list(ALL))
def test_variants_match_the_formula(name):
    x, W, A, B = make()  # float64
    expected = x @ W.T + 0.7 * (x @ A.T) @ B.T
    y = ALL[name](x, W, A, B, 0.7).double()
    tol = 1e-5 if name == "reference" else 1e-12  # the reference computes in float32
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_equals_merged_weight():
    x, W, A, B = make()
    s = 1.3
    W_merged = W + s * B @ A  # [N, K]
    torch.testing.assert_close(merge_weight(W, A, B, s), W_merged)
    torch.testing.assert_close(lora_naive(x, W, A, B, s), x @ W_merged.T)


@pytest.mark.parametrize("name", list(ALL))
def test_linear_in_s(name):
    x, W, A, B = make()
    f = ALL[name]
    y0, y1, y2, y_half = (f(x, W, A, B, s).double() for s in (0.0, 1.0, 2.0, -0.5))
    delta = y1 - y0  # the LoRA term for s = 1
    assert delta.abs().max() > 1.0, "the LoRA term must be visible, or the test proves nothing"
    tol = {"rtol": 1e-5, "atol": 1e-5} if name == "reference" else {}  # the reference rounds to float32
    torch.testing.assert_close(y2 - y0, 2 * delta, **tol)
    torch.testing.assert_close(y_half - y0, -0.5 * delta, **tol)


@pytest.mark.parametrize("name", list(ALL))
def test_non_contiguous_x(name):
    x, W, A, B = make(M=13, K=24)
    wide = torch.randn(24, 2 * 13, dtype=x.dtype)
    wide[:, ::2] = x.T
    x_strided = wide[:, ::2].T  # [13, 24] with strides (2, 26): neither row- nor column-contiguous
    assert not x_strided.is_contiguous() and torch.equal(x_strided, x)
    torch.testing.assert_close(ALL[name](x_strided, W, A, B, 0.7), ALL[name](x, W, A, B, 0.7))


def test_reference_is_float32_and_can_round_the_shrink():
    x, W, A, B = make(dtype=torch.float16)
    y = lora_reference(x, W, A, B, 0.5)
    y_rounded = lora_reference(x, W, A, B, 0.5, round_shrink=True)
    assert y.dtype == torch.float32 and y_rounded.dtype == torch.float32
    t = (x.float() @ A.float().T).half().float()
    torch.testing.assert_close(y_rounded, x.float() @ W.float().T + 0.5 * t @ B.float().T)


def test_output_dtype_follows_input():
    x, W, A, B = make(dtype=torch.float16)
    for fn in (lora_naive, lora_naive_addmm, lora_merged):
        assert fn(x, W, A, B, 0.5).dtype == torch.float16
    assert reference.lora_naive_addmm(x, W, A, B, 0.5).shape == (13, 20)


def test_lora_epilogue_completes_the_base_product():
    x, W, A, B = make()
    acc = x @ W.T
    y = reference.lora_epilogue(acc, x @ A.T, B, 0.5)
    torch.testing.assert_close(y, lora_reference(x, W, A, B, 0.5).float())
    # in 16-bit, s t is rounded before the product, as the kernels do (round_shrink in the reference)
    x16, W16, A16, B16 = (t.half() for t in (x, W, A, B))
    y16 = reference.lora_epilogue(x16.float() @ W16.float().T, x16.float() @ A16.float().T, B16, 1.0)
    torch.testing.assert_close(y16, lora_reference(x16, W16, A16, B16, 1.0, round_shrink=True))
