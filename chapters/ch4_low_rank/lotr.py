"""LoTR: one Tucker-2 factorisation for the updates of a projection type across all layers.

Paper: Daniel Bershatsky, Daria Cherniuk, Talgat Daulbaev, Aleksandr Mikhalev, Ivan Oseledets, "LoTR: Low
Tensor Rank Weight Adaptation", 2024, arXiv 2402.01376 (code: daskol/lotr).

Idea: stack the updates dW_1, ..., dW_N of the same projection in N layers into a 3-way tensor and factor
it Tucker-2 style: two thin factors shared by every layer and a small r x r core per layer. Only the cores
grow with depth, so deep models pay r^2 per extra layer instead of LoRA's r (in + out).

    dW_l = s * U G_l V^T        U [out, r], V [in, r] shared by all layers;  G_l [r, r] per layer
    y    = x W0_l^T + b0_l + s * ((x V) G_l^T) U^T                              s = alpha / r

What trains: U and V once per projection type (e.g. one pair for every `attn.c_attn`) and every core G_l:
r (in + out) + N r^2 numbers per projection type, against LoRA's N r (in + out). Everything else is frozen.

Choices (where the paper leaves it open or the released code differs):
- init: G_l = 0 (dW = 0 at init) and U, V with orthonormal columns (QR of a Gaussian), so the cores start
  with well-scaled gradients; `init="normal"` gives the released code's N(0, 1) factors;
- one (U, V) pair per projection type, found by stripping the layer index from the module name;
- the released code stores transposed factors; here U, V follow nn.Linear's [out, in] convention and the
  tests check dW_l = s U G_l V^T directly.

dtype and device follow the wrapped weights (U and V are drawn and orthonormalised in float32, or float64 for
a float64 model, then cast: torch has no bfloat16 QR). `count_lotr` is the trainable count as a formula.

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/lora.py, chapters/ch4_low_rank/lotr.py
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from chapters.ch4_low_rank.lora import target_shapes
from minimal.hooks import Hooks
from minimal.peft import Mergeable, find_linears, freeze_base, replace_module

if TYPE_CHECKING:
    from minimal.gpt import GPTConfig

INITS = ("orthonormal", "normal")


class TuckerFactors(nn.Module):
    """The shared factors U [out, r] and V [in, r] of one projection type."""

    def __init__(self, out_features: int, in_features: int, r: int, init: str = "orthonormal",
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown LoTR init {init!r}; choose one of {INITS}")
        dtype = dtype or torch.get_default_dtype()
        work = torch.promote_types(dtype, torch.float32)  # QR needs float32 at least
        U = torch.randn(out_features, r, device=device).to(work)  # [out, r]
        V = torch.randn(in_features, r, device=device).to(work)  # [in, r]
        if init == "orthonormal":
            U, V = torch.linalg.qr(U).Q, torch.linalg.qr(V).Q  # orthonormal columns
        self.U, self.V = nn.Parameter(U.to(dtype)), nn.Parameter(V.to(dtype))


class LoTRLinear(Mergeable):
    """y = base(x) + s * ((x V) G^T) U^T with U, V from a (shared) TuckerFactors and a per-layer core G."""

    def __init__(self, base: nn.Linear, factors: TuckerFactors, alpha: float = 16.0) -> None:
        super().__init__(base)
        if factors.U.shape[0] != base.out_features or factors.V.shape[0] != base.in_features:
            raise ValueError(f"LoTR factors U {tuple(factors.U.shape)}, V {tuple(factors.V.shape)} do not fit a "
                             f"layer [out={base.out_features}, in={base.in_features}]")
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        r = factors.U.shape[1]
        self.factors, self.r, self.alpha, self.scale = factors, r, float(alpha), alpha / r
        w = base.weight
        self.G = nn.Parameter(torch.zeros(r, r, device=w.device, dtype=w.dtype))  # [r, r]

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """s * ((x V) G^T) U^T; x [..., in] -> [..., out]."""
        return self.scale * (((x @ self.factors.V) @ self.G.T) @ self.factors.U.T)  # [..., r] -> [..., out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [..., out]
        return y if self.merged else y + self.branch(x)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.factors.U @ self.G @ self.factors.V.T  # [out, r] [r, r] [r, in] -> [out, in]

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, merged={self.merged}"


def apply_lotr(model: nn.Module, r: int = 8, alpha: float = 16.0, targets: str | Iterable[str] = ("c_attn",),
               init: str = "orthonormal") -> Hooks:
    """Freeze `model`; wrap targeted linears in LoTRLinear, one shared (U, V) per projection type.

    The projection type is the name without its layer index ("h.3.attn.c_attn" -> "attn.c_attn").
    """
    if not isinstance(r, int) or isinstance(r, bool):
        raise TypeError(f"LoTR rank r must be an int, got {type(r).__name__}")
    if init not in INITS:
        raise ValueError(f"unknown LoTR init {init!r}; choose one of {INITS}")
    names = find_linears(model, targets)
    for name in names:
        lin = model.get_submodule(name)
        if r <= 0 or r > min(lin.in_features, lin.out_features):
            raise ValueError(f"LoTR rank r={r} must be in [1, {min(lin.in_features, lin.out_features)}] for {name} "
                             f"[out={lin.out_features}, in={lin.in_features}]")
    factors: dict[str, TuckerFactors] = {}
    wrapped = {}
    for name in names:
        lin = model.get_submodule(name)
        kind = projection_type(name)
        if kind not in factors:
            factors[kind] = TuckerFactors(lin.out_features, lin.in_features, r, init, lin.weight.device,
                                          lin.weight.dtype)
        wrapped[name] = LoTRLinear(lin, factors[kind], alpha)  # validate every layer before any change
    freeze_base(model)
    for name, module in wrapped.items():
        replace_module(model, name, module)
    return Hooks()


def projection_type(name: str) -> str:
    """The key that shares U and V: the name without its layer index ("h.3.attn.c_attn" -> "attn.c_attn")."""
    return name.split(".", 2)[-1] if name.startswith("h.") else name


def count_lotr(config: GPTConfig, r: int = 8, targets: str | Iterable[str] = ("c_attn",)) -> int:
    """Trainable entries after apply_lotr: per projection type r (in + out) once, plus r^2 per adapted layer."""
    shapes = target_shapes(config, targets)
    types = {projection_type(name): shape for name, shape in shapes.items()}
    return sum(r * (o + i) for o, i in types.values()) + len(shapes) * r * r
