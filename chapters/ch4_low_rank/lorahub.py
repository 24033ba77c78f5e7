"""LoraHub: adapt to an unseen task by mixing existing LoRA modules with weights found without gradients.

Paper: Chengsong Huang, Qian Liu, Bill Yuchen Lin, Tianyu Pang, Chao Du, Min Lin, "LoraHub: Efficient
Cross-Task Generalization via Dynamic LoRA Composition", COLM 2024, arXiv 2307.13269 (code: sail-sg/lorahub).

Idea: given K LoRAs trained on K upstream tasks (same targets, same rank) and a handful of examples of a new
task, learn only K mixing weights w. Each weighted combination is scored by its loss on the examples, and a
black-box optimiser (an evolution strategy here) proposes the next w: no backward pass, no optimizer state.

    A_hat = sum_k w_k A_k,   B_hat = sum_k w_k B_k,   dW = s B_hat A_hat        (for every adapted layer)
    F(w)  = (1/|E|) sum_{(x, y) in E} CE(y | x; W0 + dW(w))  +  c (1/K) sum_k |w_k|,     c = 0.05
    w starts at 0 (the base model) and stays in [-1.5, 1.5]^K

The composition rule is the released code's: the A's and the B's are mixed separately (a product of sums),
which is NOT the weighted sum of the K updates sum_k w_k s B_k A_k (a sum of products;
`composed_delta(..., rule="deltas")` computes that one for comparison; it is not a rank-r LoRA).

What trains: nothing by gradient; the K numbers w are searched. This is a plain function, not a training
recipe for the shared loop.

Choices (where the paper and the released code differ):
- the optimiser is a small (mu/mu_w, lambda) evolution strategy with cumulative step-size adaptation written
  here, i.e. CMA-ES without its covariance matrix (the paper uses Nevergrad's NGOpt/Shiwa, which resolves
  to CMA-ES at this size); the budget counts every evaluation of F, the starting point w = 0 included, and
  the best w ever evaluated is returned;
- bounds are kept by clipping proposals into the box;
- the loss is the mean token cross-entropy of the model's own loss over the given batches.

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/lora.py, chapters/ch4_low_rank/lorahub.py
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from chapters.ch4_low_rank.lora import LoRALinear

Batch = tuple[torch.Tensor, torch.Tensor]  # idx [B, T], labels [B, T]


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every LoRA factor of the model: {'<layer>.A': [r, in], '<layer>.B': [out, r], ...}."""
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            state[f"{name}.A"] = m.A.detach().clone()
            state[f"{name}.B"] = m.B.detach().clone()
    if not state:
        raise ValueError("the model has no LoRALinear; apply LoRA before taking its state")
    return state


def _check_modules(modules: Sequence[dict[str, torch.Tensor]], weights: torch.Tensor) -> None:
    if len(modules) == 0:
        raise ValueError("LoraHub needs at least one LoRA module")
    if weights.shape != (len(modules),):
        raise ValueError(f"need one weight per module: {len(modules)} modules, weights of shape {tuple(weights.shape)}")
    first = modules[0]
    for k, mod in enumerate(modules[1:], start=1):
        if mod.keys() != first.keys() or any(mod[n].shape != first[n].shape for n in first):
            raise ValueError(f"module {k} does not match module 0 (different targets or ranks); LoraHub mixes "
                             "modules of identical architecture only")


def compose(modules: Sequence[dict[str, torch.Tensor]], weights: torch.Tensor | Sequence[float]
            ) -> dict[str, torch.Tensor]:
    """The weighted sum of each factor across modules: {name: sum_k w_k module_k[name]}."""
    w = torch.as_tensor(weights, dtype=torch.float32)
    _check_modules(modules, w)
    return {n: sum(float(w[k]) * mod[n] for k, mod in enumerate(modules)) for n in modules[0]}


@torch.no_grad()
def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy factors into the model's LoRALinear layers; every layer must be covered, shapes must match."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    expected = {f"{n}.{f}" for n in layers for f in ("A", "B")}
    if set(state) != expected:
        raise ValueError(f"LoRA state does not fit the model: missing {sorted(expected - set(state))}, "
                         f"unknown {sorted(set(state) - expected)}")
    for key, t in state.items():
        name, factor = key.rsplit(".", 1)
        param = getattr(layers[name], factor)
        if param.shape != t.shape:
            raise ValueError(f"{key}: saved {tuple(t.shape)} vs model {tuple(param.shape)}")
        param.copy_(t)


def composed_delta(modules: Sequence[dict[str, torch.Tensor]], weights: torch.Tensor | Sequence[float],
                   scale: float, rule: str = "factors") -> dict[str, torch.Tensor]:
    """{layer: dW [out, in]}: "factors" (LoraHub) s (sum w B)(sum w A); "deltas" sum_k w_k s B_k A_k."""
    w = torch.as_tensor(weights, dtype=torch.float32)
    _check_modules(modules, w)
    layers = [n[:-2] for n in modules[0] if n.endswith(".A")]
    if rule == "factors":
        mixed = compose(modules, w)
        return {n: scale * mixed[f"{n}.B"] @ mixed[f"{n}.A"] for n in layers}
    if rule == "deltas":
        return {n: sum(float(w[k]) * scale * mod[f"{n}.B"] @ mod[f"{n}.A"] for k, mod in enumerate(modules))
                for n in layers}
    raise ValueError(f"rule must be 'factors' or 'deltas', got {rule!r}")


