"""LoRA+: LoRA with a larger learning rate for B than for A.

Paper: Soufiane Hayou, Nikhil Ghosh, Bin Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models",
ICML 2024, arXiv 2402.12354 (code: nikhil-ghosh-berkeley/loraplus; peft: create_loraplus_optimizer).

Idea: the model is plain LoRA (lora.py); only the optimizer changes. In the infinite-width limit, one
learning rate for both factors cannot be efficient: A [r, in] and B [out, r] see inputs and gradients of
different scale (B starts at zero), so the paper sets

    eta_B = ratio * eta_A          ratio = lambda >> 1 (16 by default, as the paper's experiments)
    y = x W0^T + b0 + s (x A^T) B^T      (LoRA's forward, s = alpha / r; see lora.py)

and reports faster convergence and slightly better accuracy at the same cost.

What trains: A and B of every targeted layer, as LoRA (the count is LoRA's: r (in + out) per layer).

How the ratio reaches the optimizer: apply_lora_plus returns a `LoRAPlus` (a Hooks) whose
make_optimizer(params, cfg) builds AdamW with the B matrices in their own parameter group, weight decay
as the loop's default optimizer (cfg.weight_decay on matrices, none on vectors), and "lr_scale": ratio.
The training loop sets every group's lr to lr_at(step) * group["lr_scale"] at each step, so the warm-up
and the cosine decay apply to both rates and their ratio stays fixed. The group's initial lr is already
cfg.lr * ratio, so the optimizer is right in a loop that ignores lr_scale too.

Choices where paper and code differ:
- peft's create_loraplus_optimizer also puts every 1-D trainable (biases) at the B rate, and gives LoRA
  on embeddings its own rate (loraplus_lr_embedding); here only the B matrices get lr * ratio, and A and
  anything else that trains (a method stacked before) keep lr.
- peft's loraplus_weight_decay is one value for every group; here the loop's cfg.weight_decay, on matrices
  only, as in minimal/train.py.

dtype and device: LoRA's (A and B follow the weight). `count_lora_plus(config, r, targets)` is LoRA's formula.

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/lora.py, chapters/ch4_low_rank/lora_plus.py
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from chapters.ch4_low_rank.lora import LoRALinear, apply_lora, count_lora
from minimal.hooks import Hooks
from minimal.peft import find_linears

if TYPE_CHECKING:
    from minimal.gpt import GPTConfig


class LoRAPlus(Hooks):
    """The LoRA+ optimizer: B matrices at lr * ratio (their own group, "lr_scale": ratio), the rest at lr."""

    def __init__(self, layers: list[LoRALinear], ratio: float) -> None:
        super().__init__()
        self.ratio = float(ratio)
        self.b_ids = {id(layer.B) for layer in layers}

    def param_groups(self, params: list[nn.Parameter], cfg: Any) -> list[dict]:
        """The AdamW groups: B (decayed, lr * ratio), other matrices (decayed), vectors (not decayed)."""
        fast = [p for p in params if id(p) in self.b_ids]
        if not fast:
            raise ValueError("LoRA+ found none of its B matrices among the parameters to train; apply_lora_plus "
                             "before training and keep B trainable")
        rest = [p for p in params if id(p) not in self.b_ids]
        groups = [{"params": fast, "weight_decay": cfg.weight_decay, "lr_scale": self.ratio, "lr": cfg.lr * self.ratio},
                  {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def make_optimizer(self, params: list[nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.param_groups(params, cfg), lr=cfg.lr, betas=cfg.betas)


def apply_lora_plus(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    targets: str | Iterable[str] = ("c_attn",),
    ratio: float = 16.0,
    rslora: bool = False,
    dropout: float = 0.0,
) -> LoRAPlus:
    """Apply LoRA (apply_lora, same arguments) and return the LoRA+ optimizer hooks with eta_B = ratio * eta_A.

    ratio is checked before LoRA is applied, and apply_lora is itself atomic, so a bad argument leaves the
    model unchanged.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"LoRA+ ratio (eta_B / eta_A) must be a finite positive number, got {ratio!r}")
    names = find_linears(model, targets)  # the layers apply_lora will wrap
    apply_lora(model, r=r, alpha=alpha, targets=targets, rslora=rslora, dropout=dropout)
    return LoRAPlus([model.get_submodule(n) for n in names], ratio)


def count_lora_plus(config: GPTConfig, r: int = 8, targets: str | Iterable[str] = ("c_attn",)) -> int:
    """Trainable entries after apply_lora_plus: LoRA's r (in + out) per adapted layer."""
    return count_lora(config, r, targets)
