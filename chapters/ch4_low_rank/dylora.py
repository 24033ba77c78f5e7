"""DyLoRA: one LoRA that serves at every rank, trained with a random rank per step (nested dropout).

Paper: Valipour, Rezagholizadeh, Kobyzev, Ghodsi, "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models
using Dynamic Search-Free Low-Rank Adaptation", EACL 2023, arXiv 2210.07558 (code huawei-noah/KD-NLP).

Idea: order the r_max components of a LoRA and train so that every prefix of them is a good adapter: each
step samples a rank b and runs the LoRA truncated to its first b components; after training the rank is
chosen at serving time, with no retraining and no rank search.

Equations (nn.Linear layout, LoRA's convention from lora.py: A [r_max, in], B [out, r_max]):
    training step:  b ~ Uniform{r_min, ..., r_max}
                    y = x W0^T + b0 + (alpha / b) * (drop(x) A[:b]^T) B[:, :b]^T
    update "frozen" (paper's default): only component b (row b of A, column b of B) changes in that step;
           "nested" (ablation): all of the first b components change.
    serving at rank b*: the same formula with A[:b*], B[:, :b*] and alpha / b*  (delta_weight, merge).

What trains: A and B of every targeted layer, r_max (in + out) per layer (as a LoRA of rank r_max).

Loop (minimal/hooks.py; apply_dylora returns the RankSampler): a forward pre-hook on the model draws b at
every forward in train mode and sets it on every DyLoRA layer (eval mode uses each layer's serving rank,
r_max unless set_rank says otherwise); after_backward zeroes the gradients outside the updated components
and keeps a copy of A, B; step_end copies the components that must not change back (Adam's moments and
weight decay would otherwise still move them).

Choices where paper and released code differ:
- One b per step shared by every adapted matrix (the paper's description); per_module=True draws one per
  layer instead.
- Frozen mode restores the other components after the optimizer step rather than only masking gradients
  (masking alone lets Adam's stale moments and decoupled weight decay move them).
- The diffusion-community port (kohya-ss) that keeps all components in the forward with a sqrt(r/b)
  rescale is a different algorithm and is not followed.
- Init: A kaiming-uniform, B = 0, as LoRA, so the output equals the base model's at every rank.

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/lora.py, chapters/ch4_low_rank/dylora.py
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from chapters.ch4_low_rank.lora import LoRALinear, count_lora
from minimal.hooks import Hooks
from minimal.peft import inject, mergeable_modules

if TYPE_CHECKING:
    from minimal.gpt import GPTConfig


class DyLoRALinear(LoRALinear):
    """A LoRA of rank r_max used through its first b components: base(x) + (alpha/b) (x A[:b]^T) B[:, :b]^T."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__(base, r=r, alpha=alpha, dropout=dropout)
        self.train_rank = r  # b of the current training step (set by the sampler)
        self.serve_rank = r  # b used in eval mode and by delta_weight / merge

    @property
    def active_rank(self) -> int:
        return self.train_rank if self.training else self.serve_rank

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        b = self.active_rank
        return (self.alpha / b) * ((x @ self.A[:b].T) @ self.B[:, :b].T)  # [..., b] -> [..., out]

    def delta_weight(self) -> torch.Tensor:
        b = self.serve_rank
        return (self.alpha / b) * self.B[:, :b] @ self.A[:b]  # [out, b] @ [b, in] -> [out, in]

    def check(self, b: int) -> None:
        if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= self.r:
            raise ValueError(f"DyLoRA rank b={b!r} must be an int in [1, r_max={self.r}]")

    def set_serve_rank(self, b: int) -> None:
        self.check(b)
        if self.merged:
            raise ValueError("DyLoRALinear is merged at rank "
                             f"{self.serve_rank}; unmerge() before changing the serving rank")
        self.serve_rank = b

    def extra_repr(self) -> str:
        return super().extra_repr() + f", train_rank={self.train_rank}, serve_rank={self.serve_rank}"


