"""The raw CUDA C++ kernels (lora_cuda.cu) without a GPU, then with one if present.

1. `nvcc -Xptxas -v` compiles the .cu for sm_80 and sm_90 and must report no register spills.
   (This and the g++ build below run in the background, started by conftest.py.)
2. The same .cu, compiled as C++ with tests' cuda_emulation.h (one std::thread per CUDA thread, a
   barrier for __syncthreads), runs every kernel on the CPU against the float32 reference: this checks
   the index arithmetic, tiling, masking, 16-byte loads, the split-K shrink and barrier placement of the
   real source file. The same build exposes the tile copy's shared-memory layout, whose bank conflicts
   are counted (banks.py) and must be none.
3. On a machine without CUDA, `build()` explains what is missing; on a GPU the extension is built with
   load_inline and compared in bfloat16.
"""

import ctypes
import re

import pytest
import torch

from chapters.ch4_low_rank.kernels import banks, cuda_lora
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
def emulated_lib(background):
    job = background("emulation")
    returncode, output = job.result()
    if returncode != 0 and "barrier" in output and ("No such file" in output or "not a member" in output):
        pytest.skip("the C++ compiler lacks C++20 <barrier> (g++ >= 11 needed for the emulation)")
    assert returncode == 0, output[-3000:]
    return ctypes.CDLL(str(job.workdir / "lora_cuda_emulated.so"))


@pytest.fixture(scope="module")
def emulated(emulated_lib):
    fn = emulated_lib.lora_cuda_forward
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
        t = torch.full((M, r), float("nan"))  # garbage: the split-K shrink must zero it itself
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


# ragged: 2 x 2 blocks of 64 x 64; ranks cover the 16 / 32 / 64 instances. K = 37 is read element by
# element (not a multiple of the 16-byte chunk), K = 48 with 16-byte loads, K = 200 also splits the
# naive shrink into 4 slices of K (the last one ragged).
CASES = [
    (0, 16, torch.float32, 37),
    (2, 4, torch.float32, 37),
    (2, 33, torch.float16, 37),
    (2, 64, torch.bfloat16, 37),
    (1, 16, torch.float32, 37),
    (1, 64, torch.float16, 37),
    (0, 16, torch.bfloat16, 48),
    (2, 16, torch.float16, 48),
    (2, 64, torch.float32, 48),
    (1, 8, torch.bfloat16, 200),
    (1, 64, torch.float32, 200),
]


@pytest.mark.parametrize("variant,r,dtype,K", CASES)
def test_emulated_kernels_match_reference(emulated, variant, r, dtype, K, assert_rel_close):
    M, N = 70, 75
    x, W, A, B = make(M, K, N, r, dtype)
    y = emulated(variant, x, W, A, B, 0.7)
    assert not y.isnan().any(), "some outputs were never written"
    ref = x.float() @ W.float().T if variant == cuda_lora.BASE else lora_reference(x, W, A, B, 0.7)
    if variant != cuda_lora.BASE:
        assert (ref - x.float() @ W.float().T).abs().max() > 0.2 * ref.abs().max()
    assert_rel_close(y, ref, dtype, f"variant {variant} r={r}")


def test_misaligned_pointer_falls_back_to_element_loads(emulated, assert_rel_close):
    """A view that starts 2 bytes into its storage cannot use 16-byte loads; the result must not change."""
    x, W, A, B = make(70, 49, 75, 16, torch.float16)
    x_view = x[:, 1:]  # [70, 48], contiguous rows but a start offset of one element
    x_odd = torch.empty(70 * 48 + 1, dtype=torch.float16)[1:].view(70, 48)
    x_odd.copy_(x_view)
    assert x_odd.data_ptr() % 16 != 0
    W, A = W[:, 1:].contiguous(), A[:, 1:].contiguous()
    y = emulated(cuda_lora.FUSED, x_odd, W, A, B, 0.7)
    assert_rel_close(y, lora_reference(x_odd, W, A, B, 0.7), torch.float16, "misaligned x")


def test_shrink_split_plan(emulated_lib):
    """Decode (M = 16, K = 4096): 64 slices of 64 columns instead of one block walking all of K."""
    fn = emulated_lib.lora_cuda_shrink_splits
    width = ctypes.c_int()
    assert fn(16, 4096, ctypes.byref(width)) == 64 and width.value == 64
    assert fn(4096, 4096, ctypes.byref(width)) == 5 and width.value == 832  # 64 row blocks already
    assert fn(70, 37, ctypes.byref(width)) == 1  # a short K is not split
    assert fn(70, 200, ctypes.byref(width)) == 4 and width.value == 64
    for M in (1, 16, 64, 65, 300, 4096):  # the Python mirror (used by the roofline) agrees with the .cu
        for K in (16, 37, 200, 4096, 5000):
            assert (fn(M, K, ctypes.byref(width)), width.value) == cuda_lora.shrink_splits(M, K), (M, K)


@pytest.mark.parametrize("rows", [16, 32, 64])
@pytest.mark.parametrize("elem_bytes", [2, 4])
def test_tile_copy_has_no_bank_conflicts(emulated_lib, rows, elem_bytes):
    """The .cu's own store layout (not a copy of it) spreads every warp's stores over the 32 banks."""
    words = (ctypes.c_int * (banks.THREADS * 8))()
    vec = emulated_lib.lora_cuda_tile_store_words(elem_bytes, rows, words)
    assert vec == 16 // elem_bytes
    per_thread = [list(words[t * vec:(t + 1) * vec]) for t in range(banks.THREADS)]
    assert per_thread == banks.padded_store_words(rows, elem_bytes), "banks.py no longer mirrors the .cu"
    stored = sorted(w for t in per_thread for w in t if w >= 0)
    assert len(stored) == len(set(stored)) == rows * banks.BK  # every element of the tile, once
    assert banks.worst_ways(per_thread) == 1


def test_the_first_layout_had_the_conflicts_the_issue_describes():
    assert banks.worst_ways(banks.unpadded_store_words(64)) == 16  # x and W tiles
    assert banks.worst_ways(banks.unpadded_store_words(16)) == 8  # the R = 16 A tile
    assert banks.conflict_ways([0, 32, 64, 0, -1]) == 3 and banks.conflict_ways([-1]) == 0


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
