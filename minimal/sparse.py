"""Element-wise masked updates: the shared machinery of the sparse and selective methods.

A sparse method trains a chosen subset of the *entries* of the pretrained tensors (FISH mask, the BitFit
query-bias subset, Child-Tuning, LT-SFT, PaFi, ...). A mask is a bool tensor shaped like its parameter
(`Masks`: parameter name -> mask). There are two legal ways to train only the masked entries, and this
module builds both:

1. Delta parametrisation (`add_sparse_deltas`): theta = theta0 + M * Delta. theta0 becomes a frozen parameter, and
   Delta is stored only on the support of M (a vector of nnz(M) trainable values), so the trainable count
   is exactly the number of selected entries and an unselected entry has *no trainable value at all*: no
   gradient, no Adam moment, no weight decay can reach it. It is a `torch.nn.utils.parametrize`
   parametrisation, so `module.weight` still reads as a full tensor and `merge_sparse_deltas` folds it
   back into a plain parameter. The value vector is 1-D, so the shared loop never weight-decays it
   (released code that masks gradients decays the selected entries of a matrix).
2. Gradient masking (`GradMask`, what most released code does): after backward, grad <- grad * M (times
   an optional scale), then the optimiser steps. Pitfall: AdamW's decoupled weight decay, and momentum
   from a step when an entry *was* selected, still move unselected entries. With `restore=True` every
   unselected entry is copied back from theta0 after each optimiser step, which makes them bitwise fixed.

Data-driven masks score every entry, then keep the global top k (`topk_mask`). The empirical Fisher
score is the mean of *per-example* squared gradients, F_i = (1/N) sum_j (d loss_j / d theta_i)^2, computed
by a batch-size-1 loop or, faster, by `torch.func.vmap` over `torch.func.grad` (`empirical_fisher`).
Squaring the gradient of the batch-mean loss is a different quantity (`squared_batch_gradient`): the
cross terms between examples do not cancel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils import parametrize

from minimal.hooks import Hooks

Masks = dict[str, torch.Tensor]  # parameter name -> bool mask of the parameter's shape


# ------------------------------------------------------------------------------------------ masks


def topk_mask(scores: dict[str, torch.Tensor], k: int) -> Masks:
    """Global top-k over every entry of every score tensor: bool masks with exactly k True entries.

    Ties at the threshold are broken by torch.topk (an arbitrary but fixed choice), so the count is exact.
    """
    if not scores:
        raise ValueError("topk_mask: no score tensors given")
    total = sum(s.numel() for s in scores.values())
    if not isinstance(k, int) or not 0 < k <= total:
        raise ValueError(f"topk_mask: k must be an int in [1, {total}] (the number of scored entries), got {k!r}")
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores.values()])  # [total]
    chosen = torch.zeros(total, dtype=torch.bool, device=flat.device)
    chosen[torch.topk(flat, k).indices] = True
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = chosen[start:start + s.numel()].view(s.shape)
        start += s.numel()
    return masks


def budget(fraction: float, total: int) -> int:
    """k = floor(fraction * total): the number of entries a sparse budget of `fraction` allows."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = int(fraction * total)
    if k < 1:
        raise ValueError(f"fraction {fraction} of {total} parameters selects no entry; raise the fraction")
    return k


def mask_count(masks: Masks) -> int:
    return int(sum(int(m.sum()) for m in masks.values()))


def mask_overlap(a: Masks, b: Masks) -> float:
    """Jaccard overlap |a & b| / |a | b| of two masks over the same parameters."""
    if set(a) != set(b):
        raise ValueError(f"masks cover different parameters: {sorted(set(a) ^ set(b))}")
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    return inter / max(union, 1)


def check_masks(model: nn.Module, masks: Masks) -> dict[str, nn.Parameter]:
    """The parameters the masks refer to; ValueError/TypeError naming any unknown name or bad mask."""
    params = dict(model.named_parameters())
    unknown = sorted(n for n in masks if n not in params)
    if unknown:
        raise ValueError(f"masks name unknown parameters {unknown[:5]}; parameters are e.g. {list(params)[:5]}")
    for n, m in masks.items():
        if m.dtype != torch.bool:
            raise TypeError(f"mask for {n} must be a bool tensor, got {m.dtype}")
        if m.shape != params[n].shape:
            raise ValueError(f"mask for {n} has shape {tuple(m.shape)}, the parameter {tuple(params[n].shape)}")
    return {n: params[n] for n in masks}


# ------------------------------------------------------------------------------ 1. delta parametrisation


