"""FISH mask: train a fixed sparse set of entries chosen by Fisher information.

Paper: Sung, Nair, Raffel, "Training Neural Networks with Fixed Sparse Masks", NeurIPS 2021,
arXiv 2111.09839. (The survey lists it with the additive methods; the mechanism is selective: it adds
nothing and trains existing entries.)

Idea: before training, score every parameter entry by its diagonal empirical Fisher information on the
task; keep the k highest-scoring entries and update only those for the whole run.

    F_i = (1/N) sum_{j=1..N} (d/d theta_i  log p_theta(y_j | x_j))^2     at theta0, true labels, one example
                                                                         at a time (per-example squares)
    M   = top-k(F) over all eligible entries (global),  k = floor(rho * Phi)
    theta = theta0 + M * Delta,  only Delta trains

What trains: exactly k entries, spread over whichever tensors hold the top scores. log p(y_j | x_j) is
the model's mean log-likelihood over the answer tokens of example j (our tasks are next-token tasks).

Implementation: by default the delta parametrisation of `minimal.sparse` (Delta stored only on the
mask's support), so the trainable count is exactly k and unselected entries are not parameters: they
stay bitwise theta0 whatever the optimiser does. `implementation="grad_mask"` reproduces the released
code's gradient masking instead (grad * M before AdamW), with the unselected entries restored from
theta0 after every step so that the same guarantee holds; count_trainable then reports the dense size
of the tensors that hold selected entries.

Choices: the paper adds a dense classifier head, counted in the budget (k = floor(rho Phi) - |head|). Our
head is the tied wte, which stays frozen (excluded from scoring) and tasks use verbaliser tokens, so
k = floor(rho * Phi) with Phi the whole model. Squared gradients ("label-square", the script default
for the paper's tables), N = 256 samples by default (the paper uses 1024 and reports robustness down to
a few hundred). `score="random"` draws the same number of entries uniformly: the paper's baseline.
Departure from the released code: the selected entries train as the value vector of a sparse delta
(`minimal.sparse`), which is 1-D and so never weight-decayed (the loop decays matrices only); with
the leaderboard's weight decay 0 the two agree.
Stacked on another method, FISH leaves that method's parameters out of the mask: they keep training densely.
The deltas take the dtype and device of the parameters they sit on. `count_fish_mask(config, fraction)` is
k as a formula of the GPTConfig.

Copy: minimal/hooks.py, minimal/peft.py, minimal/sparse.py, chapters/ch2_additive/fish_mask.py
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from minimal.hooks import Hooks
from minimal.peft import freeze_base, trained_before
from minimal.sparse import (
    GradMask,
    Masks,
    add_sparse_deltas,
    budget,
    empirical_fisher,
    sample_rows,
    sparse_deltas,
    topk_mask,
)

if TYPE_CHECKING:
    from minimal.gpt import GPT, GPTConfig

IMPLEMENTATIONS = ("delta", "grad_mask")
SCORES = ("fisher", "random")


fisher_samples = sample_rows  # the examples FISH's Fisher is computed on (minimal/sparse.py)


def eligible_names(model: GPT, exclude: tuple[str, ...]) -> list[str]:
    """Every parameter but `exclude` and those that a method applied before trains (see minimal.sparse)."""
    names = [n for n, _ in model.named_parameters()]
    unknown = [e for e in exclude if e not in names]
    if unknown:
        raise ValueError(f"exclude names unknown parameters {unknown}; parameters are e.g. {names[:5]}")
    earlier = trained_before(model)
    return [n for n in names if n not in exclude and n not in earlier]


def fish_mask(model: GPT, idx: torch.Tensor | None, labels: torch.Tensor | None, fraction: float = 0.005,
              exclude: tuple[str, ...] = ("wte.weight",), score: str = "fisher", seed: int = 0,
              chunk_size: int = 32) -> Masks:
    """The FISH mask: global top-k of the empirical Fisher (or k random entries), k = floor(fraction * Phi).

    Masks cover every eligible parameter (all but `exclude`); most are all False. idx, labels [N, T] are the
    Fisher samples (unused, may be None, for score="random").
    """
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of {SCORES}")
    names = eligible_names(model, exclude)
    params = dict(model.named_parameters())
    k = budget(fraction, sum(p.numel() for p in params.values()))
    n_eligible = sum(params[n].numel() for n in names)
    if k > n_eligible:
        raise ValueError(f"fraction {fraction} asks for {k} entries but only {n_eligible} are eligible "
                         f"(excluded: {list(exclude)}); lower the fraction or exclude less")
    if score == "fisher":
        if idx is None or labels is None:
            raise ValueError("the Fisher score needs samples: pass idx and labels")
        scores = empirical_fisher(model, idx, labels, names=names, method="vmap", chunk_size=chunk_size)
    else:
        gen = torch.Generator().manual_seed(seed)
        scores = {n: torch.rand(params[n].shape, generator=gen) for n in names}
    return topk_mask(scores, k)


def apply_fish_mask(model: GPT, data: Any, fraction: float = 0.005, n_samples: int = 256,
                    exclude: tuple[str, ...] = ("wte.weight",), implementation: str = "delta",
                    score: str = "fisher", seed: int = 0) -> Hooks:
    """Score on `data` (a minimal.data.Task's train split or an (idx, labels) batch), pick the mask, make only
    it train. score="random" needs no data (pass None): the random-mask baseline at the same budget.

    The mask is computed, and everything checked, before the model changes.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    if any(True for _ in sparse_deltas(model)):
        raise ValueError("the model already has sparse deltas; merge_sparse_deltas(model) before a new FISH mask")
    if score == "random":
        mask = fish_mask(model, None, None, fraction, exclude, score, seed)
    elif data is None:
        raise ValueError("the Fisher score needs data: pass a Task or an (idx, labels) batch")
    else:
        idx, labels = fisher_samples(data, n_samples, model.config.block_size, seed)
        device = next(model.parameters()).device
        mask = fish_mask(model, idx.to(device), labels.to(device), fraction, exclude, score, seed)
    freeze_base(model)
    if implementation == "delta":
        add_sparse_deltas(model, mask)
        return Hooks()
    mask = {n: m for n, m in mask.items() if bool(m.any())}
    params = dict(model.named_parameters())
    for n in mask:
        params[n].requires_grad_(True)
    return GradMask(model, mask, restore=True)  # n_trainable: the k entries (and a stacked method's tensors)


def count_fish_mask(config: GPTConfig, fraction: float = 0.005) -> int:
    """k = floor(fraction * Phi), Phi = V d + T d + L (12 d^2 + 13 d) + 2 d: every parameter of the GPT."""
    V, T, L, d = config.vocab_size, config.block_size, config.n_layer, config.n_embd
    block = 12 * d * d + (13 * d if config.bias else 2 * d)
    return int(fraction * (V * d + T * d + L * block + (2 * d if config.bias else d)))
