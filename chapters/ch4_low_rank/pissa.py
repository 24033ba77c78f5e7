"""PiSSA and MiLoRA: LoRA initialised from the singular components of the pretrained weight.

Papers:
- PiSSA: Meng, Wang, Zhang, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
  Language Models", NeurIPS 2024, arXiv 2404.02948 (code GraphPKU/PiSSA; peft `init_lora_weights="pissa"`).
- MiLoRA: Wang, Li, Wang, Chen, Chen, "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient
  LLM Finetuning", 2024, arXiv 2406.09044.

Idea: same architecture as LoRA, but A and B start as r singular triplets of W0 and the rest of W0 stays
frozen as a residual. PiSSA takes the r largest (train the principal subspace, converge fast); MiLoRA
takes the r smallest (adapt in the least-used subspace, disturb pretrained knowledge less).

Equations (LoRA's convention from lora.py: A [r, in], B [out, r], s = alpha / r, y = x W^T + b + s x A^T B^T):
    W0 = U diag(sigma) V^T                        U [out, k], V [in, k], k = min(in, out), sigma descending
    I  = the r chosen indices                     PiSSA: 0..r-1;  MiLoRA: k-r..k-1
    A  = diag(sqrt(sigma_I / s)) V[:, I]^T        [r, in]
    B  = U[:, I] diag(sqrt(sigma_I / s))          [out, r]    so that  s B A = U_I diag(sigma_I) V_I^T
    W_res = W0 - s B A                            frozen; it replaces W0 in the base layer
    y  = x W_res^T + b0 + s (drop(x) A^T) B^T     equals the base output at init
The residual is computed by subtraction in W0's own dtype, from the A and B that train (already cast to that
dtype), so W_res + s B A reproduces W0 to that dtype's rounding (float64: to about 1e-16).

What trains: A and B (count r (in + out) per layer, as LoRA). Frozen: W_res, b0 and everything else.
The wrapped nn.Linear is left untouched: PiSSALinear's `base` is a new frozen layer holding W_res (and the
same bias), so unloading without merging (`unload(model, merge=False)`) leaves W_res, not W0.

Choices where paper and code differ:
- s != 1: sigma is divided by s before the square root (peft and MiLoRA's reference code), so s B A is the
  chosen part of W0 for any alpha; the default alpha = r gives s = 1, the papers' setting.
- The SVD is exact (torch.linalg.svd, as peft's "pissa"; our layers are small, so the randomised
  `pissa_niter_k` variant is not offered). It runs in float32, or float64 for a float64 weight, since torch
  has no bfloat16 SVD; A and B are then cast to the weight's dtype.
- `which` also offers "middle" and "random" (the MiLoRA reference code's other modes) for the notebook's
  initialisation comparison.
- Saving as a plain LoRA relative to the original W0 (peft's conversion): `lora_equivalent()` returns the
  rank-2r pair [B, -B0], [A; A0] with W0 + s [B, -B0][A; A0] = W_res + s B A.
- Dropout defaults to 0: at init the branch carries a real part of W0.

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/lora.py, chapters/ch4_low_rank/pissa.py
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from chapters.ch4_low_rank.lora import LoRALinear, target_shapes
from minimal.hooks import Hooks
from minimal.peft import inject

if TYPE_CHECKING:
    from minimal.gpt import GPTConfig

WHICH = ("principal", "minor", "middle", "random")


def component_indices(k: int, r: int, which: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """The r singular-component indices (of k, sorted by descending sigma) that initialise the adapter."""
    if which == "principal":  # PiSSA
        return torch.arange(r)
    if which == "minor":  # MiLoRA
        return torch.arange(k - r, k)
    if which == "middle":
        start = (k - r) // 2
        return torch.arange(start, start + r)
    if which == "random":
        return torch.randperm(k, generator=generator)[:r].sort().values
    raise ValueError(f"which must be one of {WHICH}, got {which!r}")


def svd_init(W0: torch.Tensor, r: int, which: str = "principal", scale: float = 1.0,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The adapter's start from the SVD of W0 [out, in]: (indices I [r], A [r, in], B [out, r]).

    s B A = U_I diag(sigma_I) V_I^T, the chosen part of W0; sigma_I / s is split evenly (square roots).
    """
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)  # [out, k], [k], [k, in]
    idx = component_indices(S.numel(), r, which, generator).to(S.device)  # [r]
    root = torch.sqrt(S[idx] / scale)  # [r] sigma split evenly between A and B, divided by s
    A = root.unsqueeze(1) * Vh[idx]  # [r, 1] * [r, in] -> [r, in]
    B = U[:, idx] * root  # [out, r] * [r] -> [out, r]
    return idx, A, B


