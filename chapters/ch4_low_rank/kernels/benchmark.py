"""Time every LoRA forward variant on one GPU and set the measurements beside the roofline prediction.

    python -m chapters.ch4_low_rank.kernels.benchmark            # full run, a few minutes on an H100/H200
    python -m chapters.ch4_low_rank.kernels.benchmark --quick    # small smoke run

    y = x W^T + s (x A^T) B^T        x [M, K], W [N, K], A [r, K], B [N, r], bfloat16

What it does, in order:
1. checks every variant against the float32 reference in bfloat16 (a fast wrong kernel is worthless);
2. times each with `triton.testing.do_bench` (median of many runs, L2 cache flushed before each), and for
   small M also with `do_bench_cudagraph` (one CUDA graph replays many calls, so launch gaps vanish).
   The graph timing does NOT flush L2: a 4096 x 4096 bf16 weight (32 MiB) stays in a 50 MB L2 between
   replays, so those numbers are L2-warm. They are reported in their own columns ("graph", keys
   `us_graph_warm`, `ratio_engine_graph_warm`) and compared only with each other, never with the flushed ones;
3. prints microseconds, TFLOP/s (useful LoRA FLOPs), the time over the *same-engine* base GEMM (torch
   variants over torch.mm, Triton over the Triton base GEMM, CUDA over the CUDA base GEMM) and over
   torch.mm, with the roofline prediction (roofline.py) beside each ratio;
4. writes JSON (with GPU name, versions, date) and a PNG plot into results/kernels/.

Why "same engine": LoRA adds a roughly fixed amount of memory traffic and launches. Next to a slow
hand-written GEMM that overhead looks small, so a fused kernel is judged against its own base GEMM.

Shapes: M in {16, 256, 4096} tokens (decode to prefill), K = N = 4096 (a 7B-class projection), r in
{16, 64}. Without a CUDA GPU the script prints the predictions, says so, and exits with code 0; with
--quick it also runs the CPU-capable variants (Triton through its interpreter) on a tiny shape.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from . import reference, roofline

RESULTS_DIR = Path(__file__).resolve().parents[3] / "results" / "kernels"
LoRAFn = Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor]
ENGINE_BASE = {"torch": "torch_mm", "triton": "triton_base", "cuda": "cuda_base"}
BF16_TOL = 2e-2  # max |y - ref| / max |ref|: bf16 keeps 8 bits of mantissa (Punica's tests use 2e-2..3e-2)
SCALE = 0.5


def torch_mm(x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float) -> Tensor:
    """cuBLAS base GEMM x W^T (the engine every framework uses). A, B, s ignored."""
    return torch.mm(x, W.T)


def get_variants(with_cuda_ext: bool) -> dict[str, tuple[LoRAFn, str, str]]:
    """name -> (function, engine, roofline model name). Base GEMMs use the model name "base"."""
    from . import triton_lora

    variants: dict[str, tuple[LoRAFn, str, str]] = {
        "torch_mm": (torch_mm, "torch", "base"),
        "naive": (reference.lora_naive, "torch", "naive"),
        "naive_addmm": (reference.lora_naive_addmm, "torch", "naive_addmm"),
        "merged": (reference.lora_merged, "torch", "merged"),
        "triton_base": (triton_lora.triton_base, "triton", "base"),
        "triton_split_fused": (triton_lora.triton_split_fused, "triton", "split_fused"),
        "triton_kloop_fused": (triton_lora.triton_kloop_fused, "triton", "kloop_fused"),
    }
    if with_cuda_ext:
        from . import cuda_lora

        variants["cuda_base"] = (cuda_lora.cuda_base, "cuda", "base")
        variants["cuda_naive"] = (cuda_lora.cuda_naive, "cuda", "naive_addmm_splitk")
        variants["cuda_fused"] = (cuda_lora.cuda_fused, "cuda", "kloop_fused")
    return variants


def predicted_ratio(
    name: str, engine: str, model: str, M: int, K: int, N: int, r: int, gpu: roofline.GPUSpec
) -> float:
    """Roofline prediction of time / same-engine base time for one variant, for the kernels as written:
    the engine's tiles (A re-read per tile by the K-loop kernel), its split-K shrink (memset) and the
    CTAs per SM of its GEMM kernels (roofline.TRITON_SM90 / CUDA_SM90, read from the compilers)."""
    from .interpreter import padded_rank

    R = padded_rank(r)
    if engine == "cuda":  # CUDA-core kernels: their FMA ceiling, 64 x 64 tiles
        from .cuda_lora import TILE, shrink_splits

        occ = {mode: roofline.ctas_per_sm(*roofline.CUDA_SM90[(mode, rank)], gpu)
               for mode, rank in (("base", 16), ("kloop", R)) if (mode, rank) in roofline.CUDA_SM90}  # fmt: skip
        return roofline.roofline_ratios(M, K, N, r, gpu, tflops=gpu.simt_tflops, block_n=TILE, block_m=TILE,
                                        split_k=shrink_splits(M, K)[0], ctas=occ)[model]  # fmt: skip
    if engine == "triton":
        from .triton_lora import gpu_tiles, shrink_split_k

        tiles = gpu_tiles(M)
        occ = {mode: roofline.ctas_per_sm(*roofline.TRITON_SM90[(mode, tiles.BM, rank)], gpu)
               for mode, rank in (("base", 16), ("split", R), ("kloop", R))
               if (mode, tiles.BM, rank) in roofline.TRITON_SM90}  # fmt: skip
        return roofline.roofline_ratios(M, K, N, r, gpu, block_n=tiles.BN, block_m=tiles.BM,
                                        split_k=shrink_split_k(M, K, gpu.sms), ctas=occ)[model]  # fmt: skip
    return roofline.roofline_ratios(M, K, N, r, gpu, block_n=128)[model]


ENGINE_VARIANTS = [  # (name, engine, roofline model) of every LoRA variant, base GEMMs left out
    ("naive", "torch", "naive"), ("naive_addmm", "torch", "naive_addmm"), ("merged", "torch", "merged"),
    ("triton_split_fused", "triton", "split_fused"), ("triton_kloop_fused", "triton", "kloop_fused"),
    ("cuda_naive", "cuda", "naive_addmm_splitk"), ("cuda_fused", "cuda", "kloop_fused"),
]  # fmt: skip


def format_engine_predictions(shapes: list[tuple[int, int, int, int]], gpu: roofline.GPUSpec) -> str:
    """The predictions for the kernels as written (`predicted_ratio`), one column per shape."""
    head = f"{'variant':<19}" + "".join(f"{f'M={M} r={r}':>14}" for M, _, _, r in shapes)
    lines = [f"predicted time / same-engine base GEMM for the kernels as written, {gpu.name}", head]
    for name, engine, model in ENGINE_VARIANTS:
        cells = "".join(f"{predicted_ratio(name, engine, model, *shape, gpu):>14.3f}" for shape in shapes)
        lines.append(f"{name:<19}{cells}")
    return "\n".join(lines)


def make_inputs(M: int, K: int, N: int, r: int, dtype: torch.dtype, device: str, seed: int = 0):
    """Inputs scaled so that x W^T and s (x A^T) B^T are both of order 1 (B is nonzero, unlike at init)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(M, K, generator=g)  # [M, K]
    W = torch.randn(N, K, generator=g) / K**0.5  # [N, K]
    A = torch.randn(r, K, generator=g) / K**0.5  # [r, K]
    B = torch.randn(N, r, generator=g) / r**0.5  # [N, r]
    return tuple(t.to(device=device, dtype=dtype) for t in (x, W, A, B))


