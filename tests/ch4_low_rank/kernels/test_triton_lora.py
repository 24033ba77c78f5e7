"""The Triton kernels against the float32 reference: on CPU through TRITON_INTERPRET=1, on a GPU if present.

Shapes are ragged (M, N, K not multiples of the 16 x 32 x 32 test tiles, several tiles in each
direction) so that masking and tile indexing are exercised; ranks 4 and 8 check the padding to 16.
"""

import pytest
import torch

tl = pytest.importorskip("triton.language", reason="triton is not installed (Linux only)")

from chapters.ch4_low_rank.kernels import triton_lora  # noqa: E402
from chapters.ch4_low_rank.kernels.interpreter import is_interpreted, padded_rank  # noqa: E402
from chapters.ch4_low_rank.kernels.reference import lora_reference  # noqa: E402
from chapters.ch4_low_rank.kernels.triton_lora import (  # noqa: E402
    INTERPRETER_SHRINK,
    INTERPRETER_TILES,
    ShrinkConfig,
    lora_shrink,
    triton_base,
    triton_kloop_fused,
    triton_split_fused,
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FUSED = {"split": triton_split_fused, "kloop": triton_kloop_fused}
M, K, N = 37, 70, 45  # 3 x 3 x 2 tiles of 16 x 32 x 32, none full at the edges


def make(M, K, N, r, dtype, device, seed=0):
    """Scaled so that the base and the LoRA term are both of order 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    W = torch.randn(N, K, generator=g) / K**0.5
    A = torch.randn(r, K, generator=g) / K**0.5
    B = torch.randn(N, r, generator=g) / r**0.5
    return [t.to(device=device, dtype=dtype) for t in (x, W, A, B)]


def test_cpu_runs_in_interpreter():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the kernels are compiled, not interpreted")
    assert is_interpreted(triton_lora.lora_matmul_kernel), "TRITON_INTERPRET=1 was not set before the import"
    assert is_interpreted(tl.cdiv), "triton itself was imported before TRITON_INTERPRET=1 was set"


@pytest.mark.parametrize("r,padded", [(1, 16), (4, 16), (8, 16), (16, 16), (17, 32), (33, 64), (64, 64)])
def test_padded_rank(r, padded):
    assert padded_rank(r) == padded


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_base_gemm(dtype, device, assert_rel_close):
    x, W, A, B = make(M, K, N, 4, dtype, device)
    y = triton_base(x, W, A, B, 0.5, config=INTERPRETER_TILES)
    assert y.dtype == dtype
    assert_rel_close(y.cpu(), x.float().cpu() @ W.float().cpu().T, dtype, "triton_base")


@pytest.mark.parametrize("variant", list(FUSED))
@pytest.mark.parametrize("r", [4, 8, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_matches_reference(variant, r, dtype, device, assert_rel_close):
    x, W, A, B = make(M, K, N, r, dtype, device)
    s = 0.7
    ref = lora_reference(x, W, A, B, s).cpu()
    base = (x.float() @ W.float().T).cpu()
    # the LoRA term must be far above the tolerance, or a kernel that skipped it would pass
    assert (ref - base).abs().max() > 0.2 * ref.abs().max()
    y = FUSED[variant](x, W, A, B, s, config=INTERPRETER_TILES)
    assert y.shape == (M, N) and y.dtype == dtype
    assert_rel_close(y.cpu(), ref, dtype, f"{variant} r={r}")


@pytest.mark.parametrize("variant", list(FUSED))
def test_bfloat16_through_upcast(variant, device, assert_rel_close):
    """The interpreter's bf16 dot is wrong; the wrappers upcast tiles to float32 there (UPCAST)."""
    x, W, A, B = make(M, K, N, 8, torch.bfloat16, device)
    y = FUSED[variant](x, W, A, B, 0.7, config=INTERPRETER_TILES)
    assert_rel_close(y.cpu(), lora_reference(x, W, A, B, 0.7).cpu(), torch.bfloat16, variant)


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("r", [4, 64])
def test_shrink(split_k, r, device, assert_rel_close):
    x, _, A, _ = make(M, K, N, r, torch.float32, device)
    cfg = ShrinkConfig(
        BM=INTERPRETER_SHRINK.BM, BK=INTERPRETER_SHRINK.BK, SPLIT_K=split_k, num_warps=4, num_stages=1
    )
    t = lora_shrink(x, A, cfg)
    assert t.shape == (M, r) and t.dtype == torch.float32
    assert_rel_close(t.cpu(), (x @ A.T).cpu(), torch.float32, f"shrink split_k={split_k}")


@pytest.mark.parametrize("variant", list(FUSED))
def test_strided_inputs(variant, device, assert_rel_close):
    """Non-contiguous x and a transposed-storage W: the kernels take strides, not shapes."""
    x, W, A, B = make(M, K, N, 16, torch.float32, device)
    x_strided = torch.zeros(K, 2 * M, device=device)
    x_strided[:, ::2] = x.T
    x_strided = x_strided[:, ::2].T  # [M, K], strides (2, 2M)
    W_colmajor = W.T.contiguous().T  # [N, K], strides (1, N)
    assert not x_strided.is_contiguous() and not W_colmajor.is_contiguous()
    y = FUSED[variant](x_strided, W_colmajor, A, B, 0.7, config=INTERPRETER_TILES)
    assert_rel_close(y.cpu(), lora_reference(x, W, A, B, 0.7).cpu(), torch.float32, variant)


def test_zero_B_gives_base(device):
    x, W, A, B = make(M, K, N, 16, torch.float32, device)
    zero = torch.zeros_like(B)
    base = triton_base(x, W, A, zero, 0.7, config=INTERPRETER_TILES)
    for fn in FUSED.values():
        torch.testing.assert_close(
            fn(x, W, A, zero, 0.7, config=INTERPRETER_TILES), base, rtol=1e-6, atol=1e-6
        )


def test_rejects_bad_shapes(device):
    x, W, A, B = make(8, 16, 16, 4, torch.float32, device)
    with pytest.raises(AssertionError):
        triton_kloop_fused(x, W, A.T.contiguous(), B, 1.0)


@requires_cuda
@pytest.mark.parametrize("M_gpu", [16, 256, 1000])
@pytest.mark.parametrize("variant", ["base", "split", "kloop"])
def test_gpu_bf16_default_tiles(M_gpu, variant, assert_rel_close):
    """The benchmark's configuration: bf16 on tensor cores with the default (large) tiles."""
    x, W, A, B = make(M_gpu, 1024, 768, 16, torch.bfloat16, "cuda")
    fn = {"base": triton_base, **FUSED}[variant]
    ref = (x.float() @ W.float().T) if variant == "base" else lora_reference(x, W, A, B, 0.5)
    assert_rel_close(fn(x, W, A, B, 0.5), ref, torch.bfloat16, variant)


# The tiles the wrappers pick on a GPU (gpu_tiles), run numerically in the interpreter at the smallest
# shapes that still give several tiles per direction, ragged edges, and (64 x 64 tiles, GROUP_M = 8) more
# tile-rows than one group: a full group then a partial one. About 10 s on two idle cores.
GPU_TILE_CASES = [
    (16, (37, 300, 70), "split"),  # decode tiles 16 x 32 x 128, GROUP_M = 1; K > BK
    (16, (37, 300, 70), "kloop"),
    (256, (540, 70, 130), "split"),  # 64 x 64 x 64, GROUP_M = 8: 9 tile-rows
    (256, (540, 70, 130), "kloop"),
    (4096, (300, 70, 140), "split"),  # 128 x 128 x 64, GROUP_M = 8: one partial group of 3 tile-rows
    (4096, (300, 70, 140), "kloop"),
]


@pytest.mark.parametrize("tokens,shape,variant", GPU_TILE_CASES)
def test_gpu_tile_configurations_in_the_interpreter(tokens, shape, variant, device, assert_rel_close):
    cfg = triton_lora.gpu_tiles(tokens)
    m, k, n = shape
    assert triton_lora.triton.cdiv(m, cfg.BM) > 1 and triton_lora.triton.cdiv(n, cfg.BN) > 1
    x, W, A, B = make(m, k, n, 16, torch.float16, device)
    kwargs = {}
    if variant == "split":  # the GPU shrink tiles, with K split over 3 programs
        kwargs["shrink_config"] = ShrinkConfig(BM=16 if tokens <= 64 else 64, BK=128, SPLIT_K=3)
    y = FUSED[variant](x, W, A, B, 0.7, config=cfg, **kwargs)
    assert_rel_close(y.cpu(), lora_reference(x, W, A, B, 0.7).cpu(), torch.float16, f"{variant} {cfg}")


def test_offsets_beyond_2_to_the_31(device):
    """Row 2 of x starts at element 2^31: int32 offsets (row * stride) would wrap around. Only a few pages
    of the 4 GiB allocation are ever touched, so this costs no real memory."""
    if device != "cpu":
        pytest.skip("the CPU version is enough; on a GPU this would really allocate 4 GiB")
    rows, k, n = 3, 64, 40
    storage = torch.empty(2 * 2**30 + k, dtype=torch.float16)  # virtual memory: untouched pages are free
    x = storage.as_strided((rows, k), (2**30, 1))  # [3, 64], stride 2^30 fits int32, 2 * 2^30 does not
    x_small, W, A, B = make(rows, k, n, 8, torch.float16, device)
    x.copy_(x_small)
    y = triton_kloop_fused(x, W, A, B, 0.7, config=INTERPRETER_TILES)
    torch.testing.assert_close(y.float(), lora_reference(x_small, W, A, B, 0.7), rtol=2e-3, atol=2e-3)
