"""Compile the Triton kernels for real GPUs (sm_80 = A100, sm_90 = H100/H200) on a machine without one.

    TRITON_INTERPRET=0 python -m chapters.ch4_low_rank.kernels.aot          # a table
    TRITON_INTERPRET=0 python -m chapters.ch4_low_rank.kernels.aot --json   # JSON (used by the tests)

The CPU interpreter runs the kernels' arithmetic but is more forgiving than the compiler: it accepts a
`tl.dot` whose inner dimension is below 16 and never checks on-chip memory. `triton.compile` with a
`GPUTarget` goes through the real pipeline (Triton IR -> LLVM IR -> PTX -> cubin via ptxas) for a chosen
architecture, no GPU needed, and reports how much shared memory one program needs. Each kernel is
compiled with the tile configs the wrappers use on a GPU, for bfloat16, with the rank padded to 16 and 64,
and with the specialisations a launch at K = N = 4096 would get (pointers and sizes divisible by 16,
unit strides folded to constants); the output also says which tensor-core instruction the PTX uses
(`wgmma` on sm_90, `mma` on sm_80) and, when Triton's bundled `cuobjdump` is there, how many registers
each thread needs (read from the cubin): with the shared memory, that decides how many programs fit on
one SM (roofline.ctas_per_sm). One case compiles the K-loop kernel with an *unpadded* rank 8 and is
expected to fail: that is why the rank is padded.

TRITON_INTERPRET=0 is needed on a machine without a GPU, where importing this package would otherwise
switch the interpreter on (interpreted kernels cannot be compiled); the tests therefore run it in a
subprocess of its own.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import multi_adapter, triton_lora
from .interpreter import is_interpreted

# Largest shared memory one block may use (with the opt-in attribute), in bytes.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
UNIT_STRIDES = ("stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_tr", "stride_yn")


def signature(kernel, dtype: str, constexprs: dict, float_args=("scale",), fp32_ptrs=("t_ptr", "scale_ptr")):
    """Types and divisibility hints for every argument, as a JIT launch with aligned tensors would see."""
    sig, attrs = {}, {}
    consts = dict(constexprs)
    for i, name in enumerate(kernel.arg_names):
        if name in UNIT_STRIDES:
            consts[name] = 1  # a launch with stride 1 specialises it to the constant 1
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            if name in ("tokens_ptr", "counts_ptr", "starts_ptr"):
                sig[name] = "*i32"
            else:
                sig[name] = "*fp32" if name in fp32_ptrs else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in float_args:
            sig[name] = "fp32"
        else:  # sizes and strides, all multiples of 16 at the benchmark shapes
            sig[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def cubin_registers(cubin: bytes) -> int | None:
    """Registers per thread of the (single) kernel in a cubin, from `cuobjdump --dump-resource-usage`;
    None when Triton's bundled cuobjdump is missing or says nothing."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True)
    found = re.search(r"REG:(\d+)", out.stdout)
    return int(found.group(1)) if found else None


def compile_case(
    name: str, kernel, constexprs: dict, arch: int, num_warps: int, num_stages: int, dtype: str = "bf16"
) -> dict:
    """Compile one kernel for one architecture. Never raises: errors are returned in the record."""
    sig, consts, attrs = signature(kernel, dtype, constexprs)
    record = {
        "case": name,
        "arch": arch,
        "dtype": dtype,
        "num_warps": num_warps,
        "num_stages": num_stages,
        **{k: v for k, v in constexprs.items() if k in ("R", "BM", "BN", "BK", "SPLIT_K")},
    }
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": num_warps, "num_stages": num_stages},
        )
    except Exception as e:
        record.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
    else:
        ptx = compiled.asm["ptx"]
        record.update(
            ok=True,
            shared=compiled.metadata.shared,
            limit=SHARED_LIMIT[arch],
            fits=compiled.metadata.shared <= SHARED_LIMIT[arch],
            wgmma="wgmma" in ptx,
            mma="mma.sync" in ptx,
            regs=cubin_registers(compiled.asm["cubin"]),
        )
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def _matmul_case(mode: str, M: int, R: int, arch: int) -> dict:
    cfg = triton_lora.gpu_tiles(M)
    constexprs = dict(
        SPLIT_FUSED=mode == "split",
        KLOOP_FUSED=mode == "kloop",
        R=R,
        BM=cfg.BM,
        BN=cfg.BN,
        BK=cfg.BK,
        GROUP_M=cfg.GROUP_M,
        UPCAST=False,
        PRECISION="tf32",
    )
    return compile_case(
        f"matmul_{mode}_M{M}", triton_lora.lora_matmul_kernel, constexprs, arch, cfg.num_warps, cfg.num_stages
    )


