"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90, with no GPU.

Runs `python -m chapters.ch4_low_rank.kernels.aot --json` once, in a subprocess with TRITON_INTERPRET=0
(started in the background by conftest.py): this test process has the interpreter switched on, and
interpreted kernels cannot be compiled. The compiler rejects what the interpreter lets through (tl.dot
with an inner dimension below 16) and reports the shared memory each program needs, which must fit the
per-block limit.
"""

import json

import pytest

pytest.importorskip("triton", reason="triton is not installed (Linux only)")

LIMIT_KIB = {80: 163, 90: 227}


@pytest.fixture(scope="module")
def records(background):
    returncode, output = background("aot").result()
    assert returncode == 0, output[-3000:]
    json_lines = [line for line in output.splitlines() if line.startswith("[")]  # warnings may surround it
    assert json_lines, output[-3000:]
    return json.loads(json_lines[-1])


def test_every_case_compiles_and_fits(records):
    expected = [rec for rec in records if not rec.get("expect_failure")]
    assert {rec["arch"] for rec in expected} == {80, 90}
    assert len(expected) >= 10
    for rec in expected:
        where = f"{rec['case']} sm_{rec['arch']} R={rec.get('R')}"
        assert rec["ok"], f"{where}: {rec.get('error')}"
        assert rec["limit"] == LIMIT_KIB[rec["arch"]] * 1024
        assert 0 < rec["shared"] <= rec["limit"], f"{where}: {rec['shared']} bytes of shared memory"


def test_tensor_cores_are_used(records):
    for rec in records:
        if not rec.get("ok") or not rec["case"].startswith("matmul_") or rec.get("BM", 0) < 64:
            continue
        if rec["arch"] == 90:
            assert rec["wgmma"], f"{rec['case']}: no wgmma in the sm_90 PTX"
        else:
            assert rec["mma"], f"{rec['case']}: no mma.sync in the sm_80 PTX"


def test_unpadded_rank_is_rejected(records):
    """Why the rank is padded to 16: the compiler refuses the epilogue dot [BM, 8] x [8, BN]."""
    (rec,) = [rec for rec in records if rec.get("expect_failure")]
    assert not rec["ok"]
    assert "K >= 16" in rec["error"], rec["error"][:500]


def test_occupancy_table_matches_the_compiler(records):
    """roofline.TRITON_SM90 (registers, shared memory) must give the occupancy this compiler gives: the
    K-loop kernel at rank 64 with 128 x 128 tiles fits one program per SM, the base GEMM two."""
    from chapters.ch4_low_rank.kernels.roofline import TRITON_SM90, ctas_per_sm

    checked = 0
    for rec in records:
        mode = rec["case"].split("_")[1] if rec["case"].startswith("matmul_") else None
        key = (mode, rec.get("BM"), rec.get("R"))
        if not rec.get("ok") or rec["arch"] != 90 or key not in TRITON_SM90 or rec.get("regs") is None:
            continue
        table = ctas_per_sm(*TRITON_SM90[key])
        assert ctas_per_sm(rec["regs"], rec["shared"], rec["num_warps"]) == table, (key, rec["regs"], rec["shared"])
        checked += 1
    if checked == 0:
        pytest.skip("Triton's cuobjdump is not available: no register counts")
    assert ctas_per_sm(*TRITON_SM90[("kloop", 128, 64)]) == 1 and ctas_per_sm(*TRITON_SM90[("base", 128, 16)]) == 2
