"""SparseAdapter: prune the adapters themselves once, at initialisation, and train what survives.

Paper: Shwai He, Liang Ding, Daize Dong, Miao Zhang, Dacheng Tao, "SparseAdapter: An Easy Approach for
Improving the Parameter-Efficiency of Adapters", Findings of EMNLP 2022, arXiv 2210.04284
(code: Shwai-He/SparseAdapter). Built on adapters.py: copy it with this file.

Idea: score every weight of freshly initialised adapters with a pruning-at-initialisation criterion, keep
the best fraction f of them (the paper's sparsity is s = 1 - f), and train only those for the whole run.
Sparse adapters match dense ones up to high sparsity, and a wider but sparser adapter ("Large-Sparse")
gains capacity at the same budget.

    W_eff = M * W                    for W_down [m, d] and W_up [d, m] of every adapter; biases are not pruned
    SNIP score  S = |W * dL/dW|      (the gradient of the loss w.r.t. a multiplicative mask at M = 1)
    M = top-k(S),  k = ceil(f N)     over all adapter weights (scope "global") or per tensor ("tensor")
    Large-Sparse: m' = floor(m / f), so ceil(f 2 m' d) <= 2 m d: the dense-m budget

What trains: the host adapters (adapters.py: Pfeiffer by default, or Houlsby) with the mask applied. The
non-zero count is the fraction f of the adapter weights plus the dense biases (`nonzero_count`).
`count_trainable`, and `count_sparse_adapter`, report the dense storage of the masked tensors, since the
mask is applied in forward.

Implementation of "the mask holds": a fixed mask applied in the forward pass (a `torch.nn.utils.parametrize`
parametrisation W_eff = M * W, the mask a buffer). At pruning time the pruned raw entries are set to zero
too. Their gradient is M * dL/dW_eff = 0 from then on, so AdamW's moments stay zero and decoupled weight
decay of a zero is zero: pruned entries stay exactly zero, raw and effective, with any optimiser setting.

Choices:
- when the scores are computed (the paper: before any optimiser step): with `batches` given, at apply time
  from those batches (the gradient is averaged over them; the adapters sit in the model for that one
  forward/backward and are taken out again, so a refused apply leaves the model as it was); without,
  inside the training loop at step 0, from the first training batch (one batch, as SNIP), before the first
  update. So the method works with the shared loop and the leaderboard, which never hand data to `apply`;
- criteria: "snip" (default, the paper's best), "magnitude" |W| and "random" (data-free, scored at apply
  time); GraSP and SynFlow are not implemented. Scores are normalised by their sum (ranking unchanged);
- init (an interpretation): SNIP needs non-zero weights in both projections: with a zero up-projection
  every score is zero, so the adapters' "near_identity" init (both projections ~1e-3) is the default and
  an all-zero score is a ValueError that says so (`snip_scores` shows the pitfall); "magnitude" with
  init="zero" is refused for the same reason (every |W_up| ties at 0, so W_up would be pruned whole);
- one-shot pruning only (the code's iterative schedules are not implemented);
- the adapters take the dtype and device of the model; the masks live on the same device.

Copy: minimal/hooks.py, minimal/peft.py, minimal/gpt.py, minimal/sparse.py, chapters/ch2_additive/adapters.py, chapters/ch2_additive/sparse_adapter.py
"""  # noqa: E501

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from chapters.ch2_additive.adapters import PLACEMENTS, Adapter, build_adapters, count_adapters, insert_adapters
from minimal.hooks import Hooks
from minimal.peft import replace_module
from minimal.sparse import Masks, topk_mask

if TYPE_CHECKING:
    from minimal.gpt import GPT, GPTConfig

Batch = tuple[torch.Tensor, torch.Tensor]  # (idx, labels), each [B, T]
CRITERIA = ("snip", "magnitude", "random")
SCOPES = ("global", "tensor")


class FixedMask(nn.Module):
    """Parametrisation W_eff = M * W with a fixed bool mask M (a buffer; all True until pruned)."""

    def __init__(self, shape: torch.Size, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool, device=device))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask  # [out, in]


def _raw_weights(adapters: dict[str, Adapter]) -> dict[str, nn.Parameter]:
    """The raw weights W of masked adapters (by hook name) as {"h.0.mlp_out.down": W, ...}."""
    return {f"{name}.{part}": getattr(a, part).parametrizations.weight.original
            for name, a in adapters.items() for part in ("down", "up")}


