"""Test setup for the LoRA kernels: Triton's CPU interpreter must be switched on before triton is imported.

Why in-process and not a subprocess per test: the interpreter tests are many small runs, and a fresh
Python with torch and triton costs seconds each. Setting TRITON_INTERPRET=1 here, at the top of the
folder's conftest (pytest imports it before the test modules of this folder), is enough because:
- nothing imports triton at import time except this project's kernel package, whose __init__ sets the
  same variable first (so even a test elsewhere that imports the package earlier is safe);
- test_triton_lora.py::test_cpu_runs_in_interpreter fails loudly if triton still ended up compiled.
The one check that needs compiled mode, the ahead-of-time compilation (test_aot.py), runs in a
subprocess with TRITON_INTERPRET=0. On a machine with a CUDA GPU nothing is set and the same tests run
the compiled kernels on the GPU.

The three slow compilations (Triton AOT, nvcc -Xptxas -v, the g++ build of the CUDA emulation) are
external processes. They are started as soon as collection is over, in the background, and the tests
that need them wait for their results, so they overlap with the interpreter tests (`background` fixture).
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
CU_FILE = REPO / "chapters" / "ch4_low_rank" / "kernels" / "lora_cuda.cu"
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++") or shutil.which("c++")


def cuda_include_dir() -> Path | None:
    """The CUDA include folder (cuda_fp16.h, cuda_bf16.h): from CUDA_HOME, beside nvcc, or /usr/local/cuda."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if NVCC:
        roots.append(str(Path(NVCC).resolve().parent.parent))
    roots.append("/usr/local/cuda")
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda_bf16.h").exists():
            return Path(root) / "include"
    return None


class Job:
    """An external command started in the background; result() waits and returns (returncode, output)."""

    def __init__(self, cmd: list[str], workdir: Path, env: dict | None = None):
        self.cmd, self.workdir = cmd, workdir
        self.log = open(workdir / "output.txt", "w+")
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True
        )

    def result(self, timeout: float = 600) -> tuple[int, str]:
        self.proc.wait(timeout=timeout)
        self.log.seek(0)
        return self.proc.returncode, self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def job_commands(root: Path) -> dict[str, tuple[str, list[str], dict | None]]:
    """name -> (test file that needs it, command, environment); left out when the tool is missing.
    Each job writes into root / name."""
    jobs = {}
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=path)
    if importlib.util.find_spec("triton") is not None:
        aot = [sys.executable, "-m", "chapters.ch4_low_rank.kernels.aot", "--json"]
        jobs["aot"] = ("test_aot.py", aot, env)
    if NVCC:  # both architectures in one call, compiled in parallel (--threads 2)
        archs = "-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 --threads 2".split()
        out = root / "nvcc" / "lora_cuda.fatbin"
        cmd = [NVCC, *archs, "-fatbin", "-Xptxas", "-v", str(CU_FILE), "-o", str(out)]
        jobs["nvcc"] = ("test_cuda_lora.py", cmd, None)
    include = cuda_include_dir()
    if include and CXX:
        flags = f"-std=c++20 -O1 -shared -fPIC -pthread -Wno-unknown-pragmas -I{include}".split()
        shim = ["-include", str(HERE / "cuda_emulation.h")]
        out = root / "emulation" / "lora_cuda_emulated.so"
        cmd = [CXX, *flags, *shim, "-x", "c++", str(CU_FILE), "-o", str(out)]
        jobs["emulation"] = ("test_cuda_lora.py", cmd, None)
    return jobs


_JOBS: dict[str, Job] = {}
_JOB_ROOT: list[str] = []


def _start_jobs(names: set[str]) -> None:
    if _JOBS or not names:
        return
    root = tempfile.mkdtemp(prefix="lora_kernel_tests_")
    _JOB_ROOT.append(root)
    for name, (test_file, cmd, env) in job_commands(Path(root)).items():
        if test_file in names:
            workdir = Path(root) / name
            workdir.mkdir()
            _JOBS[name] = Job(cmd, workdir, env)


WAITING_FILES = ("test_aot.py", "test_cuda_lora.py")


def pytest_collection_modifyitems(session, config, items):
    """Run the tests that wait for a background compilation last, so the compilations overlap the rest."""
    waiting = [item for item in items if item.path.parent == HERE and item.path.name in WAITING_FILES]
    if waiting:
        ids = {id(item) for item in waiting}
        items[:] = [item for item in items if id(item) not in ids] + waiting


def pytest_collection_finish(session):
    """Start the slow compilations needed by the selected tests, in the background."""
    if session.config.option.collectonly:
        return
    _start_jobs({item.path.name for item in session.items if item.path.parent == HERE})


def pytest_sessionfinish(session, exitstatus):
    for job in _JOBS.values():
        job.stop()
    for root in _JOB_ROOT:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def background():
    """name -> Job for the background compilations; a test skips if its tool is missing on this machine."""

    def get(name: str) -> Job:
        if not _JOBS:  # in case the collection hook did not run
            _start_jobs(set(WAITING_FILES))
        if name not in _JOBS:
            pytest.skip(f"{name}: the tool it needs is not installed here (nvcc / g++ / CUDA headers)")
        return _JOBS[name]

    return get


# max |y - ref| / max |ref| allowed, per input dtype: float32 dots use IEEE products; 16-bit outputs are
# rounded to 11 (fp16) or 8 (bf16) significant bits, and the rank intermediate may be rounded too.
REL_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def device() -> str:
    """Where kernels run: the GPU when there is one, else the CPU (Triton through its interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def assert_rel_close():
    """assert_rel_close(y, ref, dtype): max |y - ref| / max |ref| <= the tolerance for dtype."""

    def check(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> float:
        assert y.shape == ref.shape, f"{what}: shape {tuple(y.shape)} != {tuple(ref.shape)}"
        err = _max_rel_err(y, ref)
        assert err <= REL_TOL[dtype], f"{what}: relative error {err:.2e} > {REL_TOL[dtype]:.0e} ({dtype})"
        return err

    return check
