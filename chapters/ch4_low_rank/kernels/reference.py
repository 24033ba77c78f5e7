"""Plain PyTorch versions of the LoRA forward pass: the yardstick every kernel is measured against.

    y = x W^T + s (x A^T) B^T        x [M, K], W [N, K], A [r, K], B [N, r], s a float

The same product can be computed in several orders, and the order decides how many times the big
[M, N] output travels through GPU memory:

- `lora_reference`: the answer, computed in float32 whatever the input dtype.
- `lora_naive`: what a straightforward LoRA layer does (HF PEFT style): base GEMM, shrink `t = x A^T`,
  expand `u = t B^T`, scale `u * s`, add `y + u`. Five kernel launches; the last three each read and
  write a full [M, N] tensor, which is where the extra time goes.
- `lora_naive_addmm`: the cheap improvement used by unsloth: the expand accumulates straight into the
  base output with `y.addmm_(t, B^T, alpha=s)`, so cuBLAS does scale + add in its epilogue. Three
  launches, no [M, N] temporary.
- `lora_merged`: fold the adapter into the weight, `W' = W + s B A`, then one GEMM. Free at inference
  for one fixed adapter (merge once), useless when every request has its own adapter.

Every function has the signature `f(x, W, A, B, s) -> y` so the benchmark and tests can swap them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lora_reference(
    x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float, round_shrink: bool = False
) -> Tensor:
    """Float32 reference. Returns float32 whatever the input dtype.

    round_shrink=True rounds the shrink result t = x A^T to x.dtype before the expand, which is what a
    kernel does when it feeds t to a 16-bit matrix multiply; use it to compare such kernels tightly.
    """
    x32, W32, A32, B32 = x.float(), W.float(), A.float(), B.float()
    t = x32 @ A32.T  # [M, r]
    if round_shrink:
        t = t.to(x.dtype).float()
    return x32 @ W32.T + s * (t @ B32.T)  # [M, N]


def lora_epilogue(acc: Tensor, t: Tensor, B: Tensor, s: float) -> Tensor:
    """The step both fused kernels share, on one tile: acc + s t B^T, with acc [BM, BN] a float32
    accumulator, t = x A^T [BM, r] in float32 and B [BN, r]. As on tensor cores, s * t is rounded to
    B's dtype before the product and the product is accumulated in float32. Split fusion runs it before
    its K loop (acc = 0), the K-loop kernel after it (acc = x W^T). Returns a new float32 tile."""
    return acc.float() + (t.float() * s).to(B.dtype).float() @ B.float().T  # [BM, BN]


def lora_naive(x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float) -> Tensor:
    """Eager LoRA, one operation per term: five launches and two extra [M, N] tensors."""
    base = x @ W.T  # [M, N]   launch 1: base GEMM
    t = x @ A.T  # [M, r]      launch 2: shrink (reads x again)
    u = t @ B.T  # [M, N]      launch 3: expand (writes a new [M, N] tensor)
    u = u * s  # [M, N]        launch 4: scale (reads and writes [M, N])
    return base + u  # [M, N]  launch 5: add (reads two [M, N], writes one)


def lora_naive_addmm(x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float) -> Tensor:
    """Eager LoRA with the expand accumulating into y (three launches, one extra pass over y)."""
    y = x @ W.T  # [M, N]              launch 1: base GEMM
    t = x @ A.T  # [M, r]              launch 2: shrink
    return y.addmm_(t, B.T, alpha=s)  # launch 3: y = 1 * y + s * t B^T inside the GEMM epilogue


def merge_weight(W: Tensor, A: Tensor, B: Tensor, s: float) -> Tensor:
    """W' = W + s B A, one launch: addmm reads W and writes W' in the epilogue of B @ A."""
    return torch.addmm(W, B, A, alpha=s)  # [N, K]


def lora_merged(x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float) -> Tensor:
    """Merge then one GEMM. This version merges on every call; a server merges once and keeps W'."""
    return x @ merge_weight(W, A, B, s).T  # [M, N]


# name -> function, all with the signature f(x, W, A, B, s) -> y
TORCH_VARIANTS = {
    "naive": lora_naive,
    "naive_addmm": lora_naive_addmm,
    "merged": lora_merged,
}
