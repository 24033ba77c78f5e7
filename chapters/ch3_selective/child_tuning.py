"""Child-Tuning: update only a "child network" of the model at every step.

Paper: Xu, Luo, Huang, Wang, Zhang, Huang, Huang, "Raise a Child in Large Language Model: Towards
Effective and Generalizable Fine-tuning", EMNLP 2021, arXiv 2109.05687.

Idea: during ordinary fine-tuning, mask the gradient so that only a subset of the parameters moves. The
subset is either random and redrawn every step (task-free, Child-Tuning_F) or chosen once from Fisher
information on the task (task-driven, Child-Tuning_D). It regularises fine-tuning; it does not save
storage (every weight may change, the whole model is saved).

    w_{t+1} = w_t - lr * AdamW(g_t * M_t)                       the mask acts before Adam's moments
    F:  M_t ~ Bernoulli(f) per entry, redrawn every step;  g_t * M_t / f  (unbiased: E[M_t / f] = 1)
    D:  F_i = (1/B) sum_b (clip(g_b))_i^2  over the B training batches, at the pretrained weights;
        M = 1[F_i among the top f fraction of in-block entries], fixed for the whole run

(f is `fraction`, the paper's p_F and p_D.)

What trains: everything, as in full fine-tuning (the chapter 1 baseline "full"). F masks every
parameter; D masks the parameters inside the transformer blocks (h.*) and leaves the embeddings and
ln_f dense, as the released code masks only names inside the encoder layers. Counts: F updates every
entry over a run (its mask moves every step), so `count_child_tuning_f` is the whole model; D updates
floor(f * n_block) in-block entries plus the dense ones, its `n_trainable` and `count_child_tuning_d`.

Implementation: gradient masking (`minimal.sparse.GradMask` for D, `BernoulliGradMask` for F), as in the
released optimiser, without restoring masked entries. Consequences, stated rather than hidden: with weight
decay > 0 the decoupled decay still shrinks unselected entries, so only with weight decay 0 (the default
of our TrainConfig) do D's unselected entries stay bitwise unchanged; F's masks change every step, so
Adam's momentum from earlier steps still moves entries that are masked now (as in the paper's optimiser).

Choices where paper and code differ: D's threshold is the (1 - f) quantile of the scores in the code;
we keep exactly k = floor(f * n) entries with `topk_mask` (the same set when scores have no ties). D's
Fisher squares per-batch gradients (not per-example ones), each tensor's gradient clipped to norm 1
first, as in the released code. The tied head is wte, so it trains densely like the other embeddings.
Departures from the released code: the shared loop's after_backward hook runs before clipping, so we mask
(and rescale) the gradient and then clip the masked one, where the release clips the full gradient and
masks inside its optimizer; and D's Fisher batches are taken in the order given, unshuffled, so the
scores are reproducible without a data-loader seed. Stacked on another method, D leaves that method's
parameters unmasked. The Bernoulli masks are drawn on the device of each gradient, in its dtype.

Copy: minimal/hooks.py, minimal/peft.py, minimal/sparse.py, chapters/ch3_selective/child_tuning.py
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from minimal.hooks import Hooks
from minimal.peft import freeze_base, trained_before
from minimal.sparse import GradMask, Masks, budget, sum_batch_gradients, topk_mask

if TYPE_CHECKING:
    from minimal.gpt import GPT, GPTConfig

Batch = tuple[torch.Tensor, torch.Tensor]  # idx [B, T], labels [B, T]


def _train_everything(model: GPT) -> None:
    freeze_base(model)  # bookkeeping for stacking; then, as in full fine-tuning, every parameter trains
    for p in model.parameters():
        p.requires_grad_(True)


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction (of the entries in the child network) must be in (0, 1], got {fraction!r}")


# ------------------------------------------------------------------------------------------ Child-Tuning_F


class BernoulliGradMask(Hooks):
    """after_backward: grad <- grad * M / f with M ~ Bernoulli(f) per entry, redrawn at every call."""

    def __init__(self, fraction: float, seed: int = 0) -> None:
        super().__init__()
        _check_fraction(fraction)
        self.fraction, self.seed = fraction, seed
        self.generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]

    @torch.no_grad()
    def after_backward(self, model: nn.Module, step: int) -> None:
        for p in model.parameters():
            if p.grad is None:
                continue
            keep = torch.rand(p.shape, device=p.device, generator=self._generator(p.device)) < self.fraction  # M_t
            p.grad.mul_(keep.to(p.grad.dtype) / self.fraction)


def apply_child_tuning_f(model: GPT, fraction: float = 0.3, seed: int = 0) -> BernoulliGradMask:
    """Child-Tuning_F: full fine-tuning with a fresh Bernoulli(fraction) gradient mask each step, times 1/fraction."""
    hooks = BernoulliGradMask(fraction, seed)  # checks the fraction before the model changes
    _train_everything(model)
    return hooks


def count_child_tuning_f(config: GPTConfig) -> int:
    """Every parameter: V d + T d + L (12 d^2 + 13 d) + 2 d (the mask moves every step, so all entries train)."""
    V, T, L, d = config.vocab_size, config.block_size, config.n_layer, config.n_embd
    return V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d


# ------------------------------------------------------------------------------------------ Child-Tuning_D


def in_block_names(model: GPT) -> list[str]:
    """The parameters inside the transformer blocks: the ones Child-Tuning_D masks."""
    return [n for n, _ in model.named_parameters() if n.startswith("h.")]


def child_fisher(model: GPT, batches: Iterable[Batch], names: list[str] | None = None,
                 max_grad_norm: float = 1.0) -> dict[str, torch.Tensor]:
    """F = (1/B) sum over batches of (per-tensor clipped batch gradient)^2, at the current weights.

    The model is not changed (gradients are taken with torch.autograd.grad; dropout is off).
    """
    names = in_block_names(model) if names is None else names
    if max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")

    def clipped_square(g: torch.Tensor) -> torch.Tensor:
        return (g * (max_grad_norm / g.norm().clamp(min=max_grad_norm))).square()  # clip the tensor's norm

    fisher, count = sum_batch_gradients(model, batches, names, transform=clipped_square)
    if count == 0:
        raise ValueError("child_fisher: no batches given")
    return {n: f / count for n, f in fisher.items()}


def child_mask(fisher: dict[str, torch.Tensor], fraction: float) -> Masks:
    """The child network: the top floor(fraction * n) entries of the Fisher scores (n = all scored entries)."""
    _check_fraction(fraction)
    return topk_mask(fisher, budget(fraction, sum(f.numel() for f in fisher.values())))


def task_batches(data: Any, block_size: int, batch_size: int = 16, max_batches: int | None = None) -> list[Batch]:
    """A list of (idx, labels) batches: `data` as given, or one pass over a minimal.data.Task's train split."""
    if hasattr(data, "splits"):  # a Task: minimal.data (tokenizer included) is loaded already, since it made it
        from minimal.data import collate

        train = data.train
        batches = [collate(train[i:i + batch_size], block_size) for i in range(0, len(train), batch_size)]
    else:
        batches = list(data)
    batches = batches[:max_batches]
    if not batches:
        raise ValueError("no batches to compute the Fisher information from")
    return batches


