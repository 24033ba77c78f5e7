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

Sparsifying schedule (paper's Algorithm 1, code's lambda schedule): with xi_max set, the run is cut into
n_phases equal phases and phase k thresholds with xi_k, rising from xi to xi_max: "linear" (evenly spaced)
or "log_linear" (evenly spaced in log, a geometric series).

Choices where paper and released code differ (spec sheet sections 10 and 30):
- The gate update: default is the code's form (Adam step, then a fixed threshold xi not multiplied by the
  learning rate); update="proximal" is the paper's (xi plays the paper's lambda: threshold = lr * xi).
- The released threshold is three sequential in-place edits, which zero every |g| < 2 xi instead of
  shrinking it (and leave |g| = xi untouched); the default is the exact T_xi, official_quirk=True copies the
  released behaviour.
- One optimizer with a separate parameter group for the gates (lr scaled by gate_lr_scale, no weight decay)
  instead of the code's second optimizer with its own schedule.
- Init: A kaiming-uniform, B = 0 (identity at init), g ~ N(0, 1) (code: torch.randn).

This file builds on lora.py (it subclasses LoRALinear): copy minimal/ with lora.py and sora.py.
Naming: our "log_linear" schedule is the released code's "exp_linear" (thresholds evenly spaced in log,
i.e. growing exponentially); we name it by the spacing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from chapters.ch4_low_rank.lora import LoRALinear
from minimal.hooks import Hooks
from minimal.peft import freeze, inject, mergeable_modules, replace_module
from minimal.train import TrainConfig, default_optimizer


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


class GateUpdate:
    """The loop hooks of SoRA: the gate parameter group, the threshold after each step, the L1 term."""

    def __init__(self, layers: list[SoRALinear], update: str, gate_lr_scale: float, l1_weight: float,
                 official_quirk: bool, thresholds: list[float], total_steps: int) -> None:
        self.layers, self.update = layers, update
        self.gate_lr_scale, self.l1_weight, self.official_quirk = gate_lr_scale, l1_weight, official_quirk
        self.thresholds, self.total_steps = thresholds, total_steps
        self.gate_ids = {id(layer.g) for layer in layers}

    def xi_at(self, step: int) -> float:
        """xi of the phase that `step` belongs to (the constant xi without a schedule)."""
        phase = min(len(self.thresholds) - 1, step * len(self.thresholds) // self.total_steps)
        return self.thresholds[phase]

    def make_optimizer(self, params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
        rest = [p for p in params if id(p) not in self.gate_ids]
        if not rest:
            raise ValueError("SoRA needs A and B to train besides the gates")
        optimizer = default_optimizer(rest, cfg)
        if self.update == "adam":
            g = [p for p in params if id(p) in self.gate_ids]
            optimizer.add_param_group({"params": g, "weight_decay": 0.0, "lr_scale": self.gate_lr_scale,
                                       "lr": cfg.lr * self.gate_lr_scale})
        return optimizer

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

    def extra_loss(self, model: nn.Module) -> torch.Tensor:
        return self.l1_weight * sum(layer.g.abs().sum() / layer.g.numel() for layer in self.layers)

    def hooks(self) -> Hooks:
        return Hooks(extra_loss=self.extra_loss if self.l1_weight > 0 else None, step_end=self.step_end,
                     make_optimizer=self.make_optimizer)


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
    total_steps: int = 1,
    dropout: float = 0.0,
) -> Hooks:
    """Freeze `model`, wrap every target in a SoRALinear (r = r_max); the hooks threshold the gates.

    With xi_max and n_phases > 1 the threshold rises over total_steps in n_phases phases (the sparsifying
    schedule). The gate updater is `hooks.step_end.__self__`.
    """
    if update not in ("adam", "proximal"):
        raise ValueError(f"update must be 'adam' (released code) or 'proximal' (paper), got {update!r}")
    if xi < 0 or l1_weight < 0 or gate_lr_scale <= 0:
        raise ValueError(f"need xi >= 0, l1_weight >= 0, gate_lr_scale > 0; got {xi}, {l1_weight}, {gate_lr_scale}")
    if xi_max is not None and xi_max < xi:
        raise ValueError(f"xi_max={xi_max} must be >= xi={xi}")
    if not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive int, got {total_steps}")
    thresholds = xi_schedule(xi, xi if xi_max is None else xi_max, n_phases, schedule)
    freeze(model)
    names = inject(model, targets, lambda lin: SoRALinear(lin, r=r, alpha=alpha, dropout=dropout))
    layers = [model.get_submodule(n) for n in names]
    return GateUpdate(layers, update, gate_lr_scale, l1_weight, official_quirk, thresholds, total_steps).hooks()


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
