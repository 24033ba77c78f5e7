"""MELoRA: an ensemble of mini-LoRAs on the diagonal blocks of the update.

Paper: Pengjie Ren, Chengshun Shi, Shiguang Wu, Mengqi Zhang, Zhaochun Ren, Maarten de Rijke, Zhumin Chen,
Jiahuan Pei, "MELoRA: Mini-Ensemble Low-Rank Adapters for Parameter-Efficient Fine-Tuning", ACL 2024,
arXiv 2402.17263.

Idea: split the input into n slices and the output into n slices and give each pair its own rank-r LoRA.
The update is block-diagonal: it costs what one rank-r LoRA costs, but its rank can reach n r.

    x = [x_1, ..., x_n]  (each in/n)        A_i [r, in/n]   B_i [out/n, r]
    y = x W0^T + b0 + s * concat_i( (x_i A_i^T) B_i^T )
    dW = s * blockdiag(B_1 A_1, ..., B_n A_n)        s = alpha / r

What trains: every A_i and B_i, n r (in/n + out/n) = r (in + out) numbers per adapted layer, the same as a
rank-r LoRA, while rank(dW) <= n r. Everything else is frozen. With n = 1 this is LoRA.

Choices (where the paper and the ports read differently):
- r is the paper's mini-rank of each block (equivalent rank n r), not a total rank split over n blocks
  (some ports do that: a different, n times smaller, budget);
- s = alpha / r, the scale of one mini-LoRA; init A_i kaiming-uniform (nn.Linear's default), B_i = 0;
- the n mini-LoRAs are stored stacked (A [n, r, in/n], B [n, out/n, r]) and run as two einsums;
  `branch_loop` is the same computation written as a loop over blocks, for reading and for the tests;
- the fused c_attn is treated as one matrix, so its blocks cut across q, k and v (3d/n output rows each).

dtype and device follow the wrapped weight. `count_melora` is the trainable count as a formula of the config.

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/lora.py, chapters/ch4_low_rank/melora.py
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from chapters.ch4_low_rank.lora import target_shapes
from minimal.hooks import Hooks
from minimal.peft import Mergeable, inject

if TYPE_CHECKING:
    from minimal.gpt import GPTConfig


class MELoRALinear(Mergeable):
    """y = base(x) + s * blockdiag(B_1 A_1, ..., B_n A_n) x, n mini-LoRAs of rank r each."""

    def __init__(self, base: nn.Linear, n: int = 4, r: int = 2, alpha: float = 4.0) -> None:
        super().__init__(base)
        out_f, in_f = base.out_features, base.in_features
        for name, value in (("n", n), ("r", r)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"MELoRA {name} must be an int, got {type(value).__name__}")
        if n <= 0 or out_f % n or in_f % n:
            raise ValueError(f"MELoRA n={n} must be a positive divisor of both dimensions of the layer "
                             f"[out={out_f}, in={in_f}]")
        limit = min(out_f, in_f) // n
        if r <= 0 or r > limit:
            raise ValueError(f"MELoRA mini-rank r={r} must be in [1, {limit}]: each block is "
                             f"[{out_f // n}, {in_f // n}]")
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.n, self.r, self.alpha, self.scale = n, r, float(alpha), alpha / r
        w = base.weight
        self.A = nn.Parameter(torch.empty(n, r, in_f // n, device=w.device, dtype=w.dtype))  # [n, r, in/n]
        self.B = nn.Parameter(torch.zeros(n, out_f // n, r, device=w.device, dtype=w.dtype))  # [n, out/n, r]
        for a in self.A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """s * concat_i((x_i A_i^T) B_i^T); x [..., in] -> [..., out]."""
        xs = x.unflatten(-1, (self.n, -1))  # [..., n, in/n]
        z = torch.einsum("...ni,nri->...nr", xs, self.A)  # [..., n, r]
        y = torch.einsum("...nr,nor->...no", z, self.B)  # [..., n, out/n]
        return self.scale * y.flatten(-2)  # [..., out]

    def branch_loop(self, x: torch.Tensor) -> torch.Tensor:
        """The same as `branch`, one mini-LoRA at a time."""
        xs = x.chunk(self.n, dim=-1)  # n x [..., in/n]
        return self.scale * torch.cat([(x_i @ a.T) @ b.T for x_i, a, b in zip(xs, self.A, self.B)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [..., out]
        return y if self.merged else y + self.branch(x)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * torch.block_diag(*(self.B @ self.A))  # n blocks [out/n, in/n] -> [out, in]

    def extra_repr(self) -> str:
        return f"n={self.n}, r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, merged={self.merged}"


def apply_melora(model: nn.Module, n: int = 4, r: int = 2, alpha: float = 4.0,
                 targets: str | Iterable[str] = ("c_attn",)) -> Hooks:
    """Freeze `model` and wrap every targeted nn.Linear in a MELoRALinear (n mini-LoRAs of rank r)."""
    inject(model, targets, lambda lin: MELoRALinear(lin, n, r, alpha))  # builds (validates) every layer first
    return Hooks()


def count_melora(config: GPTConfig, r: int = 2, targets: str | Iterable[str] = ("c_attn",)) -> int:
    """Trainable entries after apply_melora: r (in + out) per adapted layer, whatever n is."""
    return sum(r * (i + o) for o, i in target_shapes(config, targets).values())