def all_cases(archs=(80, 90)) -> list[dict]:
    """The cases the tests check. For every architecture: the large-M tiles with the largest rank (the most
    shared memory). For the last one (sm_90 by default) also: the decode tiles, the split-K shrink, the
    two multi-adapter kernels, and the expected failure with an unpadded rank."""
    records = []
    for arch in archs:
        records.append(_matmul_case("base", 4096, 16, arch))
        for mode in ("split", "kloop"):
            records.append(_matmul_case(mode, 4096, 64, arch))
    arch = archs[-1]
    records.append(_matmul_case("kloop", 16, 16, arch))
    sc = triton_lora.ShrinkConfig(BM=64, BK=128, SPLIT_K=2)
    records.append(
        compile_case(
            "shrink_splitk",
            triton_lora.lora_shrink_kernel,
            dict(R=64, BM=sc.BM, BK=sc.BK, SPLIT_K=sc.SPLIT_K, UPCAST=False, PRECISION="tf32"),
            arch,
            sc.num_warps,
            sc.num_stages,
        )
    )
    mc = multi_adapter.MultiConfig(BM=64)
    records.append(
        compile_case(
            "multi_shrink",
            multi_adapter.multi_lora_shrink_kernel,
            dict(R=64, BM=mc.BM, BK=mc.BK, UPCAST=False, PRECISION="tf32"),
            arch,
            mc.num_warps,
            mc.num_stages,
        )
    )
    records.append(
        compile_case(
            "multi_expand",
            multi_adapter.multi_lora_expand_kernel,
            dict(R=64, BM=mc.BM, BN=mc.BN, UPCAST=False, PRECISION="tf32"),
            arch,
            mc.num_warps,
            mc.num_stages,
        )
    )
    unpadded = _matmul_case("kloop", 16, 8, arch)  # rank 8 without padding: the expand dot has K = 8
    unpadded["case"] = "matmul_kloop_unpadded_rank8"
    unpadded["expect_failure"] = True
    records.append(unpadded)
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="ahead-of-time compile the Triton LoRA kernels, no GPU needed")
    p.add_argument("--json", action="store_true")
    p.add_argument("--arch", type=int, action="append", help="80 and/or 90 (default both)")
    args = p.parse_args(argv)
    if is_interpreted(triton_lora.lora_matmul_kernel):
        print("TRITON_INTERPRET=1 is set: run with TRITON_INTERPRET=0 to compile", file=sys.stderr)
        return 2
    records = all_cases(tuple(args.arch or (80, 90)))
    if args.json:
        print(json.dumps(records))
        return 0
    print(
        f"{'case':<30} {'sm':>3} {'R':>3} {'tiles':>12} {'shared KiB':>10} {'limit':>6} "
        f"{'tensor core':>11} {'s':>5}"
    )
    for rec in records:
        tiles = "x".join(str(rec[k]) for k in ("BM", "BN", "BK") if k in rec)
        if rec["ok"]:
            tc = "wgmma" if rec["wgmma"] else ("mma" if rec["mma"] else "none")
            print(
                f"{rec['case']:<30} {rec['arch']:>3} {rec['R']:>3} {tiles:>12} {rec['shared'] / 1024:>10.1f} "
                f"{rec['limit'] // 1024:>6} {tc:>11} {rec['seconds']:>5}"
            )
        else:
            print(
                f"{rec['case']:<30} {rec['arch']:>3} {rec['R']:>3} {tiles:>12}  FAILED: {rec['error'][:60]}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
