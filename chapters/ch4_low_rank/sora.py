"""SoRA: sparse low-rank adaptation, a gate between A and B pushed to exact zeros.

Paper: Ding, Lv, Wang, Chen, Chen, Lin, Liu, Sun, Zhou, "Sparse Low-rank Adaptation of Pre-trained Language
Models", EMNLP 2023, arXiv 2311.11696 (code TsinghuaC3I/SoRA).

Idea: start from a generous rank r_max and put a trainable gate g between A and B; after every step a
proximal (soft-threshold) update sets small gate entries to exactly zero, so each matrix learns its own
rank; the zero-gate components are pruned afterwards, leaving an ordinary LoRA of rank nnz(g).

Equations (nn.Linear layout, LoRA's convention from lora.py: A [r, in], B [out, r], s = alpha / r):
    y  = x W0^T + b0 + s * ((drop(x) A^T) * g) B^T           delta_weight = s * B diag(g) A    [out, in]
    T_xi(z) = sign(z) * max(|z| - xi, 0)                      the soft-threshold (proximal map of xi |z|)
    update="adam" (code, default):  g <- AdamW step (no weight decay on g);  then  g <- T_xi(g)
    update="proximal" (paper):      g <- T_{eta xi}(g - eta dL/dg)   plain gradient step, eta = g's lr now
    optional loss term (code):      l1_weight * sum|g| / numel(g) over all layers
    pruned: keep i with g_i != 0:  A' = A[i], B' = s B[:, i] diag(g_i)  ->  a LoRA of rank nnz(g)

What trains: A, B and g of every targeted layer: r (in + out) + r per layer; after pruning nnz(g)(in + out).

Sparsifying schedule (paper's Algorithm 1, code's lambda schedule): with xi_max set, the run (cfg.steps,
read in setup) is cut into n_phases equal phases and phase k thresholds with xi_k, rising from xi to xi_max:
"linear" (evenly spaced) or "log_linear" (evenly spaced in log, a geometric series).

Loop (minimal/hooks.py; apply_sora returns the GateUpdate): make_optimizer gives the gates their own group,
setup reads the run length, step_end thresholds the gates, extra_loss adds the optional L1 term.

Choices where paper and released code differ:
- The gate update: default is the code's form (Adam step, then a fixed threshold xi not multiplied by the
  learning rate); update="proximal" is the paper's (xi plays the paper's lambda: threshold = lr * xi).
- The released threshold is three sequential in-place edits, which zero every |g| < 2 xi instead of
  shrinking it (and leave |g| = xi untouched); the default is the exact T_xi, official_quirk=True copies the
  released behaviour.
- One optimizer with a separate parameter group for the gates (lr scaled by gate_lr_scale, no weight decay)
  instead of the code's second optimizer with its own schedule.
- Init: A kaiming-uniform, B = 0 (identity at init), g ~ N(0, 1) (code: torch.randn).

Naming: our "log_linear" schedule is the released code's "exp_linear" (thresholds evenly spaced in log,
i.e. growing exponentially); we name it by the spacing.

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/lora.py, chapters/ch4_low_rank/sora.py
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from chapters.ch4_low_rank.lora import LoRALinear, target_shapes
from minimal.hooks import Hooks
from minimal.peft import inject, mergeable_modules, replace_module

if TYPE_CHECKING:
    from minimal.gpt import GPTConfig


def soft_threshold(z: torch.Tensor, xi: float) -> torch.Tensor:
    """T_xi(z) = sign(z) max(|z| - xi, 0): exact zero for |z| <= xi, shrink by xi otherwise."""
    return torch.sign(z) * (z.abs() - xi).clamp(min=0)


def official_threshold(z: torch.Tensor, xi: float) -> torch.Tensor:
    """The released code's three sequential edits: zero below 2 xi (except |z| == xi), shrink by xi above."""
    z = z.clone()
    z[z > xi] -= xi
    z[z < -xi] += xi
    z[z.abs() < xi] = 0.0
    return z


