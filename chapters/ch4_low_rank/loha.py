"""LoHa: a low-rank Hadamard product update (FedPara's parameterisation as a PEFT adapter).

Paper: Nam Hyeon-Woo, Moon Ye-Bin, Tae-Hyun Oh, "FedPara: Low-Rank Hadamard Product for
Communication-Efficient Federated Learning", ICLR 2022, arXiv 2108.06098. As an adapter: LyCORIS
(KohakuBlueleaf) and Hugging Face peft's LoHaConfig, which we follow.

Idea: the element-wise (Hadamard) product of two rank-r matrices has rank up to r^2, not 2r. So with
LoRA's two pairs of thin factors, 2 r (in + out) numbers, the update can reach rank r^2: r = 8 gives up to
rank 64 for the price of a rank-16 LoRA. It is the Hadamard counterpart of KronA's Kronecker product.

    W0 [out, in] frozen       B1, B2 [out, r]     A1, A2 [r, in]     (trained)
    dW = s * (B1 A1) ⊙ (B2 A2)    [out, in],    s = alpha / r
    y  = x W0^T + b0 + x dW^T     (dW is built in every forward, as peft does)
    init: B1, A1, B2 ~ kaiming_uniform(a=sqrt(5)) (nn.Linear's default), A2 = 0  =>  dW = 0 at init
    rank:  (B1 A1) ⊙ (B2 A2) = (B1 ⊙_row B2)(A1 ⊙_col A2), an [out, r^2] times [r^2, in] product, where
           (B1 ⊙_row B2)[o, (i, j)] = B1[o, i] B2[o, j]  and  (A1 ⊙_col A2)[(i, j), n] = A1[i, n] A2[j, n]

What trains: B1, A1, B2, A2 of every targeted layer, 2 r (in + out) numbers per layer; everything else is
frozen. peft names them hada_w1_a = B1, hada_w1_b = A1, hada_w2_a = B2, hada_w2_b = A2 (same shapes).

Choices where paper and code differ:
- FedPara reparameterises the weight itself, trained from scratch, and initialises every factor with He
  init; here (as in LyCORIS and peft) it is an update beside a frozen W0, and A2 starts at zero so the model
  is unchanged at init. With A2 = 0 only A2 gets a gradient at the first step (every other factor's
  gradient is multiplied by B2 A2 or by A2), as in peft.
- peft's rank_dropout and module_dropout, its hand-written backward (HadaWeight: the same gradients as
  autograd) and its Conv variants (Tucker cores hada_t1, hada_t2) are left out. FedPara's optional
  non-linearity (tanh around each product) is left out, as in peft.
- r is limited to min(in, out), as LoRA's (a larger r cannot raise either factor's rank).

dtype and device: the factors take the dtype and device of the weight they attach to. `count_loha(config,
r, targets)` is the trainable count as a formula of the GPT config.

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/lora.py, chapters/ch4_low_rank/loha.py
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from chapters.ch4_low_rank.lora import check_rank, lora_scale, target_shapes
from minimal.hooks import Hooks
from minimal.peft import Mergeable, inject

if TYPE_CHECKING:
    from minimal.gpt import GPTConfig


class LoHaLinear(Mergeable):
    """y = base(x) + x dW^T, dW = s (B1 A1) ⊙ (B2 A2) (see the box above)."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 8.0) -> None:
        super().__init__(base)
        check_rank(r, base, type(self).__name__)
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite positive number, got {alpha!r}")
        self.r, self.alpha = r, float(alpha)
        self.scale = lora_scale(r, alpha)
        w = base.weight  # [out, in]
        out_f, in_f = base.out_features, base.in_features
        self.B1 = nn.Parameter(torch.empty(out_f, r, device=w.device, dtype=w.dtype))  # [out, r]
        self.A1 = nn.Parameter(torch.empty(r, in_f, device=w.device, dtype=w.dtype))  # [r, in]
        self.B2 = nn.Parameter(torch.empty(out_f, r, device=w.device, dtype=w.dtype))  # [out, r]
        self.A2 = nn.Parameter(torch.zeros(r, in_f, device=w.device, dtype=w.dtype))  # [r, in], zero: dW = 0
        for p in (self.B1, self.A1, self.B2):  # peft's order and init
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.B1 @ self.A1) * (self.B2 @ self.A2)  # [out, in] ⊙ [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [..., out]
        if self.merged:
            return y
        return y + x @ self.delta_weight().T  # [..., in] @ [in, out]

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, merged={self.merged}"


def apply_loha(
    model: nn.Module, r: int = 8, alpha: float = 8.0, targets: str | Iterable[str] = ("c_attn",)
) -> Hooks:
    """Freeze `model` and wrap every targeted nn.Linear in a LoHaLinear; nothing else trains.

    targets: as in apply_lora (peft's name rule). Every layer is built (and checked) before the model changes.
    """
    inject(model, targets, lambda lin: LoHaLinear(lin, r=r, alpha=alpha))
    return Hooks()


def count_loha(config: GPTConfig, r: int = 8, targets: str | Iterable[str] = ("c_attn",)) -> int:
    """Trainable entries after apply_loha: 2 r (in + out) per adapted layer."""
    return sum(2 * r * (o + i) for o, i in target_shapes(config, targets).values())
