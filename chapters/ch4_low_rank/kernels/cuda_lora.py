"""Build and call the raw CUDA C++ LoRA kernels of lora_cuda.cu (naive three-kernel and fused one-kernel).

    y = x W^T + s (x A^T) B^T        x [M, K], W [N, K], A [r, K], B [N, r]

The kernels themselves are explained at the top of lora_cuda.cu. This file is the thin glue:

- `build()` compiles the .cu with nvcc and a few lines of C++ tensor glue with the host compiler through
  `torch.utils.cpp_extension.load_inline`, once per machine (cached in TORCH_EXTENSIONS_DIR). The .cu has
  no torch headers (`no_implicit_headers=True`), which keeps the nvcc step short. It needs a CUDA build
  of torch, a GPU, an nvcc whose major version matches torch.version.cuda, and ninja; on anything else it
  raises a RuntimeError that says what is missing. Set TORCH_CUDA_ARCH_LIST (e.g. "9.0") to compile for
  one architecture only.
- `cuda_base`, `cuda_naive`, `cuda_fused` have the common signature f(x, W, A, B, s) -> y. The CUDA
  stream is passed from Python as an integer, so the glue needs no CUDA headers either.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

CU_FILE = Path(__file__).with_name("lora_cuda.cu")
MAX_RANK = 64

# Tensor -> raw pointer glue, compiled by the host C++ compiler. Variant codes match lora_cuda.cu.
GLUE_CPP = r"""
#include <torch/extension.h>

#include <cstdint>

extern "C" const char* lora_cuda_forward(int variant, int dtype, const void* x, const void* W,
                                         const void* A, const void* B, void* y, float* t, int M, int N,
                                         int K, int r, float s, void* stream);

torch::Tensor lora_forward(int64_t variant, torch::Tensor x, torch::Tensor W, torch::Tensor A,
                           torch::Tensor B, double s, int64_t stream) {
    TORCH_CHECK(x.is_cuda() && W.is_cuda() && A.is_cuda() && B.is_cuda(), "all tensors must be on the GPU");
    TORCH_CHECK(x.dim() == 2 && W.dim() == 2 && A.dim() == 2 && B.dim() == 2, "x, W, A, B must be 2-D");
    const auto st = x.scalar_type();
    TORCH_CHECK(W.scalar_type() == st && A.scalar_type() == st && B.scalar_type() == st, "one dtype for all");
    const int dtype = st == torch::kFloat32 ? 0 : st == torch::kFloat16 ? 1 : st == torch::kBFloat16 ? 2 : -1;
    TORCH_CHECK(dtype >= 0, "dtype must be float32, float16 or bfloat16");
    x = x.contiguous();  // the kernels assume row-major, densely packed matrices
    W = W.contiguous();
    A = A.contiguous();
    B = B.contiguous();
    const int64_t M = x.size(0), K = x.size(1), N = W.size(0), r = A.size(0);
    TORCH_CHECK(W.size(1) == K && A.size(1) == K && B.size(0) == N && B.size(1) == r, "shape mismatch");
    TORCH_CHECK(M <= INT32_MAX && N <= INT32_MAX && K <= INT32_MAX, "sizes must fit in 32 bits");
    auto y = torch::empty({M, N}, x.options());
    torch::Tensor t;  // float32 [M, r] buffer between the naive shrink and expand
    if (variant == 1) t = torch::empty({M, r}, x.options().dtype(torch::kFloat32));
    const char* err = lora_cuda_forward(
        static_cast<int>(variant), dtype, x.data_ptr(), W.data_ptr(), A.data_ptr(), B.data_ptr(),
        y.data_ptr(), t.defined() ? t.data_ptr<float>() : nullptr, static_cast<int>(M),
        static_cast<int>(N), static_cast<int>(K), static_cast<int>(r), static_cast<float>(s),
        reinterpret_cast<void*>(stream));
    TORCH_CHECK(err == nullptr, "lora_cuda_forward: ", err);
    return y;
}
"""

BASE, NAIVE, FUSED = 0, 1, 2  # variant codes of lora_cuda.cu
TILE, BK = 64, 16  # lora_cuda.cu: BM = BN = 64, BK = 16
SHRINK_TARGET_BLOCKS, SHRINK_MIN_STEPS = 264, 4  # as in lora_cuda.cu


def shrink_splits(M: int, K: int) -> tuple[int, int]:
    """(slices of K, their width) of the naive shrink, as lora_cuda.cu's shrink_splits computes them: enough
    blocks to fill the GPU (~264) when M is small, at least 4 steps of 16 per block."""
    m_blocks, k_steps = -(-M // TILE), -(-K // BK)
    splits = max(1, min(-(-SHRINK_TARGET_BLOCKS // m_blocks), -(-k_steps // SHRINK_MIN_STEPS)))
    steps = -(-k_steps // splits)
    return -(-k_steps // steps), steps * BK
_module: ModuleType | None = None


def cuda_extension_available() -> tuple[bool, str]:
    """(True, "") when build() can work here, else (False, the reason)."""
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build; install a CUDA build of torch"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    if shutil.which("ninja") is None and not (Path(sys.executable).parent / "ninja").exists():
        return False, "ninja is missing (pip install ninja)"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return False, "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return True, ""


def build(verbose: bool = False) -> ModuleType:
    """Compile (first call, about 0.5-2 minutes) or load (later calls) the extension."""
    global _module
    if _module is not None:
        return _module
    ok, reason = cuda_extension_available()
    if not ok:
        raise RuntimeError(f"cannot build the CUDA LoRA kernels: {reason}")
    from torch.utils.cpp_extension import load_inline

    bindir = Path(sys.executable).parent  # ninja installed by pip into a venv that is not activated
    if shutil.which("ninja") is None and (bindir / "ninja").exists():
        os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    _module = load_inline(
        name="peft_from_scratch_lora_cuda",
        cpp_sources=[GLUE_CPP],
        cuda_sources=[CU_FILE.read_text()],
        functions=["lora_forward"],
        extra_cuda_cflags=["-O3"],
        no_implicit_headers=True,
        verbose=verbose,
    )
    return _module


def _run(variant: int, x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float) -> Tensor:
    if A.shape[0] > MAX_RANK:
        raise ValueError(f"the CUDA kernels support ranks up to {MAX_RANK}, got {A.shape[0]}")
    module = build()
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream  # an int: the cudaStream_t address
        return module.lora_forward(variant, x, W, A, B, float(s), stream)


def cuda_base(x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float) -> Tensor:
    """y = x W^T with the same tiled kernel as cuda_fused (A, B, s ignored): the same-engine yardstick."""
    return _run(BASE, x, W, A, B, s)


def cuda_naive(x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float) -> Tensor:
    """Three kernels: tiled GEMM, shrink into a float32 [M, r] buffer (split over K, after a memset, when
    M is small), expand-and-add into y."""
    return _run(NAIVE, x, W, A, B, s)


def cuda_fused(x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float) -> Tensor:
    """One launch: shrink on the shared-memory x tile inside the K loop, expand in the epilogue."""
    return _run(FUSED, x, W, A, B, s)


# name -> function, all with the signature f(x, W, A, B, s) -> y
CUDA_VARIANTS = {"cuda_base": cuda_base, "cuda_naive": cuda_naive, "cuda_fused": cuda_fused}
