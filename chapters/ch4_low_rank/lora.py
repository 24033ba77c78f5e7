"""LoRA: low-rank adaptation of a frozen linear layer.

Paper: Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen, "LoRA: Low-Rank Adaptation of Large Language
Models", ICLR 2022, arXiv 2106.09685. rsLoRA option: Kalajdzievski, "A Rank Stabilization Scaling Factor
for Fine-Tuning with LoRA", 2023, arXiv 2312.03732.

Idea: keep the pretrained weight W0 frozen and learn its update as a product of two thin matrices, a
rank-r branch beside the layer; after training the branch folds into W0, so inference costs nothing extra.

    +--------------------------------------------------------------------------------------+
    |  The convention used by every low-rank file in this chapter (nn.Linear layout)        |
    |                                                                                      |
    |    W0 [out, in] frozen, b0 [out] frozen          A [r, in]   B [out, r]   (trained)   |
    |    y  = x W0^T + b0 + s * (drop(x) A^T) B^T      delta_weight = s * B @ A  [out, in]  |
    |    s  = alpha / r          (rslora=True: s = alpha / sqrt(r))                         |
    |    init: A ~ kaiming_uniform(a=sqrt(5)) (nn.Linear's default), B = 0  =>  dW = 0      |
    |    dropout acts on the branch input only; the base path always sees the clean x.      |
    |    merged: W0 <- W0 + s B A and the forward is the base layer alone.                  |
    +--------------------------------------------------------------------------------------+

These are exactly Hugging Face peft's shapes (lora_A.weight [r, in], lora_B.weight [out, r]), so a peft
adapter copies in unchanged; only GPT-2's Conv1D base weight is stored transposed there.

What trains: A and B of every targeted layer; everything else (base weights and biases, LayerNorms, the
tied embedding) is frozen.

Choices where paper and code differ:
- init: the paper says "random Gaussian" for A; we use nn.Linear's kaiming-uniform like loralib and peft.
- targets: the paper adapts the q and v projections; GPT-2 fuses q, k, v into `c_attn`, and, like peft,
  one rank-r adapter covers the fused matrix (a q/v-only split is not offered here).
- merging: loralib merges automatically in eval(); here merge()/unmerge() are explicit calls.

dtype and device: A and B take the dtype and device of the weight they attach to (bfloat16 in, bfloat16 out).
`count_lora(config, r, targets)` is the trainable count as a formula of the GPT config; `target_shapes`,
which it uses, lists the [out, in] shapes of the GPT linears a `targets` value selects (the other low-rank
files count with it too).

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/lora.py
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from minimal.hooks import Hooks
from minimal.peft import Mergeable, inject

if TYPE_CHECKING:
    from minimal.gpt import GPTConfig

# the nn.Linear layers of every GPT block, with their [out, in] shape in units of n_embd
GPT_LINEARS = {"attn.c_attn": (3, 1), "attn.c_proj": (1, 1), "mlp.c_fc": (4, 1), "mlp.c_proj": (1, 4)}


def lora_scale(r: int, alpha: float, rslora: bool = False) -> float:
    """The branch multiplier s: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def check_rank(r: int, base: nn.Linear, who: str = "LoRA") -> None:
    if not isinstance(r, int) or isinstance(r, bool):
        raise TypeError(f"{who} rank r must be an int, got {type(r).__name__}")
    limit = min(base.in_features, base.out_features)
    if r <= 0 or r > limit:
        raise ValueError(
            f"{who} rank r={r} must be in [1, {limit}] for a layer of shape "
            f"[out={base.out_features}, in={base.in_features}]"
        )


class LoRALinear(Mergeable):
    """y = base(x) + s * (drop(x) A^T) B^T around a frozen nn.Linear `base` (see the box above)."""

    def __init__(
        self, base: nn.Linear, r: int = 8, alpha: float = 16.0, rslora: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__(base)
        check_rank(r, base, type(self).__name__)
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.r, self.alpha, self.rslora = r, float(alpha), rslora
        self.scale = lora_scale(r, alpha, rslora)
        w = base.weight  # [out, in]
        self.A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))  # [r, in]
        self.B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))  # [out, r]
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """s * (x A^T) B^T without the base path; x [..., in] -> [..., out]."""
        return self.scale * ((x @ self.A.T) @ self.B.T)  # [..., r] -> [..., out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [..., out]
        if self.merged:
            return y
        return y + self.branch(self.dropout(x))

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.B @ self.A  # [out, r] @ [r, in] -> [out, in]

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, merged={self.merged}"


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    targets: str | Iterable[str] = ("c_attn",),
    rslora: bool = False,
    dropout: float = 0.0,
) -> Hooks:
    """Freeze `model` and wrap every targeted nn.Linear in a LoRALinear; nothing else trains.

    targets: names as in peft (a list entry matches a module name or its last parts, so "c_proj" hits
    attn.c_proj and mlp.c_proj; a string is a regular expression over the full name). Every layer is
    built (and checked) before the model changes, so a bad argument leaves the model as it was.
    """
    inject(model, targets, lambda lin: LoRALinear(lin, r=r, alpha=alpha, rslora=rslora, dropout=dropout))
    return Hooks()


def target_shapes(config: GPTConfig, targets: str | Iterable[str] = ("c_attn",)) -> dict[str, tuple[int, int]]:
    """{name: (out, in)} of the GPT linears that `targets` selects, from the config alone (peft's name rule)."""
    d = config.n_embd
    shapes = {f"h.{i}.{name}": (a * d, b * d) for i in range(config.n_layer) for name, (a, b) in GPT_LINEARS.items()}
    if isinstance(targets, str):
        return {n: s for n, s in shapes.items() if re.fullmatch(targets, n)}
    targets = list(targets)
    return {n: s for n, s in shapes.items() if any(n == t or n.endswith("." + t) for t in targets)}


def count_lora(config: GPTConfig, r: int = 8, targets: str | Iterable[str] = ("c_attn",)) -> int:
    """Trainable entries after apply_lora: r (in + out) per adapted layer."""
    return sum(r * (o + i) for o, i in target_shapes(config, targets).values())