def masked_weights(model: GPT) -> dict[str, nn.Parameter]:
    """The raw (un-masked) adapter weights W by adapter linear name, e.g. "h.0.mlp_out.down"."""
    adapters = {f"h.{i}.{hook}": getattr(block, hook) for i, block in enumerate(model.h)
                for hook in ("attn_out", "mlp_out")}
    out = _raw_weights({n: a for n, a in adapters.items()
                        if isinstance(a, Adapter) and parametrize.is_parametrized(a.down, "weight")})
    if not out:
        raise ValueError("this model has no sparse adapters; call apply_sparse_adapter first")
    return out


def _mask_modules(model: GPT) -> dict[str, FixedMask]:
    return {name: model.get_submodule(name).parametrizations.weight[0] for name in masked_weights(model)}


# ------------------------------------------------------------------------------------------ scores


def snip_scores(model: GPT, batches: list[Batch]) -> dict[str, torch.Tensor]:
    """|W * dL/dW| for every adapter weight, the gradient averaged over `batches`, normalised to sum 1."""
    if not batches:
        raise ValueError("SNIP needs at least one (idx, labels) batch")
    weights = masked_weights(model)
    device = next(iter(weights.values())).device
    grads = {n: torch.zeros_like(w) for n, w in weights.items()}
    for idx, labels in batches:
        loss = model(idx.to(device), labels=labels.to(device)).loss / len(batches)
        for n, g in zip(weights, torch.autograd.grad(loss, list(weights.values())), strict=True):
            grads[n] += g
    return _normalise({n: (w.detach() * grads[n]).abs() for n, w in weights.items()})


