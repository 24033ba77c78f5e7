"""SAM: choose the sparse mask by a second-order approximation of the loss reduction.

Paper: Fu, Yang, So, Lam, Bing, Collier, "On the Effectiveness of Parameter-Efficient Fine-Tuning",
AAAI 2023, arXiv 2211.15583 (SAM = Second-order Approximation Method).

Idea: almost every PEFT method is a sparse fine-tune theta = theta0 + M * Delta. If the loss near theta0
is modelled by its second-order Taylor expansion, the best mask of K entries has a closed form: keep the
entries where one Newton step would lower the loss the most. Then train only those entries.

    min_{||M||_0 = K}  min_Delta  L(theta0) + g^T (M * Delta) + 1/2 (M * Delta)^T H (M * Delta)
    H = diag(h):  Delta_i = -g_i / h_i on the mask,  loss reduction = sum_{i in M} g_i^2 / (2 h_i)
    => M = top-K of g_i^2 / h_i                              (`second_order_scores`, the derivation)
    => M = top-K of |g_i| when h is uniform                  (what the released code does)

Released rule (the default here): a burn-in of B batches accumulates the signed gradient at theta0,
G = sum_t grad L_t(theta0), with no parameter update; then, in every tensor separately, the
int(rho * numel) entries of largest |G| are selected (`accumulated_gradient`, `sam_mask`). The
consistent push of the mean gradient decides, unlike FISH (mean of squared per-example gradients,
which also rewards noisy coordinates) or LT-SFT (how far full fine-tuning moved each weight).

What trains: the selected entries only; a tensor whose int(rho * numel) is 0 (small vectors at rho =
0.5%) gets no entry, as in the released code.

Choices where paper and code differ: we follow the code (|sum of gradients|, per-tensor budget) and
keep the g^2/h ranking as a function for the theory. The burn-in happens inside `apply_sam`, before
the training loop, so the loop's steps are all training steps (the code counts the burn-in as the first
B steps of the run; parameters are unchanged during it either way). Our head is the tied wte, which
stays frozen and unscored (verbaliser tokens instead of a new dense head). Training uses the delta
parametrisation of `minimal.sparse` by default (unselected entries are not parameters, so they stay
bitwise theta0); implementation="grad_mask" masks .grad before AdamW as the released code does, without
restoring unselected entries (so they are fixed only with weight decay 0).
Departure from the released code: the selected entries train as the value vector of a sparse delta
(`minimal.sparse`), which is 1-D and so never weight-decayed (the loop decays matrices only); with
the leaderboard's weight decay 0 the two agree.
Stacked on another method, SAM leaves that method's parameters out of the scoring: they keep training.
`count_sam(config, fraction, per_tensor, exclude)` is the trainable count by formula; the deltas take the
dtype and device of their parameters.

Copy: minimal/hooks.py, minimal/peft.py, minimal/sparse.py, chapters/ch3_selective/sam.py
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from minimal.hooks import Hooks
from minimal.peft import freeze_base, trained_before
from minimal.sparse import (
    GradMask,
    Masks,
    add_sparse_deltas,
    sparse_deltas,
    sum_batch_gradients,
    topk_mask,
)

if TYPE_CHECKING:
    from minimal.gpt import GPT, GPTConfig

Batch = tuple[torch.Tensor, torch.Tensor]  # idx [B, T], labels [B, T]
IMPLEMENTATIONS = ("delta", "grad_mask")
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's own loss on (idx, labels): mean cross-entropy on the target tokens."""
    idx, labels = batch
    return model(idx, labels=labels).loss


# ------------------------------------------------------------------------------------------ scores


def accumulated_gradient(model: nn.Module, batches: Iterable[Batch], names: list[str] | None = None,
                         loss_fn: LossFn = lm_loss) -> dict[str, torch.Tensor]:
    """The burn-in: G = sum over batches of d loss_t / d theta at the current weights (signed sum).

    The model is not changed: no parameter moves and no .grad is left behind (dropout is off meanwhile).
    names: the parameters to accumulate (default: all). loss_fn(model, batch) -> scalar loss.
    """
    total, count = sum_batch_gradients(model, batches, names, loss_fn)
    if count == 0:
        raise ValueError("accumulated_gradient: no batches given")
    return total


