"""The raw CUDA C++ kernels (lora_cuda.cu) without a GPU, then with one if present.

1. `nvcc -Xptxas -v` compiles the .cu for sm_80 and sm_90 and must report no register spills.
   (This and the g++ build below run in the background, started by conftest.py.)
2. The same .cu, compiled as C++ with tests' cuda_emulation.h (one std::thread per CUDA thread, a
   barrier for __syncthreads), runs every kernel on the CPU against the float32 reference: this checks
   the index arithmetic, tiling, masking and barrier placement of the real source file.
3. On a machine without CUDA, `build()` explains what is missing; on a GPU the extension is built with
   load_inline and compared in bfloat16.
"""

import ctypes
import re

import pytest
import torch

from chapters.ch4_low_rank.kernels import cuda_lora
from chapters.ch4_low_rank.kernels.reference import lora_reference

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def ptxas_log(background):
    returncode, log = background("nvcc").result()
    if returncode != 0 and "Unsupported gpu architecture" in log:
        pytest.skip("this nvcc is too old for sm_90 (CUDA >= 11.8 needed)")
    assert returncode == 0, log[-3000:]
    return log


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_compiles_without_spills(ptxas_log, arch):
    """ptxas -v prints, per kernel instance: "Compiling entry function '<name>' for 'sm_XX'", then its stack,
    spill and register figures. Every instance must spill nothing and stay within 128 registers."""
    blocks = re.split(r"Compiling entry function", ptxas_log)[1:]
    mine = [b for b in blocks if f"for '{arch}'" in b.split("\n")[0]]
    assert len(mine) >= 20, f"expected statistics for every kernel instance on {arch}:\n" + ptxas_log[-2000:]
    for block in mine:
        name = block.split("'")[1]
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
        regs = re.search(r"Used (\d+) registers", block)
        assert spill and regs, block[:500]
        assert spill.groups() == ("0", "0"), f"{arch} {name}: register spills {spill.group(0)}"
        assert int(regs.group(1)) <= 128, (
            f"{arch} {name}: {regs.group(1)} registers; __launch_bounds__ allows 128"
        )


@pytest.fixture(scope="module")
def emulated(background):
    job = background("emulation")
    returncode, output = job.result()
    if returncode != 0 and "barrier" in output and ("No such file" in output or "not a member" in output):
        pytest.skip("the C++ compiler lacks C++20 <barrier> (g++ >= 11 needed for the emulation)")
    assert returncode == 0, output[-3000:]
    fn = ctypes.CDLL(str(job.workdir / "lora_cuda_emulated.so")).lora_cuda_forward
    fn.restype = ctypes.c_char_p
    fn.argtypes = (
        [ctypes.c_int, ctypes.c_int]
        + [ctypes.c_void_p] * 6
        + [ctypes.c_int] * 4
        + [ctypes.c_float, ctypes.c_void_p]
    )

    def run(variant: int, x, W, A, B, s):
        M, K = x.shape
        N, r = B.shape
        y = torch.full((M, N), float("nan"), dtype=x.dtype)  # NaN: any element the kernel misses shows up
        t = torch.empty(M, r)
        code = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[x.dtype]
        err = fn(
            variant,
            code,
            x.data_ptr(),
            W.data_ptr(),
            A.data_ptr(),
            B.data_ptr(),
            y.data_ptr(),
            t.data_ptr(),
            M,
            N,
            K,
            r,
            s,
            None,
        )
        assert err is None, err.decode()
        return y

    return run


def make(M, K, N, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    W = torch.randn(N, K, generator=g) / K**0.5
    A = torch.randn(r, K, generator=g) / K**0.5
    B = torch.randn(N, r, generator=g) / r**0.5
    return [t.to(dtype) for t in (x, W, A, B)]


# ragged: 2 x 2 blocks of 64 x 64, K not a multiple of 16; ranks cover the 16 / 32 / 64 instances
CASES = [
    (0, 16, torch.float32),
    (2, 4, torch.float32),
    (2, 33, torch.float16),
    (2, 64, torch.bfloat16),
    (1, 16, torch.float32),
    (1, 64, torch.float16),
]


@pytest.mark.parametrize("variant,r,dtype", CASES)
def test_emulated_kernels_match_reference(emulated, variant, r, dtype, assert_rel_close):
    M, K, N = 70, 37, 75
    x, W, A, B = make(M, K, N, r, dtype)
    y = emulated(variant, x, W, A, B, 0.7)
    assert not y.isnan().any(), "some outputs were never written"
    ref = x.float() @ W.float().T if variant == cuda_lora.BASE else lora_reference(x, W, A, B, 0.7)
    if variant != cuda_lora.BASE:
        assert (ref - x.float() @ W.float().T).abs().max() > 0.2 * ref.abs().max()
    assert_rel_close(y, ref, dtype, f"variant {variant} r={r}")


def test_emulated_rejects_bad_rank(emulated):
    x, W, A, B = make(8, 16, 8, 65, torch.float32)
    with pytest.raises(AssertionError, match="rank"):
        emulated(cuda_lora.FUSED, x, W, A, B, 1.0)


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.version.cuda is not None, reason="checks the CPU message"
)
def test_build_explains_what_is_missing():
    ok, reason = cuda_lora.cuda_extension_available()
    assert not ok and reason
    with pytest.raises(RuntimeError, match="cannot build the CUDA LoRA kernels"):
        cuda_lora.build()


@requires_cuda
@pytest.mark.parametrize("name", ["cuda_base", "cuda_naive", "cuda_fused"])
@pytest.mark.parametrize("r", [4, 16, 64])
def test_gpu_extension_bf16(name, r, assert_rel_close):
    ok, reason = cuda_lora.cuda_extension_available()
    if not ok:
        pytest.skip(reason)
    x, W, A, B = [t.cuda() for t in make(300, 520, 270, r, torch.bfloat16)]
    y = cuda_lora.CUDA_VARIANTS[name](x, W, A, B, 0.5)
    ref = x.float() @ W.float().T if name == "cuda_base" else lora_reference(x, W, A, B, 0.5)
    assert_rel_close(y, ref, torch.bfloat16, name)