def xi_schedule(xi: float, xi_max: float, n_phases: int, kind: str = "linear") -> list[float]:
    """The threshold of each phase of the sparsifying schedule, from xi to xi_max."""
    if n_phases < 1:
        raise ValueError(f"n_phases must be >= 1, got {n_phases}")
    if kind not in ("linear", "log_linear"):
        raise ValueError(f"schedule must be 'linear' or 'log_linear', got {kind!r}")
    if n_phases == 1:
        return [xi]
    fractions = [k / (n_phases - 1) for k in range(n_phases)]
    if kind == "linear":
        return [xi + (xi_max - xi) * f for f in fractions]
    if xi <= 0:
        raise ValueError(f"a log_linear schedule needs xi > 0, got {xi}")
    return [math.exp(math.log(xi) + (math.log(xi_max) - math.log(xi)) * f) for f in fractions]


class SoRALinear(LoRALinear):
    """LoRA with a gate g [r] between A and B: y = base(x) + s * ((drop(x) A^T) * g) B^T."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__(base, r=r, alpha=alpha, dropout=dropout)
        self.g = nn.Parameter(torch.randn(r, device=base.weight.device, dtype=base.weight.dtype))  # [r]

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (((x @ self.A.T) * self.g) @ self.B.T)  # [..., r] gated -> [..., out]

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.B * self.g) @ self.A  # [out, r] @ [r, in] -> [out, in]

    def rank(self) -> int:
        """The effective rank: the number of open (nonzero) gates."""
        return int(torch.count_nonzero(self.g))

    @torch.no_grad()
    def pruned_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A' [k, in], B' [out, k]) with B' A' = delta_weight and k = nnz(g)."""
        keep = self.g != 0  # [r]
        return self.A[keep].clone(), self.scale * self.B[:, keep] * self.g[keep]


def gates(model: nn.Module) -> list[nn.Parameter]:
    return [m.g for _, m in mergeable_modules(model) if isinstance(m, SoRALinear)]


