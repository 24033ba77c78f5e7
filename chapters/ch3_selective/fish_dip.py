"""FISH-DIP: sample-aware dynamic sparse fine-tuning.

Paper: Das, Zhang, Shi, Yin, Zhang, "Unified Low-Resource Sequence Labeling by Sample-Aware Dynamic
Sparse Finetuning", EMNLP 2023, arXiv 2311.03748.

Idea: a FISH mask (train the k entries of highest Fisher information) that follows the hard examples.
The Fisher is measured only on the training samples the model currently fits worst, and the mask is
recomputed every R steps, so the trainable subset moves as those samples change.

    every R steps (`period`), at the current theta:
      l_j = mean token cross-entropy of training sample j                      j = 1..N
      S   = the n samples of highest l_j,   n = clamp(floor(0.1 * N_batches), 3, 25)
      F_i = sum_{j in S} (d l_j / d theta_i)^2                                  per-example squares
      M   = top-k of F over all eligible entries (global),  k = floor(rho * Phi)
    between refreshes:  grad <- grad * M  before the optimiser step

What trains: k entries at a time, anywhere in the model except the tied wte (our head, frozen; the
paper's k also subtracts its dense head). Over a run many more entries can change, since M moves.

Implementation: `FishDip` holds the current mask and is the Hooks of the shared loop: after_backward masks
the gradients, step_end recomputes the mask after every R-th optimiser step (the first mask is computed
before training, "step 0"); `apply_fish_dip` returns it, so its masks and history stay in reach. The
Fisher uses `minimal.sparse.empirical_fisher` on the chosen samples
(its mean over S has the same top-k as the sum). Choices: the optimiser state persists across
refreshes, as in the released code, so momentum would still move entries that just left the mask;
with strict=True (our default) every entry outside the current mask is copied back after each step to
its value at the last refresh, so it is truly fixed until the mask picks it again. strict=False is the
released behaviour (gradient masking only). The sample pool is a fixed set of N training examples
(a Task's train split is sampled once: n_samples), N_batches = ceil(N / 8) (the paper's batch size 8).
Departure from the released code: a sample's loss is its mean cross-entropy over its answer tokens; the
release divides the summed loss by the padded length, which ranks long answers as harder (on our tasks
the two picked 0 of 3 hardest samples in common). We keep the mean: padding is not part of a sample.
Stacked on another method, FISH-DIP leaves that method's parameters out of the mask: they train densely.
`count_fish_dip(config, fraction)` is k by formula; masks live on the device of their parameters.

Copy: minimal/hooks.py, minimal/peft.py, minimal/sparse.py, chapters/ch3_selective/fish_dip.py
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimal.hooks import Hooks
from minimal.peft import freeze_base, trained_before
from minimal.sparse import Masks, budget, empirical_fisher, mask_overlap, sample_rows, topk_mask

if TYPE_CHECKING:
    from minimal.gpt import GPT, GPTConfig


@torch.no_grad()
def sample_losses(model: nn.Module, idx: torch.Tensor, labels: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Each example's mean cross-entropy over its target tokens: [N] (dropout off)."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for x, y in zip(idx.split(chunk), labels.split(chunk), strict=True):
            logits = model(x).logits[:, :-1]  # [b, T-1, V]: position t predicts token t+1
            target = y[:, 1:]  # [b, T-1]
            ce = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")  # [b, T-1]
            count = (target != -100).sum(1)
            if bool((count == 0).any()):
                raise ValueError("an example has no target token (all labels -100)")
            out.append(ce.sum(1) / count)
    finally:
        model.train(was_training)
    return torch.cat(out)


def default_n_hard(n_samples: int, batch_size: int = 8) -> int:
    """The released rule n = clamp(floor(0.1 * N_batches), 3, 25), never more than the pool holds."""
    return min(n_samples, max(3, min(25, math.floor(0.1 * math.ceil(n_samples / batch_size)))))


def dip_mask(model: nn.Module, idx: torch.Tensor, labels: torch.Tensor, k: int, names: list[str],
             n_hard: int) -> tuple[Masks, torch.Tensor]:
    """(top-k Fisher mask over the n_hard highest-loss samples, the indices of those samples)."""
    if not 0 < n_hard <= idx.shape[0]:
        raise ValueError(f"n_hard must be in [1, {idx.shape[0]}] (the pool size), got {n_hard}")
    hard = torch.topk(sample_losses(model, idx, labels), n_hard).indices  # [n_hard]
    fisher = empirical_fisher(model, idx[hard], labels[hard], names=names, method="vmap")
    return topk_mask(fisher, k), hard


class FishDip(Hooks):
    """The dynamic mask as the loop's hooks: masked gradients, refreshed every `period` steps from the hardest samples.

    Constructing it computes the first mask and changes nothing in the model; n_trainable = k.
    """

    def __init__(self, model: nn.Module, idx: torch.Tensor, labels: torch.Tensor, fraction: float = 0.01,
                 period: int = 100, n_hard: int | None = None, exclude: tuple[str, ...] = ("wte.weight",),
                 strict: bool = True) -> None:
        super().__init__()
        if isinstance(period, bool) or not isinstance(period, int) or period <= 0:
            raise ValueError(f"period (steps between mask refreshes) must be a positive int, got {period!r}")
        params = dict(model.named_parameters())
        unknown = [e for e in exclude if e not in params]
        if unknown:
            raise ValueError(f"exclude names unknown parameters {unknown}; parameters are e.g. {list(params)[:5]}")
        earlier = trained_before(model)
        self.names = [n for n in params if n not in exclude and n not in earlier]
        self.k = budget(fraction, sum(p.numel() for p in params.values()))
        n_eligible = sum(params[n].numel() for n in self.names)
        if self.k > n_eligible:
            raise ValueError(f"fraction {fraction} asks for {self.k} entries but only {n_eligible} are eligible")
        self.idx, self.labels = idx, labels  # the sample pool [N, T]
        self.n_hard = default_n_hard(idx.shape[0]) if n_hard is None else n_hard
        self.period, self.strict = period, strict
        self.n_trainable = self.k + sum(params[n].numel() for n in earlier)
        self.masks: Masks = {}
        self.held: dict[str, torch.Tensor] = {}  # values at the last refresh (strict mode)
        self.refreshes: list[int] = []  # optimiser steps completed at each refresh (0 = before training)
        self.overlaps: list[float] = []  # Jaccard overlap of each new mask with the one it replaced
        self.hard: torch.Tensor | None = None  # the samples behind the current mask
        self.refresh(model, 0)

    @torch.no_grad()
    def refresh(self, model: nn.Module, step: int) -> None:
        masks, self.hard = dip_mask(model, self.idx, self.labels, self.k, self.names, self.n_hard)
        if self.masks:
            self.overlaps.append(mask_overlap(self.masks, masks))
        self.masks = masks
        self.refreshes.append(step)
        if self.strict:
            params = dict(model.named_parameters())
            self.held = {n: params[n].detach().clone() for n in self.names}

    @torch.no_grad()
    def after_backward(self, model: nn.Module, step: int) -> None:
        params = dict(model.named_parameters())
        for n, m in self.masks.items():
            if params[n].grad is not None:
                params[n].grad.mul_(m)

    @torch.no_grad()
    def step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        if self.strict:
            params = dict(model.named_parameters())
            for n, m in self.masks.items():
                params[n].copy_(torch.where(m, params[n], self.held[n]))
        if (step + 1) % self.period == 0:
            self.refresh(model, step + 1)


sample_pool = sample_rows  # the pool FISH-DIP re-scores at each refresh (minimal/sparse.py)


def apply_fish_dip(model: GPT, data: Any, fraction: float = 0.01, period: int = 100, n_samples: int = 256,
                   n_hard: int | None = None, exclude: tuple[str, ...] = ("wte.weight",), strict: bool = True,
                   seed: int = 0) -> FishDip:
    """Pool `n_samples` training examples, compute the first mask, train everything but `exclude` under it.

    data: a minimal.data.Task or an (idx, labels) pair. Everything is checked, and the first mask computed,
    before the model changes.
    """
    device = next(model.parameters()).device
    idx, labels = (t.to(device) for t in sample_pool(data, n_samples, model.config.block_size, seed))
    dip = FishDip(model, idx, labels, fraction, period, n_hard, exclude, strict)
    freeze_base(model)
    params = dict(model.named_parameters())
    for n in dip.names:
        params[n].requires_grad_(True)
    return dip


def count_fish_dip(config: GPTConfig, fraction: float = 0.01) -> int:
    """k = floor(fraction * Phi), Phi = V d + T d + L (12 d^2 + 13 d) + 2 d: the entries trained at any one time."""
    V, T, L, d = config.vocab_size, config.block_size, config.n_layer, config.n_embd
    return int(fraction * (V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d))
