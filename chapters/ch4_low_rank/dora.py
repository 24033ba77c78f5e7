"""DoRA: weight-decomposed low-rank adaptation (magnitude and direction).

Paper: Liu, Wang, Yin, Molchanov, Wang, Cheng, Chen, "DoRA: Weight-Decomposed Low-Rank Adaptation",
ICML 2024, arXiv 2402.09353 (code NVlabs/DoRA). Not to be confused with the dynamic-rank "DoRA" of
Mao et al. 2024, which is a rank-allocation method (its own file).

Idea: split every weight row into a length and a unit direction; train the lengths m directly and steer
the direction with a LoRA update, which lets fine-tuning change magnitude and direction independently.

Equations (nn.Linear layout, LoRA's convention from lora.py: A [r, in], B [out, r], s = alpha / r):
    V  = W0 + s B A                          [out, in]   the LoRA-updated direction (not yet normalised)
    n  = ||V||_row = sqrt(sum_in V^2)        [out]       one norm per output unit (torch: dim=1)
    W' = diag(m / n) V                       [out, in]   so every row of W' has length m exactly
    y  = x W'^T + b0                                     the bias is not rescaled
At init B = 0 and m = ||W0||_row, so W' = W0 and the output equals the base model's.

What trains: A, B (as in LoRA) and the magnitude m [out] of every targeted layer; count per layer is
r (in + out) + out.

Choices where paper and released code differ (we follow peft, the reference our oracle test checks):
- Norm axis: the paper's "column-wise" norm on W in R^{d x k} is a norm per output unit; with torch's
  [out, in] weight that is the norm over the input axis, dim=1 (as peft computes it).
- Detached norm: n is treated as a constant in backprop (paper section 4.3, the official `dora_simple`,
  and peft). `detach_norm=False` keeps the full gradient through n; the forward is the same either way.
- Forward with dropout (peft / official code): drop(x) feeds both the LoRA term and the rescaling term,
      y = x W0^T + b0 + (m/n - 1) (drop(x) W0^T) + (m/n) s (drop(x) A^T) B^T,
  which equals x W'^T + b0 when dropout is off (eval, or p = 0).
- Merge is not additive: merge writes W' into the base weight and keeps n; unmerge inverts it,
  W0 = W' / (m/n) - s B A (as peft does; the official code cannot unmerge).

dtype: m and the norm n are computed in the weight's dtype, like A and B (lora.py).

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/lora.py, chapters/ch4_low_rank/dora.py
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch4_low_rank.lora import LoRALinear, target_shapes
from minimal.hooks import Hooks
from minimal.peft import inject

if TYPE_CHECKING:
    from minimal.gpt import GPTConfig


class DoRALinear(LoRALinear):
    """LoRA on the direction, a trained length m per output row (see the module docstring)."""

    def __init__(
        self,
        base: nn.Linear,
        r: int = 8,
        alpha: float = 16.0,
        rslora: bool = False,
        dropout: float = 0.0,
        detach_norm: bool = True,
    ) -> None:
        super().__init__(base, r=r, alpha=alpha, rslora=rslora, dropout=dropout)
        self.detach_norm = detach_norm
        with torch.no_grad():
            self.m = nn.Parameter(self.weight_norm().clone())  # [out]; = ||W0||_row since B = 0
        self.merged_norm: torch.Tensor | None = None  # n at merge time, to unmerge exactly

    def lora_delta(self) -> torch.Tensor:
        """The LoRA part s B A: [out, in]."""
        return super().delta_weight()

    def weight_norm(self) -> torch.Tensor:
        """n = ||W0 + s B A|| over the input axis, one value per output unit: [out]."""
        V = self.base.weight + self.lora_delta()  # [out, in]
        return torch.linalg.vector_norm(V, dim=1)  # [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [..., out]
        if self.merged:
            return y
        n = self.weight_norm()  # [out]
        if self.detach_norm:
            n = n.detach()
        g = self.m / n  # [out] the per-row rescaling m / ||V||
        if self.training and isinstance(self.dropout, nn.Dropout):
            x = self.dropout(x)  # both DoRA terms see the dropped input; y keeps the clean one
            base = F.linear(x, self.base.weight)  # [..., out] W0 x_d, no bias
        else:
            base = y if self.base.bias is None else y - self.base.bias  # [..., out] W0 x, no bias
        return y + (g - 1) * base + g * self.branch(x)

    def dora_weight(self) -> torch.Tensor:
        """The effective weight W' = diag(m / n) (W0 + s B A): [out, in] (valid while unmerged)."""
        V = self.base.weight + self.lora_delta()  # [out, in]
        return (self.m / torch.linalg.vector_norm(V, dim=1)).unsqueeze(1) * V  # [out, 1] * [out, in]

    def delta_weight(self) -> torch.Tensor:
        """W' - W0, the whole update DoRA makes (not additive in A and B): [out, in]; valid while unmerged."""
        return self.dora_weight() - self.base.weight

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise ValueError("DoRALinear is already merged; unmerge() before merging again")
        W_new = self.dora_weight()
        if not torch.isfinite(W_new).all():
            raise ValueError("refusing to merge a non-finite DoRA weight")
        self.merged_norm = self.weight_norm()
        self.base.weight.copy_(W_new)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise ValueError("DoRALinear is not merged; nothing to unmerge")
        g = (self.m / self.merged_norm).unsqueeze(1)  # [out, 1]
        self.base.weight.copy_(self.base.weight / g - self.lora_delta())
        self.merged, self.merged_norm = False, None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", detach_norm={self.detach_norm}"


def apply_dora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    targets: str | Iterable[str] = ("c_attn",),
    rslora: bool = False,
    dropout: float = 0.0,
    detach_norm: bool = True,
) -> Hooks:
    """Freeze `model` and wrap every targeted nn.Linear in a DoRALinear (A, B and m train)."""
    inject(
        model, targets,
        lambda lin: DoRALinear(lin, r=r, alpha=alpha, rslora=rslora, dropout=dropout, detach_norm=detach_norm),
    )
    return Hooks()


def count_dora(config: GPTConfig, r: int = 8, targets: str | Iterable[str] = ("c_attn",)) -> int:
    """Trainable entries after apply_dora: r (in + out) + out per adapted layer."""
    return sum(r * (o + i) + o for o, i in target_shapes(config, targets).values())