def second_order_scores(grad: dict[str, torch.Tensor], curvature: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loss reduction g_i^2 / (2 h_i) of a Newton step on entry i alone (diagonal H, h > 0)."""
    if set(grad) != set(curvature):
        raise ValueError(f"grad and curvature cover different tensors: {sorted(set(grad) ^ set(curvature))}")
    for n, h in curvature.items():
        if h.shape != grad[n].shape:
            raise ValueError(f"curvature for {n} has shape {tuple(h.shape)}, the gradient {tuple(grad[n].shape)}")
        if not bool((h > 0).all()):
            raise ValueError(f"curvature for {n} must be positive (a local minimum along every axis)")
    return {n: g.square() / (2 * curvature[n]) for n, g in grad.items()}


def sam_mask(scores: dict[str, torch.Tensor], fraction: float = 0.005, per_tensor: bool = True) -> Masks:
    """Top entries of |score|: int(fraction * numel) in every tensor (released rule) or globally.

    Returns a mask for every scored tensor (all False where the budget rounds down to 0).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not scores:
        raise ValueError("sam_mask: no score tensors given")
    if not per_tensor:
        k = int(fraction * sum(s.numel() for s in scores.values()))
        if k < 1:
            raise ValueError(f"fraction {fraction} of the scored entries selects nothing; raise it")
        return topk_mask({n: s.abs() for n, s in scores.items()}, k)
    masks = {}
    for n, s in scores.items():
        k = int(fraction * s.numel())
        m = torch.zeros(s.numel(), dtype=torch.bool, device=s.device)
        if k > 0:
            m[torch.topk(s.detach().abs().reshape(-1).float(), k).indices] = True
        masks[n] = m.view(s.shape)
    if not any(bool(m.any()) for m in masks.values()):
        raise ValueError(f"fraction {fraction} selects no entry in any tensor; raise it")
    return masks


# ------------------------------------------------------------------------------------------ apply


def burn_in_batches(data: Any, block_size: int, batch_size: int = 16, n_batches: int = 32,
                    seed: int = 0) -> list[Batch]:
    """n_batches (idx, labels) batches: drawn at random from a minimal.data.Task's train split, or the given ones."""
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches <= 0:
        raise ValueError(f"n_batches must be a positive int, got {n_batches!r}")
    if hasattr(data, "splits"):  # a Task: minimal.data (tokenizer included) is loaded already, since it made it
        from minimal.data import collate

        gen = torch.Generator().manual_seed(seed)
        train = data.train
        picks = [torch.randint(0, len(train), (batch_size,), generator=gen).tolist() for _ in range(n_batches)]
        batches = [collate([train[i] for i in pick], block_size) for pick in picks]
    else:
        batches = list(data)[:n_batches]
    if not batches:
        raise ValueError("no burn-in batches to accumulate gradients from")
    return batches


def apply_sam(model: GPT, data: Any, fraction: float = 0.005, n_batches: int = 32, batch_size: int = 16,
              exclude: tuple[str, ...] = ("wte.weight",), per_tensor: bool = True, implementation: str = "delta",
              seed: int = 0) -> Hooks:
    """Burn-in on `data` (a Task or (idx, labels) batches), select by |G| per tensor, train only those entries.

    The burn-in and the selection (and every check) happen before the model changes.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if any(True for _ in sparse_deltas(model)):
        raise ValueError("the model already has sparse deltas; merge_sparse_deltas(model) first")
    params = dict(model.named_parameters())
    unknown = [e for e in exclude if e not in params]
    if unknown:
        raise ValueError(f"exclude names unknown parameters {unknown}; parameters are e.g. {list(params)[:5]}")
    earlier = trained_before(model)
    names = [n for n in params if n not in exclude and n not in earlier]
    if not names:
        raise ValueError("no parameter left to score: all are excluded or trained by an earlier method")
    device = next(model.parameters()).device
    batches = [(i.to(device), y.to(device)) for i, y in
               burn_in_batches(data, model.config.block_size, batch_size, n_batches, seed)]
    G = accumulated_gradient(model, batches, names)
    mask = {n: m for n, m in sam_mask(G, fraction, per_tensor).items() if bool(m.any())}
    freeze_base(model)
    if implementation == "delta":
        add_sparse_deltas(model, mask)
        return Hooks()
    for n in mask:
        params[n].requires_grad_(True)
    return GradMask(model, mask, restore=False)


def count_sam(config: GPTConfig, fraction: float = 0.005, per_tensor: bool = True,
              exclude: tuple[str, ...] = ("wte.weight",)) -> int:
    """sum over the scored tensors of floor(fraction * numel) (per tensor), or floor(fraction * all scored)."""
    V, T, L, d = config.vocab_size, config.block_size, config.n_layer, config.n_embd
    block = {"ln_1.weight": d, "ln_1.bias": d, "attn.c_attn.weight": 3 * d * d, "attn.c_attn.bias": 3 * d,
             "attn.c_proj.weight": d * d, "attn.c_proj.bias": d, "ln_2.weight": d, "ln_2.bias": d,
             "mlp.c_fc.weight": 4 * d * d, "mlp.c_fc.bias": 4 * d, "mlp.c_proj.weight": 4 * d * d, "mlp.c_proj.bias": d}
    sizes = {"wte.weight": V * d, "wpe.weight": T * d, **{f"h.{i}.{n}": s for i in range(L) for n, s in block.items()},
             "ln_f.weight": d, "ln_f.bias": d}
    scored = [s for n, s in sizes.items() if n not in exclude]
    return sum(int(fraction * s) for s in scored) if per_tensor else int(fraction * sum(scored))