def relative_error(y: Tensor, ref: Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_variants(
    variants: dict[str, tuple[LoRAFn, str, str]], x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float
) -> dict[str, float]:
    """Max relative error of each variant against the float32 reference (base GEMMs against x W^T)."""
    ref = reference.lora_reference(x, W, A, B, s)
    ref_base = x.float() @ W.float().T
    errors = {}
    for name, (fn, _, model) in variants.items():
        try:
            errors[name] = relative_error(fn(x, W, A, B, s), ref_base if model == "base" else ref)
        except Exception as e:  # report and continue: one broken variant must not hide the others
            print(f"  {name}: {type(e).__name__}: {e}", file=sys.stderr)
            errors[name] = float("inf")
    return errors


def time_variant(fn: LoRAFn, args: tuple, graph: bool, warmup: int, rep: int) -> dict[str, float]:
    """Median and 20th/80th percentile in microseconds; plus the CUDA-graph time when `graph`."""
    from triton.testing import do_bench, do_bench_cudagraph

    def call():
        return fn(*args)

    p50, p20, p80 = do_bench(call, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    out = {"us": p50 * 1e3, "us_p20": p20 * 1e3, "us_p80": p80 * 1e3}
    if graph:
        try:
            out["us_graph_warm"] = do_bench_cudagraph(call, rep=rep, return_mode="median") * 1e3  # no L2 flush
        except Exception as e:  # some variants may not be capturable; say so and go on
            print(f"  cuda graph failed: {type(e).__name__}: {e}", file=sys.stderr)
    return out


def run_gpu(
    shapes: list[tuple[int, int, int, int]], with_cuda_ext: bool, warmup: int, rep: int, gpu: roofline.GPUSpec
) -> list[dict]:
    variants = get_variants(with_cuda_ext)
    rows = []
    for M, K, N, r in shapes:
        x, W, A, B = make_inputs(M, K, N, r, torch.bfloat16, "cuda")
        args = (x, W, A, B, SCALE)
        errors = check_variants(variants, *args)
        times = {}
        for name, (fn, _, _) in variants.items():
            if errors[name] == float("inf"):
                continue
            times[name] = time_variant(fn, args, graph=M <= 256, warmup=warmup, rep=rep)
        flops = roofline.lora_flops(M, K, N, r)
        for name, (_, engine, model) in variants.items():
            row = {
                "M": M,
                "K": K,
                "N": N,
                "r": r,
                "variant": name,
                "engine": engine,
                "rel_err": errors[name],
                "correct": errors[name] <= BF16_TOL,
                "predicted_ratio": predicted_ratio(name, engine, model, M, K, N, r, gpu),
            }
            if name in times:
                t = times[name]
                row.update(t)
                row["tflops"] = flops / (t["us"] * 1e-6) / 1e12
                base = times.get(ENGINE_BASE[engine])
                row["ratio_engine"] = t["us"] / base["us"] if base else None
                row["ratio_torch_mm"] = t["us"] / times["torch_mm"]["us"] if "torch_mm" in times else None
                if "us_graph_warm" in t and base and "us_graph_warm" in base:
                    row["ratio_engine_graph_warm"] = t["us_graph_warm"] / base["us_graph_warm"]
            rows.append(row)
        print(format_table([row for row in rows if (row["M"], row["r"]) == (M, r)]), flush=True)
    return rows


def _fmt(v: float | None, spec: str) -> str:
    width = int(spec.split(".")[0])
    return "-".rjust(width) if v is None else format(v, spec)


def format_table(rows: list[dict]) -> str:
    """One line per variant: time, TFLOP/s, ratio to the same-engine base and to torch.mm, prediction.
    The two "graph" columns are CUDA-graph replays without an L2 flush (L2-warm): compare them only
    with each other."""
    head = (
        f"{'M':>5} {'r':>3} {'variant':<19} {'ok':>3} {'us':>9} {'graph us':>9} {'TFLOP/s':>8} "
        f"{'x engine':>8} {'x graph':>8} {'x mm':>7} {'predicted':>9}"
    )
    note = "us, x engine, x mm: L2 flushed before each call; graph us, x graph: CUDA graph, L2-warm (not comparable)"
    lines = [note, head, "-" * len(head)]
    for row in rows:
        lines.append(
            f"{row['M']:>5} {row['r']:>3} {row['variant']:<19} {'yes' if row['correct'] else 'NO':>3} "
            f"{_fmt(row.get('us'), '9.1f')} {_fmt(row.get('us_graph_warm'), '9.1f')} "
            f"{_fmt(row.get('tflops'), '8.1f')} "
            f"{_fmt(row.get('ratio_engine'), '8.3f')} {_fmt(row.get('ratio_engine_graph_warm'), '8.3f')} "
            f"{_fmt(row.get('ratio_torch_mm'), '7.3f')} {row['predicted_ratio']:>9.3f}"
        )
    return "\n".join(lines)


def environment() -> dict:
    import triton

    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count
        )
    return info


def write_results(
    rows: list[dict], meta: dict, out_dir: Path, plot: bool = True, stem: str = "lora_kernels"
) -> list[Path]:
    """<stem>.json (+ <stem>.png of measured vs predicted ratios). Returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=float) + "\n")
    paths = [json_path]
    if plot:
        paths.append(plot_results(rows, out_dir / f"{stem}.png", meta.get("gpu", "GPU")))
    return paths


def plot_results(rows: list[dict], path: Path, title: str) -> Path:
    """One panel per (M, r): bars of measured time / same-engine base, a black tick at the prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(row["M"], row["r"]) for row in rows})
    ncols = min(3, len(shapes))
    nrows = (len(shapes) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    colors = {"torch": "tab:blue", "triton": "tab:orange", "cuda": "tab:green"}
    for ax, (M, r) in zip(axes.flat, shapes):
        sel = [row for row in rows if (row["M"], row["r"]) == (M, r) and row.get("ratio_engine") is not None]
        ys = range(len(sel))
        ax.barh(list(ys), [row["ratio_engine"] for row in sel], color=[colors[row["engine"]] for row in sel])
        ax.scatter(
            [row["predicted_ratio"] for row in sel], list(ys), marker="|", s=200, color="black", zorder=3
        )
        ax.set_yticks(list(ys), [row["variant"] for row in sel], fontsize=8)
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.invert_yaxis()
        ax.set_title(f"M={M}, r={r}", fontsize=10)
        ax.set_xlabel("time / same-engine base GEMM (| = roofline)", fontsize=8)
    for ax in list(axes.flat)[len(shapes) :]:
        ax.axis("off")
    fig.suptitle(f"LoRA forward, bf16, K=N={rows[0]['K'] if rows else '?'} on {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cpu_smoke() -> bool:
    """Run every CPU-capable variant on a tiny float32 shape (Triton through its interpreter)."""
    M, K, N, r = 24, 48, 40, 8
    x, W, A, B = make_inputs(M, K, N, r, torch.float32, "cpu")
    errors = check_variants(get_variants(with_cuda_ext=False), x, W, A, B, SCALE)
    for name, err in errors.items():
        print(f"  {name:<19} max relative error {err:.1e}")
    return all(err <= 1e-4 for err in errors.values())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (two shapes, short timing)")
    p.add_argument("--no-cuda-ext", action="store_true", help="skip building the raw CUDA kernels")
    p.add_argument("--no-plot", action="store_true", help="write JSON only")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"output folder (default {RESULTS_DIR})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu = roofline.H200
    if args.quick:
        shapes = [(16, 1024, 1024, 16), (256, 1024, 1024, 16)]
        warmup, rep = 5, 20
    else:
        shapes = [(M, 4096, 4096, r) for r in (16, 64) for M in (16, 256, 4096)]
        warmup, rep = 25, 100

    if not torch.cuda.is_available():
        print(
            "No CUDA GPU found: nothing to time, and no results were written. Run this on a machine with an"
        )
        print("NVIDIA GPU, a CUDA build of torch and triton. The roofline predictions for the full run:\n")
        full = [(M, 4096, 4096, r) for r in (16, 64) for M in (16, 256, 4096)]
        print(roofline.format_predictions(full, gpu))
        print()
        print(format_engine_predictions(full, gpu))
        if args.quick:
            print("\n--quick on CPU: checking the CPU-capable variants (Triton in its interpreter), float32:")
            if not cpu_smoke():
                print("a variant disagrees with the reference")
                return 1
        return 0

    with_cuda_ext = not args.no_cuda_ext
    if with_cuda_ext:
        from . import cuda_lora

        try:
            print("building the CUDA extension (cached after the first time) ...", flush=True)
            cuda_lora.build()
        except Exception as e:
            print(f"CUDA extension unavailable, skipping its variants: {e}", file=sys.stderr)
            with_cuda_ext = False

    meta = environment() | {
        "shapes": shapes,
        "dtype": "bfloat16",
        "s": SCALE,
        "quick": args.quick,
        "timing": f"triton.testing.do_bench median, warmup={warmup} ms, rep={rep} ms, L2 flushed; "
        "us_graph_warm: do_bench_cudagraph median, L2 NOT flushed (warm)",
        "roofline": gpu.__dict__,
    }
    print(
        f"{meta.get('gpu')}  torch {meta['torch']}  triton {meta['triton']}  CUDA {meta['cuda']}", flush=True
    )
    rows = run_gpu(shapes, with_cuda_ext, warmup, rep, gpu)
    stem = "lora_kernels_quick" if args.quick else "lora_kernels"  # a smoke run never overwrites real results
    for path in write_results(rows, meta, args.out, plot=not args.no_plot, stem=stem):
        print(f"wrote {path}")
    bad = [f"{row['variant']} (M={row['M']}, r={row['r']})" for row in rows if not row["correct"]]
    if bad:
        print("INCORRECT results: " + ", ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
