"""GaLore: full-parameter training with Adam run in a low-rank projection of each gradient.

Paper: Jiawei Zhao, Zhenyu Zhang, Beidi Chen, Zhangyang Wang, Anima Anandkumar, Yuandong Tian, "GaLore:
Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024, arXiv 2403.03507
(code: jiaweizzhao/GaLore).

Idea: the weights stay full rank and all of them train; what is low rank is the optimizer. Each matrix's
gradient is projected onto r directions found by an SVD of the gradient itself (refreshed every T steps),
Adam's two moments live in that r-dimensional space, and the Adam step is projected back to full size.

For a matrix parameter W [m, n] (nn.Linear: m = out, n = in) with gradient G [m, n] at step t:

    every T steps (t % T == 0):  G = U S V^T                               (SVD of the current gradient)
        m <  n: P = U[:, :r]  [m, r],  R = P^T G  [r, n]     ("left": project the shorter side, the rows)
        m >= n: Q = V[:, :r]  [n, r],  R = G Q    [m, r]     ("right"; ties go right, like the code)
    M = b1 M + (1 - b1) R,   V = b2 V + (1 - b2) R^2,   N = M_hat / (sqrt(V_hat) + eps)   (Adam, in r dims)
    W <- W - lr * wd * W  (decoupled decay),   W <- W - lr * alpha * (P N  or  N Q^T)

Optimizer state per matrix: the projector (m r or n r) plus two moments of r * max(m, n) numbers instead of
Adam's 2 m n. Vectors (biases, LayerNorms) and, as in the paper, the embedding get plain Adam(W).

What trains: every parameter (this is full fine-tuning); only the optimizer differs. `apply_galore` puts the
block linear weights named by `targets` in the projected group and returns a `GaLore` hooks object whose
`make_optimizer` builds the GaLoreAdamW from the loop's TrainConfig (lr, betas, weight decay).

Choices (where the paper and the released code differ, or leave it open):
- the moments are NOT re-projected or reset when the projector is refreshed (as the released code); they are
  reused as they are in the new coordinates. `reset_on_refresh=True` zeroes them for the ablation;
- Adam's normalisation is torch.optim.Adam's (eps added after the bias-corrected square root), so a GaLore
  step with the identity as projector is exactly torch.optim.Adam's step (a test checks it);
- only the paper's "std" side rule is implemented (the code also has reverse/left/right/two-sided types);
  no 8-bit states and no per-layer updates inside backward (they matter at 7B scale, not here);
- GaLore trains every parameter, so it must be the first method on a model (stacked, it raises).

dtype and device: the projector and the moments take the gradient's dtype and device (the SVD runs in
float32 at least). `count_galore` is the trainable count as a formula of the GPT config.

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/galore.py
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from minimal.hooks import Hooks
from minimal.peft import APPLIED, find_linears, freeze_base

if TYPE_CHECKING:
    from minimal.gpt import GPTConfig
    from minimal.train import TrainConfig


def project(grad: torch.Tensor, side: str, P: torch.Tensor) -> torch.Tensor:
    """The gradient in the r-dimensional space: R = P^T G [r, n] ("left", P [m, r]) or G Q [m, r] ("right")."""
    return P.T @ grad if side == "left" else grad @ P


def project_back(update: torch.Tensor, side: str, P: torch.Tensor, alpha: float) -> torch.Tensor:
    """Adam's step N, taken in the projected space, back to full size [m, n]: alpha P N or alpha N Q^T."""
    return alpha * (P @ update if side == "left" else update @ P.T)


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose param groups with `r` set run Adam on rank-r projections of 2-D gradients.

    Group keys: lr, betas, eps, weight_decay, and for projected groups r (the rank), period (T, steps between
    projector refreshes), alpha (the back-projection scale). A group whose `r` is None is plain AdamW.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        r: int | None = None,
        period: int = 200,
        alpha: float = 0.25,
        reset_on_refresh: bool = False,
    ) -> None:
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"bad Adam settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, r=r, period=period, alpha=alpha,
                        reset_on_refresh=reset_on_refresh)
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._check_group(group)

    @staticmethod
    def _check_group(group: dict) -> None:
        r = group["r"]
        if r is None:
            return
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"GaLore rank r must be a positive int, got {r!r}")
        period = group["period"]
        if not isinstance(period, int) or isinstance(period, bool) or period <= 0:
            raise ValueError(f"GaLore period (T, steps between projector refreshes) must be a positive int, "
                             f"got {period!r}")
        if not group["alpha"] > 0:
            raise ValueError(f"GaLore alpha must be positive, got {group['alpha']}")
        for p in group["params"]:
            if p.dim() != 2:
                raise ValueError(f"GaLore projects 2-D parameters only; got one of shape {tuple(p.shape)}")
            if r > min(p.shape):
                raise ValueError(f"GaLore rank r={r} exceeds min(m, n) = {min(p.shape)} of a {tuple(p.shape)} matrix")

    def compute_projector(self, grad: torch.Tensor, r: int) -> tuple[str, torch.Tensor]:
        """('left', U[:, :r] [m, r]) when m < n, else ('right', V[:, :r] [n, r]), from the SVD of grad [m, n]."""
        work = torch.promote_types(grad.dtype, torch.float32)  # no bfloat16 SVD
        U, _, Vh = torch.linalg.svd(grad.to(work), full_matrices=False)  # U [m, k], Vh [k, n]
        if grad.shape[0] < grad.shape[1]:
            return "left", U[:, :r].to(grad.dtype).contiguous()  # [m, r]
        return "right", Vh[:r].T.to(grad.dtype).contiguous()  # [n, r]

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's Optimizer.step signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                projected = group["r"] is not None
                if not state:
                    state["step"] = 0
                if projected and state["step"] % group["period"] == 0:
                    refreshed = "projector" in state
                    state["side"], state["projector"] = self.compute_projector(grad, group["r"])
                    if refreshed and group["reset_on_refresh"]:
                        state["exp_avg"].zero_()
                        state["exp_avg_sq"].zero_()
                if projected:
                    grad = project(grad, state["side"], state["projector"])  # [r, n] or [m, r]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(grad, 1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = (v / (1 - b2**t)).sqrt_().add_(group["eps"])
                update = (m / (1 - b1**t)) / denom  # N, in the projected space when projected
                if projected:
                    update = project_back(update, state["side"], state["projector"], group["alpha"])  # [m, n]
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
        return loss


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor held in the optimizer state (moments, projectors, step counters)."""
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t))


def galore_state_numel(shape: tuple[int, int], r: int) -> int:
    """Numbers GaLore keeps for one [m, n] matrix: the projector on the short side, two moments on the long one.

    m < n (left): P [m, r], moments [r, n];  m >= n (right): Q [n, r], moments [m, r].
    """
    m, n = shape
    short, long = (m, n) if m < n else (n, m)
    return r * short + 2 * r * long


def adam_state_numel(shape: tuple[int, ...]) -> int:
    """Adam's two moments: 2 * numel."""
    return 2 * math.prod(shape)


