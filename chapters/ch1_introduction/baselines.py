"""The reference lines every PEFT method is compared with (chapter 1).

- zero-shot: the pretrained base as it is; nothing trains (the loop is skipped).
- full fine-tuning: every parameter trains.
- last block: only the top transformer block and the final LayerNorm train (Lee et al. 2019 study
  this "freeze the bottom" family in chapter 3; here it is the cheapest dense baseline).

Each `apply_*` takes a GPT, sets what trains, and returns the loop hooks (none are needed here).
"""

from __future__ import annotations

from minimal.gpt import GPT
from minimal.hooks import Hooks
from minimal.peft import freeze, unfreeze


def apply_zero_shot(model: GPT) -> Hooks:
    freeze(model)
    return Hooks()


def apply_full(model: GPT) -> Hooks:
    for p in model.parameters():
        p.requires_grad_(True)
    return Hooks()


def apply_last_block(model: GPT) -> Hooks:
    freeze(model)
    top = f"h.{len(model.h) - 1}."
    unfreeze(model, lambda n: n.startswith(top) or n.startswith("ln_f."))
    return Hooks()
