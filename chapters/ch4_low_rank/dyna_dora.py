"""Dynamic-rank DoRA: single-rank components pruned by their share of the update, to a global budget.

Paper: Mao, Huang, Wang, Wang, Zhou, Cheng, Jiang, "DoRA: Enhancing Parameter-Efficient Fine-Tuning with
Dynamic Rank Distribution", ACL 2024, arXiv 2405.17357 (code MIkumikumi0116/DoRA). Not the same method as
dora.py (Liu et al., weight-decomposed); called "dynamic-rank DoRA" here to keep the two apart.

Idea: write each LoRA as a sum of rank-1 components with their own scalar, score every component by the
fraction of its matrix's update norm that it carries, and zero the weakest components over the whole
model on a cubic schedule, so rank moves to the matrices that need it; a variance regulariser (DEM) keeps
components from gaining importance just by inflating their vectors.

Equations (nn.Linear layout; A [r', in], B [out, r'], c [r'], s = alpha / r', r' = ceil(1.5 r_target)):
    y  = x W0^T + b0 + s * ((drop(x) A^T) * c) B^T          delta_weight = s * B diag(c) A    [out, in]
    score of component i:  u_i = |c_i| ||B[:, i]|| ||A[i, :]|| / (||B diag(c) A||_F + eps)
                           (= ||c_i B[:, i] A[i, :]||_F / ||sum_j c_j B[:, j] A[j, :]||_F, closed form)
    EMA:                   S_i <- beta S_i + (1 - beta) u_i        every step inside the pruning window
    DEM loss:              gamma * mean over layers of mean_i [Var(A[i, :]) + Var(B[:, i])]   until the window ends
    pruned fraction:       p(t) = (r' - r_target) / r' * ((t - t_s) / (t_e - t_s))^3   for t_s <= t <= t_e
    every `period` steps in [t_s, t_e] (and at t_e): c_i = 0 for the p(t) N lowest S over all N components
    after t_e the last mask is fixed and re-applied after every step: r_target x (number of layers) remain.

What trains: A, B and c of every targeted layer: r' (in + out) + r' per layer. Pruned components stay
trainable inside the window (and may come back at the next prune step), then are held at c = 0.

Loop (minimal/hooks.py; apply_dyna_dora returns the ComponentPruner), t = step + 1: setup reads the run
length T = cfg.steps, t_s = round(start_ratio T), t_e = round(end_ratio T); extra_loss = DEM (while t <= t_e);
step_end: update S (inside the window), prune when scheduled, re-apply the final mask after t_e.

Choices where paper and released code differ:
- The number pruned follows the schedule exactly, an integer floor((N - budget) ((t - t_s)/(t_e - t_s))^3);
  the released code prunes at least one component at every prune step, kept as min_one_per_prune=True.
- The window runs from start_ratio = 0.15 to end_ratio = 0.5 of the total steps (the code's defaults); the
  prune period is a setting (the code prunes every 100 steps, small runs need fewer).
- Var is the population variance (no Bessel correction) of each component's entries.
- Init: A and B kaiming-uniform (nn.Linear's default), c = 0, so the output equals the base model's.

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/lora.py, chapters/ch4_low_rank/dyna_dora.py
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from chapters.ch4_low_rank.lora import check_rank, target_shapes
from minimal.hooks import Hooks
from minimal.peft import Mergeable, inject

if TYPE_CHECKING:
    from minimal.gpt import GPTConfig


class ComponentLinear(Mergeable):
    """y = base(x) + s * ((drop(x) A^T) * c) B^T: r' rank-1 components c_i B[:, i] A[i, :]."""

    def __init__(self, base: nn.Linear, r: int = 12, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__(base)
        check_rank(r, base, type(self).__name__)
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.r, self.alpha, self.scale = r, float(alpha), alpha / r
        w = base.weight  # [out, in]
        self.A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))  # [r, in]
        self.B = nn.Parameter(torch.empty(base.out_features, r, device=w.device, dtype=w.dtype))  # [out, r]
        self.c = nn.Parameter(torch.zeros(r, device=w.device, dtype=w.dtype))  # [r] component scalars
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [..., out]
        if self.merged:
            return y
        h = (self.dropout(x) @ self.A.T) * self.c  # [..., r]
        return y + self.scale * (h @ self.B.T)  # [..., out]

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.B * self.c) @ self.A  # [out, r] @ [r, in] -> [out, in]

    @torch.no_grad()
    def component_importance(self, eps: float = 1e-8) -> torch.Tensor:
        """u_i = ||c_i B_i A_i||_F / (||B diag(c) A||_F + eps), from the closed form |c_i| ||B_i|| ||A_i||: [r]."""
        parts = self.c.abs() * self.B.norm(dim=0) * self.A.norm(dim=1)  # [r]
        total = torch.linalg.matrix_norm((self.B * self.c) @ self.A)  # the scale s cancels in the ratio
        return parts / (total + eps)

    def dem(self) -> torch.Tensor:
        """mean_i [Var(A[i, :]) + Var(B[:, i])], the Dimensional Equilibrium Modulator of this layer."""
        return (self.A.var(dim=1, correction=0) + self.B.var(dim=0, correction=0)).mean()

    def rank(self) -> int:
        return int(torch.count_nonzero(self.c))

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, merged={self.merged}"


