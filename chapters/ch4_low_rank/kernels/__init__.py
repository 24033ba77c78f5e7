"""Chapter 4, GPU exercises: the LoRA forward y = x W^T + s (x A^T) B^T, from naive to fused kernels.

Modules, one idea each:
    reference     float32 reference and eager PyTorch variants (naive, addmm_ epilogue, merged weight)
    triton_lora   Triton base GEMM, split fusion and single-kernel (K-loop) fusion
    cuda_lora     raw CUDA C++ naive and fused kernels (lora_cuda.cu), built on a CUDA machine only
    autograd      LoRA as a torch.autograd.Function with a hand-written backward
    multi_adapter one adapter per token (S-LoRA / Punica style) shrink and expand kernels
    roofline      pure-Python time model that predicts the ratios before anything is measured
    banks         shared-memory bank conflicts of the CUDA tile copy, counted in Python
    benchmark     `python -m chapters.ch4_low_rank.kernels.benchmark` (needs a CUDA GPU)
    aot           compile the Triton kernels for sm_80 / sm_90 without a GPU (shared memory, tensor cores)
    interpreter   running Triton on a CPU (TRITON_INTERPRET=1) and the rank padding rule

Importing the package on a machine without CUDA turns on Triton's CPU interpreter (see interpreter.py);
this must happen before `triton` is first imported, which is why it lives here.
"""

from .interpreter import use_interpreter_without_gpu

use_interpreter_without_gpu()
