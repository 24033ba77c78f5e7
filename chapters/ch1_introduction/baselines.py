"""The reference lines every PEFT method is compared with (chapter 1).

- zero-shot: the pretrained base as it is; nothing trains (the loop is skipped).
- full fine-tuning: every parameter trains.
- last block: only the top transformer block and the final LayerNorm train (Lee et al. 2019 study
  this "freeze the bottom" family in chapter 3; here it is the cheapest dense baseline).

Each `apply_*` takes a GPT, sets what trains (nothing else changes), and returns the loop hooks (none are
needed here). `count_*` is the same trainable count as a formula of the GPTConfig, with a GPT-2 block of
12 d^2 + 13 d parameters (12 d^2 + 2 d without biases):

    zero-shot: 0      full: V d + T d + L (12 d^2 + 13 d) + 2 d      last block: 12 d^2 + 13 d + 2 d

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch1_introduction/baselines.py
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from minimal.hooks import Hooks
from minimal.peft import freeze_base, unfreeze

if TYPE_CHECKING:
    from minimal.gpt import GPT, GPTConfig


def apply_zero_shot(model: GPT) -> Hooks:
    freeze_base(model)
    return Hooks()


def apply_full(model: GPT) -> Hooks:
    freeze_base(model)  # counts this method, so a method stacked on top keeps every parameter trainable
    for p in model.parameters():
        p.requires_grad_(True)
    return Hooks()


def apply_last_block(model: GPT) -> Hooks:
    if not hasattr(model, "h"):
        raise TypeError(f"last-block needs a GPT (blocks model.h), got {type(model).__name__}")
    top = f"h.{len(model.h) - 1}."
    freeze_base(model)
    unfreeze(model, lambda n: n.startswith(top) or n.startswith("ln_f."))
    return Hooks()


def _block(config: GPTConfig) -> int:
    """One GPT-2 block: 12 d^2 weights, 9 d biases, and the 4 d of ln_1 and ln_2 (2 d without biases)."""
    d = config.n_embd
    return 12 * d * d + (13 * d if config.bias else 2 * d)


def count_zero_shot(config: GPTConfig) -> int:
    return 0


def count_full(config: GPTConfig) -> int:
    """V d + T d + L block + ln_f (the head is tied to wte, so it adds nothing)."""
    V, T, L, d = config.vocab_size, config.block_size, config.n_layer, config.n_embd
    return V * d + T * d + L * _block(config) + (2 * d if config.bias else d)


def count_last_block(config: GPTConfig) -> int:
    """The top block and ln_f: 12 d^2 + 13 d + 2 d."""
    d = config.n_embd
    return _block(config) + (2 * d if config.bias else d)