def apply_child_tuning_d(model: GPT, data: Any, fraction: float = 0.3, batch_size: int = 16,
                         max_batches: int | None = None) -> GradMask:
    """Child-Tuning_D: Fisher-chosen child network among the in-block parameters, fixed for the run.

    data: the training set, as a minimal.data.Task (one pass over its train split, at most `max_batches`
    batches of `batch_size`) or a list of (idx, labels) batches. The mask is chosen before the model changes.
    """
    _check_fraction(fraction)
    device = next(model.parameters()).device
    batches = [(i.to(device), y.to(device)) for i, y in task_batches(data, model.config.block_size, batch_size,
                                                                       max_batches)]
    earlier = trained_before(model)
    names = [n for n in in_block_names(model) if n not in earlier]
    mask = child_mask(child_fisher(model, batches, names), fraction)
    _train_everything(model)
    return GradMask(model, mask, restore=False)


def count_child_tuning_d(config: GPTConfig, fraction: float = 0.3) -> int:
    """floor(fraction * L (12 d^2 + 13 d)) in-block entries + the dense wte, wpe and ln_f: V d + T d + 2 d."""
    V, T, L, d = config.vocab_size, config.block_size, config.n_layer, config.n_embd
    return int(fraction * (L * (12 * d * d + 13 * d))) + V * d + T * d + 2 * d