class SparseDelta(nn.Module):
    """theta = theta0 + M * Delta, with Delta stored only where M is True (a parametrisation).

    theta0 is kept as a frozen parameter (so parameter totals still count the base model, as they do for
    LoRA), index is a buffer (flat positions of the selected entries), and the parametrised tensor's
    stored parameter ("original") is the value vector [nnz(M)].
    """

    def __init__(self, theta0: torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__()
        self.theta0 = nn.Parameter(theta0.detach().clone(), requires_grad=False)
        self.register_buffer("index", mask.reshape(-1).nonzero().squeeze(1))  # [nnz]

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        flat = self.theta0.reshape(-1).index_add(0, self.index, values)  # [numel]: theta0 + scatter(values)
        return flat.view_as(self.theta0)

    def right_inverse(self, theta: torch.Tensor) -> torch.Tensor:
        """The values that reproduce `theta` on the selected entries (zeros when theta == theta0)."""
        return (theta.reshape(-1)[self.index] - self.theta0.reshape(-1)[self.index]).detach()  # [nnz]

    def mask(self) -> torch.Tensor:
        m = torch.zeros(self.theta0.numel(), dtype=torch.bool, device=self.theta0.device)
        m[self.index] = True
        return m.view_as(self.theta0)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def add_sparse_deltas(model: nn.Module, masks: Masks) -> list[str]:
    """Re-parametrise each masked parameter as theta0 + M * Delta; return the names that got a delta.

    Call it on a frozen model: only the value vectors (one per tensor with a non-empty mask) require
    grad, so count_trainable(model).trainable == mask_count(masks), and the total is the base model's
    plus those values (theta0 stays a frozen parameter). Tensors whose mask is all False are left as
    they are.
    """
    done = sorted(n for n in masks if n in {name for name, _, _ in sparse_deltas(model)})
    if done:
        raise ValueError(f"{done[:5]} already have a sparse delta; merge_sparse_deltas(model) first")
    check_masks(model, masks)
    names = [n for n, m in masks.items() if bool(m.any())]
    for name in names:
        module, attr = _owner(model, name)
        theta0 = getattr(module, attr)
        theta0.grad = None  # parametrize keeps this Parameter object (set_ to the value vector)
        parametrize.register_parametrization(module, attr, SparseDelta(theta0, masks[name].to(theta0.device)))
        getattr(module.parametrizations, attr).original.requires_grad_(True)
    return names


def sparse_deltas(model: nn.Module) -> Iterator[tuple[str, SparseDelta, nn.Parameter]]:
    """(parameter name, its SparseDelta, its value vector) for every sparse delta in the model."""
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, SparseDelta):
                    yield (f"{module_name}.{attr}" if module_name else attr), p, plist.original


def delta_masks(model: nn.Module) -> Masks:
    """The masks of the sparse deltas in the model (what `add_sparse_deltas` was given, non-empty ones)."""
    return {name: sd.mask() for name, sd, _ in sparse_deltas(model)}


def merge_sparse_deltas(model: nn.Module) -> int:
    """Fold every sparse delta into a plain parameter (theta0 + M * Delta); return how many were merged."""
    owners = [_owner(model, name) for name, _, _ in sparse_deltas(model)]
    for module, attr in owners:
        parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    return len(owners)


# ------------------------------------------------------------------------------ 2. gradient masking


class GradMask(Hooks):
    """Gradient masking for the shared loop: grad <- scale * M * grad after backward (a `Hooks`).

    With restore=True, every unselected entry is copied back from its value at construction (theta0)
    after each optimiser step, so it stays bitwise unchanged whatever the optimiser does (weight decay,
    stale momentum). Without it, only the gradient is masked, as in the released code of most papers.
    n_trainable: the selected entries plus every entry of the trainable tensors that are not masked.
    """

    def __init__(self, model: nn.Module, masks: Masks, restore: bool = True, scale: float = 1.0) -> None:
        super().__init__()
        params = check_masks(model, masks)
        frozen = sorted(n for n, p in params.items() if not p.requires_grad)
        if frozen:
            raise ValueError(f"GradMask: masked parameters {frozen[:5]} do not require grad; unfreeze them first")
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.masks = {n: m.to(params[n].device) for n, m in masks.items()}
        self.scale = scale
        self.restore = restore
        self.theta0 = {n: p.detach().clone() for n, p in params.items()} if restore else {}
        dense = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n not in masks)
        self.n_trainable = dense + mask_count(masks)

    def after_backward(self, model: nn.Module, step: int) -> None:
        params = dict(model.named_parameters())
        for n, m in self.masks.items():
            g = params[n].grad
            if g is not None:
                g.mul_(m.to(g.dtype) * self.scale)

    @torch.no_grad()
    def step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        if not self.restore:
            return
        params = dict(model.named_parameters())
        for n, m in self.masks.items():
            params[n].copy_(torch.where(m, params[n], self.theta0[n]))

    def hooks(self) -> GradMask:
        """The mask itself: it is the Hooks the training loop takes."""
        return self


# ------------------------------------------------------------------------------ 3. per-example squared gradients


