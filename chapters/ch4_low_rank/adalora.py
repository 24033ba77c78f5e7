"""AdaLoRA: adaptive budget allocation for low-rank updates (SVD form, importance-driven rank).

Paper: Zhang, Chen, Bukharin, Karampatziakis, He, Cheng, Chen, Zhao, "AdaLoRA: Adaptive Budget Allocation
for Parameter-Efficient Fine-Tuning", ICLR 2023, arXiv 2303.10512 (code QingruZhang/AdaLoRA; also in
Hugging Face peft as AdaLoraConfig).

Idea: write every update like an SVD, P diag(lambda) Q, so that a rank is one "singular value" that can be
switched off; score every singular triplet by a smoothed |weight x gradient| importance and, following a
cubic budget schedule, zero the least important singular values over the whole model, so rank flows to
the matrices that need it.

Equations (nn.Linear layout; Q = A [r0, in], lambda = E [r0], P = B [out, r0]; s = alpha / r0):
    y  = x W0^T + b0 + s * ((drop(x) A^T) * E) B^T         delta_weight = s * B diag(E) A   [out, in]
    R  = mean over the P and Q tensors of ||B^T B - I||_F and ||A A^T - I||_F    (loss += gamma * R)
    I(w)  = |w * dL/dw|                                        sensitivity of every trained entry w
    Ib <- beta1 Ib + (1 - beta1) I                             smoothed sensitivity
    Ub <- beta2 Ub + (1 - beta2) |I - Ib|                      uncertainty (uses the updated Ib)
    S_i = Ib*Ub (E_i) + mean_j Ib*Ub (A_ij) + mean_j Ib*Ub (B_ji)    score of triplet i of a matrix
    b(t) = b0                                              t <= t_init
         = b_T + (b0 - b_T) (1 - (t - t_init) / (T - t_final - t_init))^3   (int) until T - t_final
         = b_T                                             afterwards
    every `period` steps: E_i = 0 for every triplet whose S_i is among the b0 - b(t) smallest (model-wide).
b0 = r0 x (number of adapted matrices), b_T = target_r x (number of adapted matrices). T is the run length,
read from the loop's TrainConfig (cfg.steps) in setup; t_init and t_final are step counts (int) or fractions
of the run (float in [0, 1), rounded down in setup: t_init=0.1 on 150 steps is 15).

What trains: A, E and B of every targeted layer: r0 (in + out) + r0 per layer. Masked singular values stay
trainable (they may come back at the next mask step) until t = T - t_final, when the mask is frozen and
re-applied after every step.

Loop (minimal/hooks.py; apply_adalora returns the RankAllocator), with t = step + 1 the optimizer step:
    setup           T = cfg.steps; resolve t_init, t_final to steps
    extra_loss      gamma * R
    after_backward  update Ib, Ub from the gradients of this step (while t < T - t_final)
    step_end        compute b(t); mask when scheduled; at t = T - t_final fix the final mask
                    and reset the importance; afterwards re-apply the final mask.

Choices where paper and released code differ (the oracle test compares with Hugging Face peft):
- Regulariser: the code's non-squared Frobenius norms averaged over all P and Q tensors is the default
  (`orth_reg="code"`); `orth_reg="paper"` sums the squared norms as the paper writes it.
- Scale: s = alpha / r0 with the initial rank r0, constant while ranks are masked (as the code). peft
  writes alpha / (r0 + 1e-5); the oracle test sets our `scale` to that value to compare bit for bit.
- When the score is taken: peft updates the importance after optimizer.step(), so it multiplies the
  already-updated weight with the step's gradient; here it is taken in after_backward, weight and gradient
  of the same point (the paper's I(w)), before clipping. Same formulas; the oracle feeds both one (w, grad).
- Masking keeps peft's rule "score <= the k-th smallest score" (ties may mask a few more); k = 0 masks
  nothing (peft raises there, peft issue #2337).
- Init: E = 0 (identity at init), A and B ~ N(0, 0.02^2), as paper and code.

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/lora.py, chapters/ch4_low_rank/adalora.py
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


class SVDLinear(Mergeable):
    """y = base(x) + s * ((drop(x) A^T) * E) B^T: an update in SVD form around a frozen nn.Linear."""

    def __init__(self, base: nn.Linear, r: int = 12, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__(base)
        check_rank(r, base, type(self).__name__)
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.r, self.alpha = r, float(alpha)
        self.scale = alpha / r  # fixed at the initial rank: masking does not change it
        w = base.weight  # [out, in]
        self.A = nn.Parameter(0.02 * torch.randn(r, base.in_features, device=w.device, dtype=w.dtype))  # [r, in] Q
        self.E = nn.Parameter(torch.zeros(r, device=w.device, dtype=w.dtype))  # [r] singular values
        self.B = nn.Parameter(0.02 * torch.randn(base.out_features, r, device=w.device, dtype=w.dtype))  # [out, r] P
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [..., out]
        if self.merged:
            return y
        h = (self.dropout(x) @ self.A.T) * self.E  # [..., r]
        return y + self.scale * (h @ self.B.T)  # [..., out]

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.B * self.E) @ self.A  # [out, r] @ [r, in] -> [out, in]

    def rank(self) -> int:
        """The number of singular values that are not zero (the rank this layer currently spends)."""
        return int(torch.count_nonzero(self.E))

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale:.4g}, merged={self.merged}"


def orthogonality_penalty(layers: Iterable[SVDLinear], kind: str = "code") -> torch.Tensor:
    """R(P, Q): "code" = mean over tensors of ||P^T P - I||_F, ||Q Q^T - I||_F; "paper" = sum of squares."""
    if kind not in ("code", "paper"):
        raise ValueError(f"orth_reg must be 'code' or 'paper', got {kind!r}")
    terms = []
    for layer in layers:
        eye = torch.eye(layer.r, device=layer.A.device, dtype=layer.A.dtype)  # [r, r]
        for gram in (layer.A @ layer.A.T, layer.B.T @ layer.B):  # [r, r] each
            norm = torch.linalg.matrix_norm(gram - eye)  # Frobenius
            terms.append(norm if kind == "code" else norm**2)
    if not terms:
        raise ValueError("orthogonality_penalty: no SVDLinear layer given")
    total = torch.stack(terms).sum()
    return total / len(terms) if kind == "code" else total


def budget_schedule(t: int, init_budget: int, target_budget: int, total_steps: int, t_init: int = 0,
                    t_final: int = 0, period: int = 1) -> tuple[int, bool]:
    """(b(t), whether step t masks): b0 until t_init, a cubic decrease to b_T at T - t_final, then b_T."""
    if t <= t_init:
        return init_budget, False
    if t > total_steps - t_final:
        return target_budget, True
    left = 1 - (t - t_init) / (total_steps - t_final - t_init)
    return int((init_budget - target_budget) * left**3 + target_budget), t % period == 0


def budget_mask(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """name -> kept mask [r]: the k lowest triplet scores over ALL layers are switched off (model-wide).

    Ties with the k-th smallest score are switched off too (peft's rule "score <= threshold"); k <= 0 keeps all.
    """
    if k <= 0:
        return {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
    threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values
    return {name: s > threshold for name, s in scores.items()}


def check_phase(name: str, value: int | float) -> None:
    """t_init / t_final: a step count (int >= 0) or a fraction of the run (float in [0, 1))."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be an int (steps) or a float in [0, 1) (a fraction of the run), got {value!r}")
    if isinstance(value, float) and not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value} as a float is a fraction of the run and must be in [0, 1); "
                         "pass an int for a number of steps")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_schedule(init_r: int, target_r: int, t_init: int | float = 0, t_final: int | float = 0, period: int = 1,
                   beta1: float = 0.85, beta2: float = 0.85, orth_reg_weight: float = 0.1,
                   orth_reg: str = "code") -> None:
    """Raise a ValueError naming the first allocator setting that cannot work (before the run length is known)."""
    if not isinstance(init_r, int) or isinstance(init_r, bool) or init_r <= 0:
        raise ValueError(f"init_r must be a positive int, got {init_r!r}")
    if not isinstance(target_r, int) or isinstance(target_r, bool) or not 0 < target_r <= init_r:
        raise ValueError(f"target_r must be an int in [1, init_r={init_r}], got {target_r!r}")
    check_phase("t_init", t_init)
    check_phase("t_final", t_final)
    if isinstance(t_init, float) and isinstance(t_final, float) and t_init + t_final >= 1:
        raise ValueError(f"t_init={t_init} + t_final={t_final} leave no budget phase: their sum must be below 1")
    if not isinstance(period, int) or isinstance(period, bool) or period <= 0:
        raise ValueError(f"period must be a positive int (steps between masks), got {period!r}")
    if not (0 < beta1 < 1 and 0 < beta2 < 1):
        raise ValueError(f"beta1 and beta2 must be in (0, 1), got {beta1}, {beta2}")
    if orth_reg_weight < 0:
        raise ValueError(f"orth_reg_weight must be >= 0, got {orth_reg_weight}")
    if orth_reg not in ("code", "paper"):
        raise ValueError(f"orth_reg must be 'code' or 'paper', got {orth_reg!r}")