def data_free_scores(weights: dict[str, torch.Tensor], criterion: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """"magnitude" |W| or "random" U(0, 1) scores for the adapter weights {name: W}."""
    if criterion == "magnitude":
        return _normalise({n: w.detach().abs() for n, w in weights.items()})
    if criterion == "random":
        gen = torch.Generator().manual_seed(seed)
        return {n: torch.rand(w.shape, generator=gen).to(w.device) for n, w in weights.items()}
    raise ValueError(f"unknown data-free criterion {criterion!r}; choose 'magnitude' or 'random'")


def _normalise(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    total = sum(s.sum() for s in scores.values())
    if total == 0:
        raise ValueError("every pruning score is zero: with a zero-initialised up-projection SNIP gives zero "
                         "scores to W_up and zero gradients to W_down; use init='near_identity'")
    return {n: s / total for n, s in scores.items()}


@contextlib.contextmanager
def _in_place(model: GPT, adapters: dict[str, Adapter]) -> Iterator[None]:
    """The adapters sit in their hooks inside the block, and the hooks hold what they held before after it."""
    before = {name: model.get_submodule(name) for name in adapters}
    try:
        for name, adapter in adapters.items():
            replace_module(model, name, adapter)
        yield
    finally:
        for name, module in before.items():
            replace_module(model, name, module)


# ------------------------------------------------------------------------------------------ pruning


def n_keep(n: int, fraction: float) -> int:
    """ceil(fraction n), robust to float rounding (1 - 0.7 = 0.30000000000000004 keeps 42 of 140, not 43)."""
    return math.ceil(round(fraction * n, 9))


def choose_masks(scores: dict[str, torch.Tensor], fraction: float, scope: str = "global") -> Masks:
    """Keep the top ceil(fraction N) scores, of all adapter weights together ("global") or of each tensor."""
    check_fraction(fraction)
    if scope == "global":
        return topk_mask(scores, n_keep(sum(s.numel() for s in scores.values()), fraction))
    if scope == "tensor":
        return {n: topk_mask({n: s}, n_keep(s.numel(), fraction))[n] for n, s in scores.items()}
    raise ValueError(f"unknown pruning scope {scope!r}; choose one of {SCOPES}")


@torch.no_grad()
def prune(model: GPT, scores: dict[str, torch.Tensor], fraction: float, scope: str = "global") -> Masks:
    """Keep the top ceil(fraction N) scores (all adapter weights together, or per tensor); zero the rest.

    Sets each FixedMask, zeroes the pruned raw weights and any gradient they hold; returns the masks.
    """
    weights = masked_weights(model)
    if set(scores) != set(weights):
        raise ValueError(f"scores cover {sorted(scores)}, the adapter weights are {sorted(weights)}")
    masks = choose_masks(scores, fraction, scope)
    set_masks(model, masks)
    return masks


@torch.no_grad()
def set_masks(model: GPT, masks: Masks) -> None:
    """Copy each mask into its FixedMask and zero the pruned raw weights (and any gradient they hold)."""
    weights, modules = masked_weights(model), _mask_modules(model)
    for n, keep in masks.items():
        keep = keep.to(weights[n].device)
        modules[n].mask.copy_(keep)
        weights[n].mul_(keep)
        if weights[n].grad is not None:
            weights[n].grad.mul_(keep)


def check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction (of adapter weights kept) must be in (0, 1], got {fraction!r}")


def large_sparse_bottleneck(bottleneck: int, fraction: float) -> int:
    """m' = floor(m / fraction): the widest adapter whose kept weights fit the dense-m budget 2 m d."""
    check_fraction(fraction)
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck <= 0:
        raise ValueError(f"bottleneck must be a positive int, got {bottleneck!r}")
    return math.floor(bottleneck / fraction + 1e-9)


def nonzero_count(model: GPT) -> dict[str, int]:
    """{"weights": kept adapter weights, "dense_weights": all adapter weights, "biases": adapter biases}."""
    modules = _mask_modules(model)
    biases = sum(model.get_submodule(n).bias.numel() for n in modules)
    return {"weights": int(sum(int(m.mask.sum()) for m in modules.values())),
            "dense_weights": sum(m.mask.numel() for m in modules.values()), "biases": biases}


# ------------------------------------------------------------------------------------------ the method


def apply_sparse_adapter(
    model: GPT,
    bottleneck: int = 16,
    fraction: float = 0.5,
    criterion: str = "snip",
    scope: str = "global",
    placement: str = "pfeiffer",
    batches: list[Batch] | None = None,
    init: str = "near_identity",
    train_layernorm: bool | None = None,
    seed: int = 0,
) -> Hooks:
    """Insert adapters (adapters.py), then prune their weights to keep `fraction` of them, by `criterion`.

    SNIP with `batches`: scored and pruned now. SNIP without: scored on the first training batch at step 0
    of the shared loop (the returned hooks), before the first optimiser step. Everything that can fail
    (arguments, scores) runs before the model changes.
    """
    check_fraction(fraction)
    if criterion not in CRITERIA:
        raise ValueError(f"unknown pruning criterion {criterion!r}; choose one of {CRITERIA}")
    if scope not in SCOPES:
        raise ValueError(f"unknown pruning scope {scope!r}; choose one of {SCOPES}")
    if init == "zero" and criterion == "magnitude":
        raise ValueError("criterion='magnitude' with init='zero' would prune all of W_up (every |W_up| is 0), "
                         "leaving an adapter that is only a bias; use init='near_identity' or another criterion")
    if criterion == "snip" and batches is not None and not batches:
        raise ValueError("SNIP needs at least one (idx, labels) batch (or batches=None: the first training batch)")
    adapters = build_adapters(model, bottleneck, placement, init=init)  # validates; the model is unchanged
    for a in adapters.values():
        for lin in (a.down, a.up):
            parametrize.register_parametrization(lin, "weight", FixedMask(lin.weight.shape, lin.weight.device))
    masks = None
    if criterion != "snip":
        masks = choose_masks(data_free_scores(_raw_weights(adapters), criterion, seed), fraction, scope)
    elif batches is not None:
        with _in_place(model, adapters):
            masks = choose_masks(snip_scores(model, batches), fraction, scope)
    insert_adapters(model, adapters, placement == "houlsby" if train_layernorm is None else train_layernorm)
    if masks is not None:
        set_masks(model, masks)
        return Hooks()
    pruned = [False]

    def score_at_step_zero(m: nn.Module, step: int) -> None:
        if pruned[0]:
            return
        weights = masked_weights(m)
        missing = [n for n, w in weights.items() if w.grad is None]
        if missing:
            raise ValueError(f"SNIP at step 0: no gradient for {missing[:3]}; is the model in the loss?")
        prune(m, _normalise({n: (w.detach() * w.grad).abs() for n, w in weights.items()}), fraction, scope)
        pruned[0] = True

    return Hooks(after_backward=score_at_step_zero)


def count_sparse_adapter(config: GPTConfig, bottleneck: int = 16, placement: str = "pfeiffer",
                         train_layernorm: bool | None = None) -> int:
    """The dense storage of the masked adapters (the host adapters' count, adapters.py): L (2md + m + d) for
    Pfeiffer. Their non-zero weights are ceil(fraction N) of N = n L 2md (`nonzero_count` after apply)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown adapter placement {placement!r}; choose one of {sorted(PLACEMENTS)}")
    return count_adapters(config, bottleneck, placement, train_layernorm)
