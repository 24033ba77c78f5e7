"""Running Triton kernels without a GPU.

Triton ships an interpreter: with the environment variable TRITON_INTERPRET=1, `@triton.jit` returns a
Python object that runs each program instance one after another with numpy, on CPU tensors. It is slow
(seconds for a 256 x 512 x 512 matmul) but exact enough to test tiling, masks and index arithmetic.

The switch is read when a kernel is *decorated*, i.e. when its module is imported, not when it runs.
Triton's own helpers (`tl.cdiv`, `tl.sum`, ...) are decorated when `triton` itself is imported, so the
variable must be set before the first `import triton` anywhere in the process. This package's
`__init__.py` calls `use_interpreter_without_gpu()` before any kernel module is loaded: on a machine
without CUDA it sets TRITON_INTERPRET=1 unless the user already chose a value. The test folder's
conftest.py does the same before anything else. If triton was imported earlier in compiled mode, the
wrappers refuse CPU tensors with a message saying so (`check_runnable`) instead of failing obscurely.

Two known gaps of the interpreter, both handled by the wrappers in this package:
- `tl.dot` on bfloat16 operands gives garbage (it multiplies the raw bit patterns), so bf16 tiles are
  converted to float32 before every `tl.dot` when interpreting (the `UPCAST` constexpr).
- it accepts `tl.dot` with an inner dimension below 16, which the real compiler rejects, so the rank is
  padded to at least 16 everywhere (see `padded_rank`).
"""

from __future__ import annotations

import os

import torch


def use_interpreter_without_gpu() -> bool:
    """Set TRITON_INTERPRET=1 when there is no CUDA device and the user has not set it. Returns its state."""
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    return interpreter_requested()


def interpreter_requested() -> bool:
    """Whether TRITON_INTERPRET is set to a true value right now."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def is_interpreted(kernel: object) -> bool:
    """True when `kernel` was decorated in interpreter mode (it then runs on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def padded_rank(r: int) -> int:
    """The rank used inside the kernels: a power of two (for tl.arange) and at least 16 (for tl.dot).

    The extra rows of A and columns of B are never stored; masked loads read them as zeros, so the
    padding changes nothing in the result.
    """
    return max(16, 1 << max(r - 1, 0).bit_length())


def check_runnable(kernel: object, device: torch.device) -> None:
    """Raise a clear error when `kernel` cannot run on tensors of `device`."""
    if device.type == "cuda":
        if is_interpreted(kernel):
            raise RuntimeError(
                "TRITON_INTERPRET=1 was set when the kernels were imported; unset it to use the GPU"
            )
        return
    import triton.language as tl

    if not is_interpreted(kernel):
        raise RuntimeError(
            f"Triton kernels need CUDA tensors (got {device}), "
            "or TRITON_INTERPRET=1 set before `import triton`"
        )
    if not is_interpreted(tl.cdiv):
        raise RuntimeError(
            "triton was imported before TRITON_INTERPRET=1 was set, so its library functions are "
            "compiled-mode objects; set TRITON_INTERPRET=1 before the first `import triton` "
            "(import this package first)"
        )