def l1_term(weights: torch.Tensor, c: float = 0.05) -> float:
    """c * mean_k |w_k|: the penalty that keeps the mix sparse and small."""
    return c * weights.abs().mean().item()


@torch.no_grad()
def lorahub_objective(model: nn.Module, modules: Sequence[dict[str, torch.Tensor]], weights: torch.Tensor,
                      batches: Sequence[Batch], c: float = 0.05) -> float:
    """F(w): load the composition into the model, mean loss over the few-shot batches, plus the L1 term."""
    load_lora_state(model, compose(modules, weights))
    was_training = model.training
    model.eval()
    losses = [model(idx, labels=labels).loss.item() for idx, labels in batches]
    model.train(was_training)
    return sum(losses) / len(losses) + l1_term(weights, c)


@dataclass
class ESResult:
    best_x: torch.Tensor
    best_f: float
    evaluations: int
    history: list[float]  # every evaluated F, in order


def es_minimize(
    f: Callable[[torch.Tensor], float],
    dim: int,
    budget: int = 40,
    bounds: tuple[float, float] = (-1.5, 1.5),
    sigma: float = 0.5,
    x0: torch.Tensor | None = None,
    seed: int = 0,
) -> ESResult:
    """Minimise f over the box with a (mu/mu_w, lambda)-ES: exactly `budget` evaluations, x0 (default 0) first.

    CMA-ES without the covariance matrix: each generation samples lambda = 4 + floor(3 ln dim) points
    x_i = m + sigma z_i (clipped into the box), moves m to the weighted mean of the best mu = lambda // 2, and
    adapts sigma by cumulative step-size adaptation (the evolution path p grows when steps keep pointing
    the same way, so sigma grows; it shrinks when they cancel):
        p <- (1 - c) p + sqrt(c (2 - c) mu_eff) (m_new - m) / sigma,   sigma <- sigma exp(c/d (|p| / E|N(0,I)| - 1))
    """
    if dim <= 0 or budget <= 0:
        raise ValueError(f"dim and budget must be positive, got {dim}, {budget}")
    lo, hi = bounds
    if not lo < hi or not sigma > 0:
        raise ValueError(f"need bounds lo < hi and sigma > 0, got {bounds}, {sigma}")
    gen = torch.Generator().manual_seed(seed)
    mean = torch.zeros(dim) if x0 is None else x0.detach().float().clamp(lo, hi)
    lam = 4 + int(3 * math.log(dim))
    mu = max(1, lam // 2)
    ranks = math.log(mu + 0.5) - torch.log(torch.arange(1, mu + 1, dtype=torch.float32))  # [mu] recombination
    mu_eff = ranks.sum().item() ** 2 / (ranks**2).sum().item()
    c = (mu_eff + 2) / (dim + mu_eff + 5)
    d = 1 + 2 * max(0.0, math.sqrt((mu_eff - 1) / (dim + 1)) - 1) + c
    chi = math.sqrt(dim) * (1 - 1 / (4 * dim) + 1 / (21 * dim * dim))  # E|N(0, I)|
    path = torch.zeros(dim)
    best_x, best_f = mean.clone(), f(mean.clone())
    history = [best_f]
    while len(history) < budget:
        n = min(lam, budget - len(history))  # the last generation may be cut short by the budget
        children = (mean + sigma * torch.randn(lam, dim, generator=gen)[:n]).clamp(lo, hi)  # [n, dim]
        scores = torch.tensor([f(x.clone()) for x in children])  # [n]
        history += scores.tolist()
        order = scores.argsort()
        if scores[order[0]] < best_f:
            best_f, best_x = scores[order[0]].item(), children[order[0]].clone()
        k = min(mu, n)
        weights = ranks[:k] / ranks[:k].sum()  # [k]
        new_mean = (weights[:, None] * children[order[:k]]).sum(0)  # [dim]
        path = (1 - c) * path + math.sqrt(c * (2 - c) * mu_eff) * (new_mean - mean) / sigma
        sigma *= math.exp(c / d * (path.norm().item() / chi - 1))
        mean = new_mean
    return ESResult(best_x, best_f, len(history), history)


def lorahub(model: nn.Module, modules: Sequence[dict[str, torch.Tensor]], batches: Sequence[Batch],
            budget: int = 40, c: float = 0.05, seed: int = 0) -> ESResult:
    """Search the mixing weights on the few-shot batches; leave the best composition loaded in the model."""
    if not batches:
        raise ValueError("LoraHub needs at least one few-shot batch")
    result = es_minimize(lambda w: lorahub_objective(model, modules, w, batches, c), len(modules), budget,
                         seed=seed)
    load_lora_state(model, compose(modules, result.best_x))
    return result