def frozen_linear(weight: torch.Tensor, bias: nn.Parameter | None) -> nn.Linear:
    """An nn.Linear holding `weight` [out, in] as a frozen parameter and sharing the given bias."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")  # no storage, no init
    layer.weight = nn.Parameter(weight, requires_grad=False)
    layer.bias = bias
    return layer


class PiSSALinear(LoRALinear):
    """LoRALinear whose A, B start as r singular triplets of W0 and whose base layer holds W_res = W0 - s B A."""

    def __init__(
        self,
        base: nn.Linear,
        r: int = 8,
        alpha: float | None = None,
        rslora: bool = False,
        dropout: float = 0.0,
        which: str = "principal",
        generator: torch.Generator | None = None,
    ) -> None:
        if which not in WHICH:
            raise ValueError(f"which must be one of {WHICH}, got {which!r}")
        super().__init__(base, r=r, alpha=float(r) if alpha is None else alpha, rslora=rslora, dropout=dropout)
        self.which = which
        W0 = base.weight.detach()  # [out, in], left as it is
        work = torch.promote_types(W0.dtype, torch.float32)  # the SVD needs float32 at least
        idx, A, B = svd_init(W0.to(work), r, which, self.scale, generator)  # [r], [r, in], [out, r]
        with torch.no_grad():
            self.A.copy_(A)  # cast to W0's dtype
            self.B.copy_(B)
            residual = W0 - self.delta_weight()  # W_res [out, in], in W0's dtype, from the cast A and B
        self.base = frozen_linear(residual, base.bias)
        self.register_buffer("component_index", idx)  # [r] which sigma_i the adapter started from
        self.register_buffer("A0", self.A.detach().clone())  # [r, in] for lora_equivalent()
        self.register_buffer("B0", self.B.detach().clone())  # [out, r]

    @torch.no_grad()
    def lora_equivalent(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A rank-2r plain LoRA (A' [2r, in], B' [out, 2r]) on the ORIGINAL W0 with the same scale s:

        W0 + s B' A' = W_res + s B A, because W0 = W_res + s B0 A0.
        """
        return torch.cat([self.A, self.A0], dim=0), torch.cat([self.B, -self.B0], dim=1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", which={self.which}"


def apply_pissa(
    model: nn.Module,
    r: int = 8,
    alpha: float | None = None,
    targets: str | Iterable[str] = ("c_attn",),
    which: str = "principal",
    rslora: bool = False,
    dropout: float = 0.0,
    seed: int = 0,
) -> Hooks:
    """Freeze `model`, wrap every targeted nn.Linear in a PiSSALinear (alpha defaults to r, so s = 1).

    which="principal" is PiSSA, "minor" is MiLoRA; seed is used only by which="random". Every layer is
    built before the model changes (the original layers are never written to).
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    gen = torch.Generator().manual_seed(seed)
    inject(
        model, targets,
        lambda lin: PiSSALinear(lin, r=r, alpha=alpha, rslora=rslora, dropout=dropout, which=which, generator=gen),
    )
    return Hooks()


def apply_milora(
    model: nn.Module,
    r: int = 8,
    alpha: float | None = None,
    targets: str | Iterable[str] = ("c_attn",),
    rslora: bool = False,
    dropout: float = 0.0,
) -> Hooks:
    """MiLoRA: PiSSA's construction on the r smallest singular components."""
    return apply_pissa(model, r=r, alpha=alpha, targets=targets, which="minor", rslora=rslora, dropout=dropout)


def count_pissa(config: GPTConfig, r: int = 8, targets: str | Iterable[str] = ("c_attn",)) -> int:
    """Trainable entries after apply_pissa: r (in + out) per adapted layer, as LoRA."""
    return sum(r * (o + i) for o, i in target_shapes(config, targets).values())


def count_milora(config: GPTConfig, r: int = 8, targets: str | Iterable[str] = ("c_attn",)) -> int:
    """Trainable entries after apply_milora: r (in + out) per adapted layer, as LoRA."""
    return count_pissa(config, r, targets)
