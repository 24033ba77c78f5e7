"""Kronecker-product updates: KronA and KAdaptation.

Papers:
- KronA: Ali Edalati, Marzieh Tahaei, Ivan Kobyzev, Vahid Partovi Nia, James J. Clark, Mehdi Rezagholizadeh,
  "KronA: Parameter Efficient Tuning with Kronecker Adapter", 2022, arXiv 2212.10650.
- KAdaptation: Xuehai He, Chunyuan Li, Pengchuan Zhang, Jianwei Yang, Xin Eric Wang, "Parameter-efficient
  Model Adaptation for Vision Transformers", AAAI 2023, arXiv 2203.16329 (code: eric-ai-lab/PEViT).

Idea: write the update of a frozen W0 [out, in] as a Kronecker product of small matrices instead of a
thin product B A. rank(A (x) B) = rank(A) rank(B), so a few hundred numbers can give a full-rank update.
KAdaptation sums n such products, shares the small left factors across layers ("slow weights") and makes
each per-layer right factor low-rank ("fast weights").

KronA, with A [a1, a2], B [b1, b2], a1 b1 = out, a2 b2 = in:

    dW = s * kron(A, B)                       kron(A, B)[i1 b1 + i2, j1 b2 + j2] = A[i1, j1] B[i2, j2]
    y  = x W0^T + b0 + s * vec(A X B^T)       X = x reshaped to [a2, b2]: dW is never built in forward

KAdaptation, n terms, A_i [n, n] shared by every layer of one projection type, u_i [out/n, r] and
v_i [in/n, r] per layer:

    dW = s * sum_i kron(A_i, u_i v_i^T)

What trains: KronA: A and B of each targeted layer, a1 a2 + b1 b2 numbers. KAdaptation: the shared A_i,
n^3 numbers per projection type (e.g. one set for every `attn.c_attn`), plus u_i, v_i per layer,
n r (out/n + in/n) = r (in + out) numbers. Everything else is frozen.

Choices (where the papers leave it open or the released code differs):
- KronA init: neither the paper nor a released code fixes one; A is kaiming-uniform (nn.Linear's
  default) and B = 0, so dW = 0 at init as in LoRA. Default factor shapes: the divisors of out and of in
  closest to their square roots (override with `a_shape`). Only the parallel-to-a-weight form is here,
  not the FFN-level KronA^B variants.
- KAdaptation: the released code zero-initialises both fast factors (so they can never move) and reuses the
  q factors for v; both are treated as bugs. Here A_i ~ U(-0.01, 0.01) as released, u_i kaiming-uniform,
  v_i = 0 (dW = 0 at init), and each projection type has its own factors. A_i are full n x n matrices (the
  code factorises them to rank 1 as well); no branch bias and no dropout on dW (the code has both).
  `share=False` gives every layer its own A_i (the ablation that shows what sharing saves).

dtype and device follow the weight each factor attaches to (the shared A_i: the first layer of its type).
`count_krona` / `count_kadaptation` are the trainable counts as formulas of the GPT config.

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/lora.py, chapters/ch4_low_rank/krona.py
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from chapters.ch4_low_rank.lora import target_shapes
from minimal.hooks import Hooks
from minimal.peft import Mergeable, find_linears, freeze_base, inject, replace_module

if TYPE_CHECKING:
    from minimal.gpt import GPTConfig


def closest_divisor(n: int, target: float) -> int:
    """The divisor of n closest to target (the smaller one on a tie)."""
    return min((k for k in range(1, n + 1) if n % k == 0), key=lambda k: (abs(k - target), k))


def kron_shapes(out_features: int, in_features: int, a_shape: tuple[int, int] | None = None
                ) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes (a1, a2), (b1, b2) with a1 b1 = out and a2 b2 = in; near-square factors by default."""
    if a_shape is None:
        a_shape = (closest_divisor(out_features, math.sqrt(out_features)),
                   closest_divisor(in_features, math.sqrt(in_features)))
    if len(a_shape) != 2 or not all(isinstance(a, int) and a > 0 for a in a_shape):
        raise ValueError(f"a_shape must be two positive ints (a1, a2), got {a_shape!r}")
    a1, a2 = a_shape
    if out_features % a1 or in_features % a2:
        raise ValueError(
            f"KronA factor A of shape {a_shape} does not factor a layer of shape [out={out_features}, "
            f"in={in_features}]: a1 must divide out and a2 must divide in"
        )
    return (a1, a2), (out_features // a1, in_features // a2)


class KronALinear(Mergeable):
    """y = base(x) + s * kron(A, B) x, computed as A X B^T on x reshaped to [a2, b2]."""

    def __init__(self, base: nn.Linear, a_shape: tuple[int, int] | None = None, scale: float = 1.0) -> None:
        super().__init__(base)
        if not scale > 0:
            raise ValueError(f"KronA scale must be positive, got {scale}")
        (a1, a2), (b1, b2) = kron_shapes(base.out_features, base.in_features, a_shape)
        self.scale = float(scale)
        w = base.weight
        self.A = nn.Parameter(torch.empty(a1, a2, device=w.device, dtype=w.dtype))  # [a1, a2]
        self.B = nn.Parameter(torch.zeros(b1, b2, device=w.device, dtype=w.dtype))  # [b1, b2]
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """s * kron(A, B) x without materialising the Kronecker product; x [..., in] -> [..., out]."""
        X = x.unflatten(-1, (self.A.shape[1], self.B.shape[1]))  # [..., a2, b2]
        Y = torch.einsum("ij,...jk,lk->...il", self.A, X, self.B)  # A X B^T: [..., a1, b1]
        return self.scale * Y.flatten(-2)  # [..., out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [..., out]
        return y if self.merged else y + self.branch(x)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * torch.kron(self.A, self.B)  # [a1 b1, a2 b2] = [out, in]

    def extra_repr(self) -> str:
        return f"A={tuple(self.A.shape)}, B={tuple(self.B.shape)}, scale={self.scale:.4g}, merged={self.merged}"


def apply_krona(model: nn.Module, a_shape: tuple[int, int] | None = None, scale: float = 1.0,
                targets: str | Iterable[str] = ("c_attn",)) -> Hooks:
    """Freeze `model` and wrap every targeted nn.Linear in a KronALinear (one A, B pair per layer)."""
    inject(model, targets, lambda lin: KronALinear(lin, a_shape, scale))  # builds (validates) every layer first
    return Hooks()


def count_krona(config: GPTConfig, a_shape: tuple[int, int] | None = None,
                targets: str | Iterable[str] = ("c_attn",)) -> int:
    """Trainable entries after apply_krona: a1 a2 + b1 b2 per adapted layer."""
    total = 0
    for o, i in target_shapes(config, targets).values():
        (a1, a2), (b1, b2) = kron_shapes(o, i, a_shape)
        total += a1 * a2 + b1 * b2
    return total


# ------------------------------------------------------------------------------------------ KAdaptation


class SlowWeights(nn.Module):
    """The n shared left factors A_i [n, n] of one projection type, held by every layer that uses them."""

    def __init__(self, n: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(n, n, n, device=device, dtype=dtype).uniform_(-0.01, 0.01))  # [n, n, n]


class KAdaptationLinear(Mergeable):
    """y = base(x) + s * sum_i kron(A_i, u_i v_i^T) x with A_i from a (shared) SlowWeights module."""

    def __init__(self, base: nn.Linear, slow: SlowWeights, r: int = 1, scale: float = 1.0) -> None:
        super().__init__(base)
        n = slow.A.shape[0]
        out_f, in_f = base.out_features, base.in_features
        if out_f % n or in_f % n:
            raise ValueError(f"KAdaptation n={n} must divide both dimensions of the layer [out={out_f}, in={in_f}]")
        if not isinstance(r, int) or isinstance(r, bool):
            raise TypeError(f"KAdaptation rank r must be an int, got {type(r).__name__}")
        if r <= 0 or r > min(out_f, in_f) // n:
            raise ValueError(f"KAdaptation rank r={r} must be in [1, {min(out_f, in_f) // n}] "
                             f"(the fast factors are [{out_f // n}, r] and [{in_f // n}, r])")
        if not scale > 0:
            raise ValueError(f"KAdaptation scale must be positive, got {scale}")
        self.slow, self.r, self.scale = slow, r, float(scale)
        w = base.weight
        self.u = nn.Parameter(torch.empty(n, out_f // n, r, device=w.device, dtype=w.dtype))  # [n, out/n, r]
        self.v = nn.Parameter(torch.zeros(n, in_f // n, r, device=w.device, dtype=w.dtype))  # [n, in/n, r]
        for u_i in self.u:
            nn.init.kaiming_uniform_(u_i, a=math.sqrt(5))

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """s * sum_i kron(A_i, u_i v_i^T) x, factor by factor; x [..., in] -> [..., out]."""
        A = self.slow.A  # [n, n, n]: term i, row a, column j
        X = x.unflatten(-1, (A.shape[2], -1))  # [..., n, in/n]
        t = torch.einsum("...jb,ibr->...ijr", X, self.v)  # X v_i: [..., n, n, r]
        t = torch.einsum("iaj,...ijr->...iar", A, t)  # A_i X v_i: [..., n, n, r]
        Y = torch.einsum("...iar,icr->...ac", t, self.u)  # sum_i A_i X v_i u_i^T: [..., n, out/n]
        return self.scale * Y.flatten(-2)  # [..., out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [..., out]
        return y if self.merged else y + self.branch(x)

    def delta_weight(self) -> torch.Tensor:
        fast = self.u @ self.v.transpose(1, 2)  # u_i v_i^T: [n, out/n, in/n]
        return self.scale * sum(torch.kron(a, b) for a, b in zip(self.slow.A, fast))  # [out, in]

    def extra_repr(self) -> str:
        return f"n={self.slow.A.shape[0]}, r={self.r}, scale={self.scale:.4g}, merged={self.merged}"


def apply_kadaptation(model: nn.Module, n: int = 4, r: int = 1, scale: float = 1.0,
                      targets: str | Iterable[str] = ("c_attn",), share: bool = True) -> Hooks:
    """Freeze `model`; wrap targeted linears in KAdaptationLinear, one SlowWeights per projection type.

    The projection type is the name without its layer index ("h.3.attn.c_attn" -> "attn.c_attn").
    """
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"KAdaptation n must be a positive int, got {n!r}")
    names = find_linears(model, targets)
    slow: dict[str, SlowWeights] = {}
    wrapped = {}
    for name in names:
        lin = model.get_submodule(name)
        kind = projection_type(name, share)
        if kind not in slow:
            slow[kind] = SlowWeights(n, lin.weight.device, lin.weight.dtype)
        wrapped[name] = KAdaptationLinear(lin, slow[kind], r, scale)  # validate every layer before any change
    freeze_base(model)
    for name, module in wrapped.items():
        replace_module(model, name, module)
    return Hooks()


def projection_type(name: str, share: bool = True) -> str:
    """The key that shares slow weights: "h.3.attn.c_attn" -> "attn.c_attn" (share=False: the full name)."""
    return name.split(".", 2)[-1] if share and name.startswith("h.") else name


def count_kadaptation(config: GPTConfig, n: int = 4, r: int = 1, targets: str | Iterable[str] = ("c_attn",),
                      share: bool = True) -> int:
    """Trainable entries after apply_kadaptation: n^3 per projection type (shared A_i) + r (in + out) per layer."""
    shapes = target_shapes(config, targets)
    n_types = len({projection_type(name, share) for name in shapes})
    return n_types * n**3 + sum(r * (o + i) for o, i in shapes.values())