def pruned_count(t: int, n_total: int, budget: int, t_start: int, t_end: int, min_one: bool = False) -> int:
    """How many components are zeroed at step t: 0 before t_start, the cubic ramp, n_total - budget after t_end."""
    if t < t_start:
        return 0
    if t >= t_end:
        return n_total - budget
    k = ((n_total - budget) * (t - t_start) ** 3) // (t_end - t_start) ** 3
    return max(k, 1) if min_one else k


def check_window(start_ratio: float, end_ratio: float) -> None:
    if not 0 <= start_ratio < end_ratio <= 1:
        raise ValueError(f"need 0 <= start_ratio < end_ratio <= 1, got {start_ratio}, {end_ratio}")


def prune_window(total_steps: int, start_ratio: float, end_ratio: float) -> tuple[int, int]:
    """(t_s, t_e): the steps where pruning starts and ends in a run of total_steps."""
    check_window(start_ratio, end_ratio)
    t_start, t_end = round(start_ratio * total_steps), round(end_ratio * total_steps)
    if t_end <= t_start:
        raise ValueError(f"the pruning window [{t_start}, {t_end}] of a {total_steps}-step run is empty; "
                         "train for more steps or widen start_ratio..end_ratio")
    return t_start, t_end


class ComponentPruner(Hooks):
    """EMA importance of every component, the DEM regulariser and the global pruning schedule (the loop's hooks)."""

    def __init__(self, layers: dict[str, ComponentLinear], target_r: int, start_ratio: float, end_ratio: float,
                 period: int, beta: float, dem_weight: float, eps: float, min_one_per_prune: bool) -> None:
        super().__init__()
        check_window(start_ratio, end_ratio)
        self.layers = layers
        self.n_total = sum(layer.r for layer in layers.values())
        self.budget = target_r * len(layers)
        self.start_ratio, self.end_ratio = start_ratio, end_ratio
        self.t_start: int | None = None  # the pruning window in steps: set by setup() from cfg.steps
        self.t_end: int | None = None
        self.period, self.beta, self.dem_weight, self.eps = period, beta, dem_weight, eps
        self.min_one = min_one_per_prune
        self.scores = {name: torch.zeros_like(layer.c) for name, layer in layers.items()}  # EMA S, [r] each
        self.masks: dict[str, torch.Tensor] = {n: torch.ones_like(s, dtype=torch.bool) for n, s in self.scores.items()}
        self.t = 0  # optimizer steps completed

    def setup(self, model: nn.Module, cfg: Any, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Before step 0: the pruning window [t_s, t_e] in steps of this run."""
        self.t_start, self.t_end = prune_window(cfg.steps, self.start_ratio, self.end_ratio)
        self.t = 0

    def window(self) -> tuple[int, int]:
        if self.t_start is None or self.t_end is None:
            raise RuntimeError("ComponentPruner: the pruning window is unknown until setup(model, cfg, optimizer) "
                               "runs (train() calls it before step 0)")
        return self.t_start, self.t_end

    def pruned_at(self, t: int) -> int:
        t_start, t_end = self.window()
        return pruned_count(t, self.n_total, self.budget, t_start, t_end, self.min_one)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.dem_weight == 0 or (self.t_end is not None and self.t + 1 > self.t_end):  # off once pruning ends
            return None
        return self.dem_weight * torch.stack([layer.dem() for layer in self.layers.values()]).mean()

    @torch.no_grad()
    def update_scores(self) -> None:
        for name, layer in self.layers.items():
            self.scores[name].mul_(self.beta).add_((1 - self.beta) * layer.component_importance(self.eps))

    @torch.no_grad()
    def prune(self, k: int) -> None:
        """Zero c for the k components with the lowest EMA score over all layers."""
        names = list(self.layers)
        flat = torch.cat([self.scores[n] for n in names])  # [N]
        drop = torch.zeros_like(flat, dtype=torch.bool)
        drop[torch.argsort(flat, stable=True)[:k]] = True
        for name, keep in zip(names, (~drop).split([self.layers[n].r for n in names])):
            self.masks[name] = keep
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        for name, layer in self.layers.items():
            layer.c.masked_fill_(~self.masks[name], 0.0)

    def step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        t = self.t = step + 1
        t_start, t_end = self.window()
        if t < t_start:
            return
        if t <= t_end:
            self.update_scores()
            if (t - t_start) % self.period == 0 or t == t_end:
                self.prune(self.pruned_at(t))
        else:
            self.apply_masks()

    def rank_pattern(self) -> dict[str, int]:
        return {name: layer.rank() for name, layer in self.layers.items()}


def apply_dyna_dora(
    model: nn.Module,
    r: int = 8,
    init_r: int | None = None,
    alpha: float = 16.0,
    targets: str | Iterable[str] = ("c_attn",),
    start_ratio: float = 0.15,
    end_ratio: float = 0.5,
    period: int = 10,
    beta: float = 0.9,
    dem_weight: float = 0.1,
    eps: float = 1e-8,
    min_one_per_prune: bool = False,
    dropout: float = 0.0,
) -> ComponentPruner:
    """Wrap every target in a ComponentLinear of rank init_r (ceil(1.5 r) by default; the rest frozen) that is
    pruned to r components per layer on average; return the pruner (the loop's hooks, with rank_pattern())."""
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"target rank r must be a positive int, got {r!r}")
    init_r = math.ceil(1.5 * r) if init_r is None else init_r
    if not isinstance(init_r, int) or isinstance(init_r, bool) or init_r < r:
        raise ValueError(f"init_r={init_r!r} must be an int >= the target rank r={r}")
    check_window(start_ratio, end_ratio)
    if not isinstance(period, int) or isinstance(period, bool) or period <= 0:
        raise ValueError(f"period must be a positive int (steps between prunes), got {period!r}")
    if not 0 < beta < 1 or dem_weight < 0:
        raise ValueError(f"need 0 < beta < 1, dem_weight >= 0; got {beta}, {dem_weight}")
    names = inject(model, targets, lambda lin: ComponentLinear(lin, r=init_r, alpha=alpha, dropout=dropout))
    layers = {name: model.get_submodule(name) for name in names}
    return ComponentPruner(layers, r, start_ratio, end_ratio, period, beta, dem_weight, eps, min_one_per_prune)


def count_dyna_dora(config: GPTConfig, r: int = 8, init_r: int | None = None,
                    targets: str | Iterable[str] = ("c_attn",)) -> int:
    """Trainable entries after apply_dyna_dora: r' (in + out) + r' per adapted layer, r' = init_r or ceil(1.5 r)."""
    r0 = math.ceil(1.5 * r) if init_r is None else init_r
    return sum(r0 * (o + i) + r0 for o, i in target_shapes(config, targets).values())
