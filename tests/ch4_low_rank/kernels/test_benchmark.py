"""The benchmark script: its CPU behaviour, its table and its result files (timing itself needs a GPU)."""

import json

import pytest
import torch

from chapters.ch4_low_rank.kernels import benchmark

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


@no_cuda
def test_cpu_exits_cleanly(capsys, tmp_path):
    assert benchmark.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "No CUDA GPU" in out and "roofline prediction" in out
    assert "kernels as written" in out and "triton_kloop_fused" in out
    assert not any(tmp_path.iterdir()), "nothing may be written without measurements"


@no_cuda
def test_cpu_quick_runs_the_interpreter(capsys):
    pytest.importorskip("triton", reason="triton is not installed (Linux only)")
    assert benchmark.main(["--quick", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "triton_kloop_fused" in out and "max relative error" in out


def fake_rows():
    rows = []
    for M in (16, 4096):
        for name, engine, model in [
            ("torch_mm", "torch", "base"),
            ("naive", "torch", "naive"),
            ("triton_base", "triton", "base"),
            ("triton_kloop_fused", "triton", "kloop_fused"),
        ]:
            us = {"torch_mm": 100.0, "naive": 130.0, "triton_base": 110.0, "triton_kloop_fused": 120.0}[name]
            base = 100.0 if engine == "torch" else 110.0
            rows.append(
                {
                    "M": M,
                    "K": 4096,
                    "N": 4096,
                    "r": 16,
                    "variant": name,
                    "engine": engine,
                    "rel_err": 1e-3,
                    "correct": True,
                    "us": us,
                    "tflops": 1.0,
                    "ratio_engine": us / base,
                    "ratio_torch_mm": us / 100.0,
                    "predicted_ratio": benchmark.predicted_ratio(
                        name, engine, model, M, 4096, 4096, 16, benchmark.roofline.H200
                    ),
                }
            )
    return rows


def test_table_and_files(tmp_path):
    pytest.importorskip("triton", reason="triton is not installed (Linux only)")
    rows = fake_rows()
    table = benchmark.format_table(rows)
    assert "triton_kloop_fused" in table and "1.091" in table  # 120 / 110
    meta = benchmark.environment() | {"gpu": "test GPU"}
    assert {"date", "torch", "triton", "cuda"} <= set(meta)
    paths = benchmark.write_results(rows, meta, tmp_path, plot=True, stem="t")
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["meta"]["gpu"] == "test GPU" and len(data["rows"]) == len(rows)
    png = tmp_path / "t.png"
    assert png in paths and png.read_bytes()[:4] == b"\x89PNG"


def test_predictions_use_the_engine():
    pytest.importorskip("triton", reason="triton is not installed (Linux only)")
    H200 = benchmark.roofline.H200
    big = (4096, 4096, 4096, 16)
    assert benchmark.predicted_ratio("torch_mm", "torch", "base", *big, H200) == 1.0
    assert benchmark.predicted_ratio("naive", "torch", "naive", *big, H200) == pytest.approx(1.335, abs=0.01)
    # GPU tiles (BN = 128 at M = 4096), not the interpreter's small ones, whatever machine this runs on
    kloop = benchmark.predicted_ratio("triton_kloop_fused", "triton", "kloop_fused", *big, H200)
    assert kloop == pytest.approx(1.127, abs=0.005)
    # the CUDA fused kernel uses 64-wide tiles: r / 64 = 25% extra shrink work when compute-bound, and it
    # fits 3 CTAs per SM against the base's 4: 0.9919 / 0.973 = 1.019 more
    assert benchmark.predicted_ratio("cuda_fused", "cuda", "kloop_fused", *big, H200) == pytest.approx(
        1.278, abs=0.005
    )
    # rank 64 at 128 x 128 tiles: 1 CTA per SM against 2 (x 1.3) on top of r / BN = 50% more work
    big64 = (4096, 4096, 4096, 64)
    assert benchmark.predicted_ratio("triton_kloop_fused", "triton", "kloop_fused", *big64, H200) == pytest.approx(
        1.957, abs=0.005
    )
    # decode: the split shrink's memset is a third launch, the CUDA naive shrink splits K into 64 slices
    decode = (16, 4096, 4096, 16)
    assert benchmark.predicted_ratio("triton_split_fused", "triton", "split_fused", *decode, H200) == pytest.approx(
        1.534, abs=0.005
    )
    assert benchmark.predicted_ratio("triton_kloop_fused", "triton", "kloop_fused", *decode, H200) == pytest.approx(
        1.011, abs=0.005
    )
    assert benchmark.predicted_ratio("cuda_naive", "cuda", "naive_addmm_splitk", *decode, H200) == pytest.approx(
        1.408, abs=0.005
    )


def test_graph_column_is_labelled_l2_warm():
    pytest.importorskip("triton", reason="triton is not installed (Linux only)")
    table = benchmark.format_table(fake_rows())
    assert "L2-warm" in table.splitlines()[0] and "graph us" in table
    assert "L2 NOT flushed" in benchmark.__doc__.replace("does NOT flush L2", "L2 NOT flushed")


def test_make_inputs_scale():
    x, W, A, B = benchmark.make_inputs(64, 256, 128, 16, torch.float32, "cpu")
    base = x @ W.T
    lora = (x @ A.T) @ B.T
    assert 0.5 < base.std() < 2 and 0.5 < lora.std() < 2  # both terms matter in the correctness check
