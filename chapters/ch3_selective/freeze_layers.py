"""Freezing layers: fine-tune only the top k transformer blocks.

Paper: Lee, Tang, Lin, "What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning",
arXiv 1911.03090 (2019).

Idea: the lower layers of a pretrained transformer hold general features; fine-tuning only the top k
blocks (plus the output parts) recovers most of full fine-tuning's quality at a fraction of the cost.

    x_{l+1} = Block_l(x_l),  theta_l frozen for l < L - k,  trained for l >= L - k

What trains: h[L-k .. L-1] (12d^2 + 13d each) and, by default, ln_f (2d):
k * (12 d^2 + 13 d) + 2d entries. k ranges over 0..L (k = 0 with ln_f trains ln_f only).

Why it also saves activation memory (the only method of chapter 3 that does): nothing below block L-k
requires grad (wte and wpe are frozen, the input is integer ids), so autograd records no graph there and
stores none of those blocks' activations; the backward pass stops at block L-k on its own, exactly as if
the lower blocks ran under torch.no_grad(). `saved_activation_bytes` measures it.

Choices: the tied LM head is wte, so it stays frozen with the embeddings (the paper trains a new
classifier head); `train_ln_f=False` freezes ln_f too. The chapter 1 baseline "last-block" is k = 1.
Stacked on another method, the earlier method's parameters keep training. `count_freeze_layers(config, k)`
is the trainable count by formula.

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch3_selective/freeze_layers.py
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from minimal.hooks import Hooks
from minimal.peft import freeze_base, unfreeze

if TYPE_CHECKING:
    from minimal.gpt import GPT, GPTConfig


def apply_freeze_layers(model: GPT, k: int = 2, train_ln_f: bool = True) -> Hooks:
    """Freeze everything except the top `k` blocks (and ln_f unless train_ln_f=False)."""
    L = len(model.h)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= L:
        raise ValueError(f"k (blocks to train) must be an int in [0, {L}] for this {L}-block model, got {k!r}")
    if k == 0 and not train_ln_f:
        raise ValueError("k=0 with train_ln_f=False leaves nothing to train")
    freeze_base(model)
    top = tuple(f"h.{i}." for i in range(L - k, L))
    unfreeze(model, lambda n: n.startswith(top) or (train_ln_f and n.startswith("ln_f.")))
    return Hooks()


def count_freeze_layers(config: GPTConfig, k: int = 2, train_ln_f: bool = True) -> int:
    """k * (12 d^2 + 13 d) + 2d (ln_f): the trainable count by formula."""
    d = config.n_embd
    return k * (12 * d * d + 13 * d) + (2 * d if train_ln_f else 0)


def saved_activation_bytes(model: GPT, idx: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes autograd saves for the backward pass of one training forward (activation memory)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, labels=labels)
    return total