@contextlib.contextmanager
def _scoring_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and the manual attention path (vmap has no batching rule for the fused one)."""
    was_training = model.training
    fast = {m: m.fast for m in model.modules() if isinstance(getattr(m, "fast", None), bool)}
    model.eval()
    for m in fast:
        m.fast = False
    try:
        yield
    finally:
        model.train(was_training)
        for m, f in fast.items():
            m.fast = f


def _score_params(model: nn.Module, names: list[str] | None) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    names = list(params) if names is None else list(names)
    unknown = [n for n in names if n not in params]
    if unknown or not names:
        raise ValueError(f"cannot score parameters {unknown or names}; known: {list(params)[:8]} ...")
    return {n: params[n].detach() for n in names}


def _check_batch(idx: torch.Tensor, labels: torch.Tensor) -> None:
    if idx.dim() != 2 or idx.shape != labels.shape:
        raise ValueError(f"idx and labels must both be [N, T], got {tuple(idx.shape)} and {tuple(labels.shape)}")
    empty = (labels[:, 1:] == -100).all(dim=1)
    if bool(empty.any()):
        raise ValueError(f"examples {empty.nonzero().squeeze(1).tolist()[:5]} have no target token (all -100)")


def sum_batch_gradients(
    model: nn.Module,
    batches: Iterable,
    names: list[str] | None = None,
    loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """(sum over batches of transform(d loss_b / d theta), number of batches), at the current weights.

    One backward per *batch* (not per example, unlike `empirical_fisher`). The model is not changed: no
    parameter moves, no .grad is left behind, requires_grad flags and train/eval mode are restored; dropout
    is off meanwhile. loss_fn(model, batch) defaults to the model's own loss on batch = (idx, labels).
    A parameter the loss does not reach contributes zeros. Used by SAM (signed sum) and Child-Tuning_D
    (sum of clipped squares).
    """
    params = dict(model.named_parameters())
    names = list(params) if names is None else list(names)
    unknown = [n for n in names if n not in params]
    if unknown or not names:
        raise ValueError(f"cannot take gradients of {unknown or names}; parameters are e.g. {list(params)[:5]}")
    tensors = [params[n] for n in names]
    flags = [p.requires_grad for p in tensors]
    was_training = model.training
    model.eval()
    total = {n: torch.zeros_like(params[n]) for n in names}
    count = 0
    try:
        for p in tensors:
            p.requires_grad_(True)
        for batch in batches:
            loss = model(batch[0], labels=batch[1]).loss if loss_fn is None else loss_fn(model, batch)
            for n, g in zip(names, torch.autograd.grad(loss, tensors, allow_unused=True), strict=True):
                if g is not None:
                    total[n] += g if transform is None else transform(g)
            count += 1
    finally:
        for p, f in zip(tensors, flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    return total, count


def empirical_fisher(
    model: nn.Module,
    idx: torch.Tensor,
    labels: torch.Tensor,
    names: list[str] | None = None,
    method: str = "vmap",
    chunk_size: int = 32,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: F = (1/N) sum_j g_j^2, g_j = d loss(example j) / d theta (true labels).

    idx, labels [N, T]; loss(example j) is the model's mean cross-entropy over that example's target tokens.
    method "loop" runs one backward per example; "vmap" vectorises torch.func.grad over chunks of examples.
    names: which parameters to score (default: all). The model itself is not modified.
    """
    _check_batch(idx, labels)
    params = _score_params(model, names)
    N = idx.shape[0]
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    with _scoring_mode(model):
        if method == "loop":
            for j in range(N):
                live = {n: p.clone().requires_grad_(True) for n, p in params.items()}
                loss = functional_call(model, live, (idx[j:j + 1],), {"labels": labels[j:j + 1]}).loss
                for n, g in zip(live, torch.autograd.grad(loss, list(live.values())), strict=True):
                    fisher[n] += g.square()
        elif method == "vmap":

            def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return functional_call(model, p, (x[None],), {"labels": y[None]}).loss  # x, y [T]

            per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))
            for start in range(0, N, chunk_size):
                grads = per_example(params, idx[start:start + chunk_size], labels[start:start + chunk_size])
                for n, g in grads.items():  # g [chunk, *shape]
                    fisher[n] += g.square().sum(0)
        else:
            raise ValueError(f"method must be 'loop' or 'vmap', got {method!r}")
    return {n: f / N for n, f in fisher.items()}


def squared_batch_gradient(
    model: nn.Module, idx: torch.Tensor, labels: torch.Tensor, names: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """(d mean-batch-loss / d theta)^2: NOT the empirical Fisher (kept to show the difference)."""
    _check_batch(idx, labels)
    params = _score_params(model, names)
    with _scoring_mode(model):
        live = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        loss = functional_call(model, live, (idx,), {"labels": labels}).loss
        grads = torch.autograd.grad(loss, list(live.values()))
    return {n: g.square() for n, g in zip(live, grads, strict=True)}


def sample_rows(data: Any, n_samples: int, block_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, labels) [N, T]: the examples a data-driven mask is scored on (FISH, FISH-DIP): n_samples drawn once
    (seeded) from a minimal.data.Task's train split, or the first n_samples rows of a given (idx, labels) pair."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples <= 0:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if hasattr(data, "splits"):  # a Task: minimal.data (tokenizer included) is loaded already, since it made it
        from minimal.data import sample_examples

        return sample_examples(data, n_samples, block_size, seed)
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0][:n_samples], data[1][:n_samples]
    raise TypeError(f"data must be a minimal.data.Task or an (idx, labels) tuple of tensors, got {type(data).__name__}")