class GaLore(Hooks):
    """The hooks of a GaLore run: its optimizer. The projected weights are chosen at apply time."""

    def __init__(self, projected: list[nn.Parameter], r: int, period: int, alpha: float,
                 reset_on_refresh: bool) -> None:
        super().__init__()
        self.projected_ids = {id(p) for p in projected}
        self.r, self.period, self.alpha, self.reset_on_refresh = r, period, alpha, reset_on_refresh

    def make_optimizer(self, params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
        """GaLoreAdamW with lr, betas and weight decay from `cfg`; the decay applies to matrices only (as AdamW's)."""
        low = [p for p in params if id(p) in self.projected_ids]
        mats = [p for p in params if id(p) not in self.projected_ids and p.dim() >= 2]
        vecs = [p for p in params if id(p) not in self.projected_ids and p.dim() < 2]
        groups = [
            {"params": low, "r": self.r, "weight_decay": cfg.weight_decay},
            {"params": mats, "weight_decay": cfg.weight_decay},
            {"params": vecs, "weight_decay": 0.0},
        ]
        return GaLoreAdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, r=None,
                           period=self.period, alpha=self.alpha, reset_on_refresh=self.reset_on_refresh)


def apply_galore(
    model: nn.Module,
    r: int = 16,
    period: int = 50,
    alpha: float = 0.25,
    targets: str | Iterable[str] = ("c_attn", "c_proj", "c_fc"),
    reset_on_refresh: bool = False,
) -> GaLore:
    """Train every parameter; the targeted linear weights get GaLore's projected Adam, the rest AdamW.

    Returns the GaLore hooks, whose make_optimizer builds the GaLoreAdamW (called by the training loop).
    """
    if getattr(model, APPLIED, 0):
        raise ValueError("GaLore trains every parameter; apply it to a model without another method")
    names = find_linears(model, targets)
    projected = [model.get_submodule(n).weight for n in names]
    for w in projected:  # fail at apply time, not at the first step
        GaLoreAdamW._check_group({"r": r, "period": period, "alpha": alpha, "params": [w]})
    freeze_base(model)  # marks the model as carrying a method; then everything trains
    for p in model.parameters():
        p.requires_grad_(True)
    return GaLore(projected, r, period, alpha, reset_on_refresh)


def count_galore(config: GPTConfig) -> int:
    """Trainable entries after apply_galore: every parameter of the GPT (GPTConfig.n_params)."""
    return config.n_params()
