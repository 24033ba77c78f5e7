"""Learned binary masks: fine-tune by choosing which pretrained weights to keep.

Paper: Zhao, Lin, Mi, Jaggi, Schütze, "Masking as an Efficient Alternative to Finetuning for Pretrained
Language Models", EMNLP 2020, arXiv 2004.12406.

Idea: never change a pretrained weight. For each masked linear layer learn real-valued scores S; the
layer uses only the weights whose score passes a threshold. A task is stored as one bit per weight.

    M = 1[S >= tau],   W_eff = W * M,   y = x W_eff^T + b           (W and b frozen)
    backward (straight-through estimator): dL/dS := dL/dM = (dL/dW_eff) * W

What trains: the scores S of every targeted linear layer (same shape as its weight); by default all four
projections of every block (c_attn, attn.c_proj, c_fc, mlp.c_proj): L * 12 d^2 scores.

Choices (no official code was found, so these are our interpretations):
tau = 5e-3 and S initialised uniformly in a narrow band around tau so that a fraction
`initial_sparsity` of the weights starts masked out (default 0.05; 0 gives exactly the base model);
biases stay frozen and unmasked; the tied head (wte) is not masked, and tasks use verbaliser tokens
instead of the paper's masked random classifier. Merging writes W * M into the layer (`merge`), and
`unmerge` restores W bitwise.
Known effect: Adam's first steps (about lr each) are wider than the initial band around tau, so the masked
fraction does not stay at `initial_sparsity`: in our runs it grows from 5% to about 25% early on. We keep
the narrow band, since a wider one would start from a model further from the base.
The scores take the dtype and device of the weight they mask (the comparison with tau is made in that
dtype, so initial_sparsity=0 keeps every weight in bfloat16 too). `count_learned_masks(config, targets)`
is the trainable count by formula.

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch3_selective/learned_masks.py
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimal.hooks import Hooks
from minimal.peft import Mergeable, inject

if TYPE_CHECKING:
    from minimal.gpt import GPT, GPTConfig

TARGETS = ("c_attn", "c_proj", "c_fc")  # "c_proj" matches attn.c_proj and mlp.c_proj
# the nn.Linear layers of every GPT block, with their [out, in] shape in units of n_embd
GPT_LINEARS = {"attn.c_attn": (3, 1), "attn.c_proj": (1, 1), "mlp.c_fc": (4, 1), "mlp.c_proj": (1, 4)}


class MaskedLinear(Mergeable):
    """y = x (W * 1[S >= tau])^T + b with scores S trained through a straight-through estimator."""

    def __init__(self, base: nn.Linear, tau: float = 5e-3, initial_sparsity: float = 0.05, band: float = 1e-2,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(base)
        if not 0 <= initial_sparsity < 1:
            raise ValueError(f"initial_sparsity must be in [0, 1), got {initial_sparsity}")
        if band <= 0:
            raise ValueError(f"band (the width of the score initialisation) must be positive, got {band}")
        self.tau = tau
        u = torch.rand(base.weight.shape, generator=generator)  # U(0, 1)
        # S in [tau - band * s, tau + band * (1 - s)): a fraction s starts below the threshold
        scores = tau + band * (u - initial_sparsity)
        self.scores = nn.Parameter(scores.to(base.weight.device, base.weight.dtype))
        self._stash: torch.Tensor | None = None

    def mask(self) -> torch.Tensor:
        return self.scores >= self.tau  # [out, in] bool

    def ste_mask(self) -> torch.Tensor:
        """The binary mask in the forward pass, the identity in the backward pass (to the scores)."""
        hard = self.mask().to(self.scores.dtype)
        # (S - S.detach()) is exactly 0 in value, so the forward value is exactly the binary mask; gradient d/dS = d/dM
        return hard + (self.scores - self.scores.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return F.linear(x, self.base.weight * self.ste_mask(), self.base.bias)  # [..., out]

    def delta_weight(self) -> torch.Tensor:
        """W * M - W: minus the weights that are masked out."""
        return -self.base.weight * (~self.mask()).to(self.base.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise ValueError("MaskedLinear is already merged; unmerge() before merging again")
        self._stash = self.base.weight.detach().clone()
        self.base.weight.mul_(self.mask().to(self.base.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged or self._stash is None:
            raise ValueError("MaskedLinear is not merged; nothing to unmerge")
        self.base.weight.copy_(self._stash)
        self._stash = None
        self.merged = False


def apply_learned_masks(model: GPT, targets: str | Iterable[str] = TARGETS, tau: float = 5e-3,
                        initial_sparsity: float = 0.05, seed: int = 0) -> Hooks:
    """Freeze the model and wrap the target linears in MaskedLinear; only the scores train.

    Every layer is built (and its arguments checked) before the model changes.
    """
    gen = torch.Generator().manual_seed(seed)
    inject(model, targets, lambda lin: MaskedLinear(lin, tau, initial_sparsity, generator=gen))
    return Hooks()


def count_learned_masks(config: GPTConfig, targets: str | Iterable[str] = TARGETS) -> int:
    """One score per weight of every targeted linear: L * 12 d^2 for the default targets."""
    d = config.n_embd
    shapes = {f"h.{i}.{name}": a * b * d * d for i in range(config.n_layer) for name, (a, b) in GPT_LINEARS.items()}
    if isinstance(targets, str):  # a regular expression over the whole name, as in peft
        return sum(n for name, n in shapes.items() if re.fullmatch(targets, name))
    targets = list(targets)
    return sum(n for name, n in shapes.items() if any(name == t or name.endswith("." + t) for t in targets))


def mask_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of weights masked out, per MaskedLinear (module name -> fraction)."""
    return {n: 1.0 - m.mask().float().mean().item() for n, m in model.named_modules() if isinstance(m, MaskedLinear)}


def mask_storage_bits(model: nn.Module) -> int:
    """Bits to store the task: one per masked weight."""
    return sum(m.scores.numel() for m in model.modules() if isinstance(m, MaskedLinear))