def resolve_schedule(total_steps: int, t_init: int | float, t_final: int | float) -> tuple[int, int]:
    """(t_init, t_final) in steps for a run of total_steps: a fraction f becomes floor(f T)."""
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps <= 0:
        raise ValueError(f"the run length must be a positive int (AdaLoRA's schedule needs it), got {total_steps!r}")
    # the 1e-9 absorbs float rounding (0.29 * 100 = 28.999...)
    ti, tf = (math.floor(v * total_steps + 1e-9) if isinstance(v, float) else v for v in (t_init, t_final))
    if ti >= total_steps - tf:
        raise ValueError(f"t_init={t_init}, t_final={t_final} leave no budget phase in a run of {total_steps} steps "
                         f"({ti} and {tf} steps): need t_init < {total_steps} - t_final")
    return ti, tf


class RankAllocator(Hooks):
    """Importance (EMA of sensitivity and uncertainty), the budget schedule and the singular-value mask.

    The hooks of the training loop; `setup` (called by the loop before step 0) reads the run length.
    """

    def __init__(self, layers: dict[str, SVDLinear], target_r: int, t_init: int | float = 0,
                 t_final: int | float = 0, period: int = 1, beta1: float = 0.85, beta2: float = 0.85,
                 orth_reg_weight: float = 0.1, orth_reg: str = "code") -> None:
        super().__init__()
        if not layers:
            raise ValueError("RankAllocator needs at least one SVDLinear layer")
        check_schedule(max(layer.r for layer in layers.values()), target_r, t_init, t_final, period, beta1, beta2,
                       orth_reg_weight, orth_reg)
        self.layers = layers
        self.schedule = (t_init, t_final)  # as given: steps or fractions of the run
        self.total_steps: int | None = None  # T, t_init and t_final in steps: set by setup()
        self.t_init = self.t_final = 0
        self.period, self.beta1, self.beta2 = period, beta1, beta2
        self.orth_reg_weight, self.orth_reg = orth_reg_weight, orth_reg
        self.init_budget = sum(layer.r for layer in layers.values())
        self.target_budget = target_r * len(layers)
        self.final_mask: dict[str, torch.Tensor] | None = None  # name -> bool [r], True = kept
        self.budget = self.init_budget
        self.reset_importance()

    def setup(self, model: nn.Module, cfg: Any, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Before step 0: T = cfg.steps, t_init and t_final in steps; a fresh budget and importance."""
        self.t_init, self.t_final = resolve_schedule(cfg.steps, *self.schedule)
        self.total_steps = cfg.steps
        self.budget, self.final_mask = self.init_budget, None
        self.reset_importance()

    def run_length(self) -> int:
        if self.total_steps is None:
            raise RuntimeError("RankAllocator: the run length is unknown until setup(model, cfg, optimizer) runs "
                               "(train() calls it before step 0; outside train() call it with cfg.steps set)")
        return self.total_steps

    def reset_importance(self) -> None:
        self.ipt_avg: dict[str, torch.Tensor] = {}  # "name.A" -> Ib, same shape as the parameter
        self.unc_avg: dict[str, torch.Tensor] = {}  # "name.A" -> Ub

    def budget_at(self, t: int) -> tuple[int, bool]:
        return budget_schedule(t, self.init_budget, self.target_budget, self.run_length(), self.t_init,
                               self.t_final, self.period)

    # ---------------------------------------------------------------------------------- importance
    @torch.no_grad()
    def update_importance(self) -> None:
        """One EMA step of Ib and Ub for every A, E, B from its current value and gradient."""
        for name, layer in self.layers.items():
            for pname in ("A", "E", "B"):
                p = getattr(layer, pname)
                if p.grad is None:
                    raise ValueError(f"{name}.{pname} has no gradient: update the importance after backward()")
                key = f"{name}.{pname}"
                ipt = (p * p.grad).abs()  # sensitivity I
                avg = self.ipt_avg.get(key, torch.zeros_like(p))
                unc = self.unc_avg.get(key, torch.zeros_like(p))
                avg = self.beta1 * avg + (1 - self.beta1) * ipt
                self.ipt_avg[key] = avg
                self.unc_avg[key] = self.beta2 * unc + (1 - self.beta2) * (ipt - avg).abs()

    def scores(self) -> dict[str, torch.Tensor]:
        """Triplet score S [r] per layer: s(E_i) + mean over in of s(A_i,:) + mean over out of s(B_:,i)."""
        if not self.ipt_avg:
            raise ValueError("no importance yet: update_importance() runs after at least one backward")
        out = {}
        for name in self.layers:
            s = {p: self.ipt_avg[f"{name}.{p}"] * self.unc_avg[f"{name}.{p}"] for p in ("A", "E", "B")}
            out[name] = s["E"] + s["A"].mean(dim=1) + s["B"].mean(dim=0)  # [r]
        return out

    # ---------------------------------------------------------------------------------- masking
    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, torch.Tensor]:
        """Zero E_i for the (init_budget - budget) lowest triplet scores; return name -> kept mask [r]."""
        kept = budget_mask(self.scores(), self.init_budget - budget)
        for name, layer in self.layers.items():
            layer.E.masked_fill_(~kept[name], 0.0)
        return kept

    @torch.no_grad()
    def apply_final_mask(self) -> None:
        for name, layer in self.layers.items():
            layer.E.masked_fill_(~self.final_mask[name], 0.0)

    # ---------------------------------------------------------------------------------- loop hooks
    def extra_loss(self, model: nn.Module) -> torch.Tensor:
        return self.orth_reg_weight * orthogonality_penalty(self.layers.values(), self.orth_reg)

    def after_backward(self, model: nn.Module, step: int) -> None:
        if step + 1 < self.run_length() - self.t_final:
            self.update_importance()

    def step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        t, t_fix = step + 1, self.run_length() - self.t_final
        if t < t_fix:
            self.budget, mask_now = self.budget_at(t)
            if mask_now:
                self.mask_to_budget(self.budget)
        elif t == t_fix:
            self.budget = self.target_budget
            self.final_mask = self.mask_to_budget(self.target_budget)
            self.reset_importance()
        else:
            self.apply_final_mask()

    def rank_pattern(self) -> dict[str, int]:
        """Current rank (nonzero singular values) of every adapted layer."""
        return {name: layer.rank() for name, layer in self.layers.items()}


def apply_adalora(
    model: nn.Module,
    init_r: int = 12,
    target_r: int = 8,
    alpha: float = 16.0,
    targets: str | Iterable[str] = ("c_attn",),
    t_init: int | float = 0,
    t_final: int | float = 0,
    period: int = 1,
    beta1: float = 0.85,
    beta2: float = 0.85,
    orth_reg_weight: float = 0.1,
    orth_reg: str = "code",
    dropout: float = 0.0,
) -> RankAllocator:
    """Wrap every target in an SVDLinear of rank init_r (the rest frozen); return the RankAllocator.

    The allocator is the loop's hooks: `alloc = apply_adalora(model); train(..., hooks=alloc);
    alloc.rank_pattern()`. t_init / t_final: steps (int) or fractions of the run (float), resolved in setup.
    """
    check_schedule(init_r, target_r, t_init, t_final, period, beta1, beta2, orth_reg_weight, orth_reg)
    names = inject(model, targets, lambda lin: SVDLinear(lin, r=init_r, alpha=alpha, dropout=dropout))
    layers = {name: model.get_submodule(name) for name in names}
    return RankAllocator(layers, target_r, t_init, t_final, period, beta1, beta2, orth_reg_weight, orth_reg)


def count_adalora(config: GPTConfig, init_r: int = 12, targets: str | Iterable[str] = ("c_attn",)) -> int:
    """Trainable entries after apply_adalora: r0 (in + out) + r0 per adapted layer (A, B and E)."""
    return sum(init_r * (o + i) + init_r for o, i in target_shapes(config, targets).values())