def dylora_layers(model: nn.Module) -> list[DyLoRALinear]:
    return [m for _, m in mergeable_modules(model) if isinstance(m, DyLoRALinear)]


def set_rank(model: nn.Module, b: int) -> None:
    """Serve every DyLoRA layer of `model` at rank b (eval mode, delta_weight, merge)."""
    layers = dylora_layers(model)
    if not layers:
        raise ValueError("set_rank: the model has no DyLoRALinear layer")
    for layer in layers:
        layer.set_serve_rank(b)


class RankSampler(Hooks):
    """Draws the training rank before each train-mode forward and keeps the other components fixed."""

    def __init__(self, layers: list[DyLoRALinear], r_min: int, mode: str, per_module: bool, seed: int) -> None:
        super().__init__()
        self.layers, self.r_min, self.mode, self.per_module = layers, r_min, mode, per_module
        self.generator = torch.Generator().manual_seed(seed)
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.history: list[list[int]] = []  # the ranks drawn at every training forward

    def draw(self) -> None:
        n = len(self.layers) if self.per_module else 1
        r_max = self.layers[0].r
        ranks = torch.randint(self.r_min, r_max + 1, (n,), generator=self.generator).tolist()
        ranks = ranks if self.per_module else ranks * len(self.layers)
        for layer, b in zip(self.layers, ranks):
            layer.train_rank = b
        self.history.append(ranks)

    def pre_forward(self, model: nn.Module, args: tuple) -> None:
        if model.training:
            self.draw()

    def updated(self, layer: DyLoRALinear) -> torch.Tensor:
        """Bool [r_max]: the components this step may change."""
        b, idx = layer.train_rank, torch.arange(layer.r, device=layer.A.device)
        return idx == b - 1 if self.mode == "frozen" else idx < b

    @torch.no_grad()
    def after_backward(self, model: nn.Module, step: int) -> None:
        self.saved = []
        for layer in self.layers:
            keep = self.updated(layer)  # [r]
            if layer.A.grad is not None:
                layer.A.grad[~keep] = 0.0
            if layer.B.grad is not None:
                layer.B.grad[:, ~keep] = 0.0
            self.saved.append((layer.A.detach().clone(), layer.B.detach().clone()))

    @torch.no_grad()
    def step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        for layer, (A, B) in zip(self.layers, self.saved):
            fixed = ~self.updated(layer)  # [r]
            layer.A[fixed] = A[fixed]
            layer.B[:, fixed] = B[:, fixed]
        self.saved = []


def apply_dylora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    targets: str | Iterable[str] = ("c_attn",),
    r_min: int = 1,
    mode: str = "frozen",
    per_module: bool = False,
    seed: int = 0,
    dropout: float = 0.0,
) -> RankSampler:
    """Wrap every target in a DyLoRALinear of rank r (= r_max; the rest frozen); draw b every training step.

    Returns the sampler, the loop's hooks (its `history` lists the drawn ranks); serve with set_rank().
    """
    if mode not in ("frozen", "nested"):
        raise ValueError(f"mode must be 'frozen' (paper default) or 'nested', got {mode!r}")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"DyLoRA rank r (= r_max) must be a positive int, got {r!r}")
    if not isinstance(r_min, int) or not 1 <= r_min <= r:
        raise ValueError(f"r_min={r_min!r} must be an int in [1, r={r}]")
    names = inject(model, targets, lambda lin: DyLoRALinear(lin, r=r, alpha=alpha, dropout=dropout))
    sampler = RankSampler([model.get_submodule(n) for n in names], r_min, mode, per_module, seed)
    model.register_forward_pre_hook(sampler.pre_forward)
    return sampler


def count_dylora(config: GPTConfig, r: int = 8, targets: str | Iterable[str] = ("c_attn",)) -> int:
    """Trainable entries after apply_dylora: a LoRA of rank r_max, r (in + out) per adapted layer."""
    return count_lora(config, r, targets)