class GateUpdate(Hooks):
    """The loop hooks of SoRA: the gate parameter group, the threshold after each step, the L1 term."""

    def __init__(self, layers: list[SoRALinear], update: str, gate_lr_scale: float, l1_weight: float,
                 official_quirk: bool, thresholds: list[float]) -> None:
        super().__init__()
        self.layers, self.update = layers, update
        self.gate_lr_scale, self.l1_weight, self.official_quirk = gate_lr_scale, l1_weight, official_quirk
        self.thresholds = thresholds
        self.total_steps: int | None = None  # the run length, from cfg.steps in setup
        self.gate_ids = {id(layer.g) for layer in layers}

    def setup(self, model: nn.Module, cfg: Any, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.total_steps = cfg.steps

    def xi_at(self, step: int) -> float:
        """xi of the phase that `step` belongs to (the constant xi without a schedule)."""
        if len(self.thresholds) == 1:
            return self.thresholds[0]
        if self.total_steps is None:
            raise RuntimeError("SoRA's threshold schedule needs the run length: setup(model, cfg, optimizer) "
                               "reads cfg.steps (train() calls it before step 0)")
        phase = min(len(self.thresholds) - 1, step * len(self.thresholds) // self.total_steps)
        return self.thresholds[phase]

    def make_optimizer(self, params: list[nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
        """The loop's AdamW (weight decay on matrices only) plus, in "adam" mode, the gates in their own group."""
        rest = [p for p in params if id(p) not in self.gate_ids]
        if not rest:
            raise ValueError("SoRA needs A and B to train besides the gates")
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        if self.update == "adam":  # "proximal": the gates are not in the optimizer, step_end moves them
            groups.append({"params": [p for p in params if id(p) in self.gate_ids], "weight_decay": 0.0,
                           "lr_scale": self.gate_lr_scale, "lr": cfg.lr * self.gate_lr_scale})
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)

    def threshold(self, z: torch.Tensor, xi: float) -> torch.Tensor:
        return official_threshold(z, xi) if self.official_quirk else soft_threshold(z, xi)

    @torch.no_grad()
    def step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        xi = self.xi_at(step)
        if self.update == "adam":  # the optimizer already moved g: threshold only
            for layer in self.layers:
                layer.g.copy_(self.threshold(layer.g, xi))
            return
        eta = optimizer.param_groups[0]["lr"] * self.gate_lr_scale  # the proximal gradient step on g
        for layer in self.layers:
            if layer.g.grad is not None:
                layer.g.copy_(self.threshold(layer.g - eta * layer.g.grad, eta * xi))
                layer.g.grad = None  # g is not in the optimizer: clear its gradient here

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.l1_weight == 0:
            return None
        return self.l1_weight * sum(layer.g.abs().sum() / layer.g.numel() for layer in self.layers)


def apply_sora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    targets: str | Iterable[str] = ("c_attn",),
    xi: float = 1e-4,
    update: str = "adam",
    gate_lr_scale: float = 1.0,
    l1_weight: float = 0.0,
    official_quirk: bool = False,
    xi_max: float | None = None,
    n_phases: int = 1,
    schedule: str = "linear",
    dropout: float = 0.0,
) -> GateUpdate:
    """Wrap every target in a SoRALinear (r = r_max; the rest frozen); return the gate updater (the hooks).

    With xi_max and n_phases > 1 the threshold rises over the run (cfg.steps, read in setup) in n_phases
    phases (the sparsifying schedule).
    """
    if update not in ("adam", "proximal"):
        raise ValueError(f"update must be 'adam' (released code) or 'proximal' (paper), got {update!r}")
    if xi < 0 or l1_weight < 0 or gate_lr_scale <= 0:
        raise ValueError(f"need xi >= 0, l1_weight >= 0, gate_lr_scale > 0; got {xi}, {l1_weight}, {gate_lr_scale}")
    if xi_max is not None and xi_max < xi:
        raise ValueError(f"xi_max={xi_max} must be >= xi={xi}")
    thresholds = xi_schedule(xi, xi if xi_max is None else xi_max, n_phases, schedule)
    names = inject(model, targets, lambda lin: SoRALinear(lin, r=r, alpha=alpha, dropout=dropout))
    layers = [model.get_submodule(n) for n in names]
    return GateUpdate(layers, update, gate_lr_scale, l1_weight, official_quirk, thresholds)


def rank_pattern(model: nn.Module) -> dict[str, int]:
    """The learned rank (open gates) of every SoRA layer."""
    return {n: m.rank() for n, m in mergeable_modules(model) if isinstance(m, SoRALinear)}


@torch.no_grad()
def prune_sora(model: nn.Module) -> dict[str, int]:
    """Replace every SoRALinear by a plain LoRALinear of rank nnz(g) (or its base layer when nnz(g) = 0).

    The outputs do not change; the new LoRA has alpha = its rank (s = 1) and B' = s B diag(g) on the kept
    components. Returns the rank of each layer.
    """
    ranks = {}
    for name, m in mergeable_modules(model):
        if not isinstance(m, SoRALinear):
            continue
        if m.merged:
            raise ValueError(f"{name} is merged; unmerge() before pruning")
        A, B = m.pruned_factors()
        ranks[name] = A.shape[0]
        if ranks[name] == 0:
            replace_module(model, name, m.base)
            continue
        lora = LoRALinear(m.base, r=ranks[name], alpha=float(ranks[name]))
        lora.dropout = m.dropout
        lora.A.copy_(A)
        lora.B.copy_(B)
        lora.A.requires_grad_(m.A.requires_grad)
        lora.B.requires_grad_(m.B.requires_grad)
        replace_module(model, name, lora)
    if not ranks:
        raise ValueError("prune_sora: the model has no SoRALinear layer")
    return ranks


def count_sora(config: GPTConfig, r: int = 8, targets: str | Iterable[str] = ("c_attn",)) -> int:
    """Trainable entries after apply_sora: r (in + out) + r per adapted layer (A, B and the gate g)."""
    return sum(r * (o + i) + r for o, i in target_shapes(config, targets).values())
