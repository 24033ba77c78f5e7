"""Hooks: how a PEFT method plugs into the one training loop (minimal/train.py) without copying it.

Every `apply_*` in this repository returns a `Hooks`. The loop calls, in this order:

    optimizer = hooks.make_optimizer(params, cfg) or AdamW(params)     # once; e.g. GaLore's projected Adam
    hooks.setup(model, cfg, optimizer)                                 # once, before step 0: read cfg.steps
    for step in range(cfg.steps):
        loss = model(idx, labels=labels).loss
        extra = hooks.extra_loss(model)                                # e.g. an L1 or orthogonality term
        loss = loss if extra is None else loss + extra
        loss.backward();  hooks.after_backward(model, step)            # e.g. gradient masks
        clip;  optimizer.step();  hooks.step_end(model, step, optimizer)   # e.g. pruning, merges, restarts

Every method is a no-op here, so a method with nothing to add returns `Hooks()`. A method with state
(AdaLoRA's budget, ReLoRA's restarts, ...) subclasses Hooks and overrides what it needs; `apply_*`
returns that controller itself, so its state stays in reach:

    alloc = apply_adalora(model, ...);  train(model, batches, cfg, hooks=alloc);  alloc.rank_pattern()

A method with one small function may instead pass it by name, `Hooks(after_backward=mask_grads)`: a
callable given to the constructor replaces the method of the same name on that instance.

`n_trainable` is for methods that mask the gradient of whole tensors (FISH-DIP, SAM, ...): it states the
entries really updated, where counting requires_grad would count every entry of those tensors.

This file imports torch only, so that a method file can be copied with it (see each method's `Copy:` line).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

HOOK_NAMES = ("setup", "make_optimizer", "extra_loss", "after_backward", "step_end")


class Hooks:
    """What a method adds to the training loop; every method is a documented no-op."""

    n_trainable: int | None = None

    def __init__(self, n_trainable: int | None = None, **functions: Callable[..., Any] | None) -> None:
        unknown = sorted(set(functions) - set(HOOK_NAMES))
        if unknown:
            raise TypeError(f"Hooks: unknown hook {unknown[0]!r}; the hooks are {HOOK_NAMES}")
        for name, fn in functions.items():
            if fn is not None:
                if not callable(fn):
                    raise TypeError(f"Hooks: {name} must be callable, got {type(fn).__name__}")
                setattr(self, name, fn)  # the instance attribute replaces the no-op method
        if n_trainable is not None:
            self.n_trainable = n_trainable

    def setup(self, model: nn.Module, cfg: Any, optimizer: torch.optim.Optimizer) -> None:
        """Once, before step 0. `cfg` is the TrainConfig: a schedule over the run reads `cfg.steps` here."""

    def make_optimizer(self, params: list[nn.Parameter], cfg: Any) -> torch.optim.Optimizer | None:
        """An optimizer to use instead of the loop's AdamW, or None for AdamW."""
        return None

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the task loss before backward (a regulariser), or None."""
        return None

    def after_backward(self, model: nn.Module, step: int) -> None:
        """After loss.backward(), before clipping and the optimizer step: edit gradients here."""

    def step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        """After optimizer.step(): prune, merge, restart or re-draw here."""


def lr_at(step: int, cfg: Any) -> float:
    """The loop's learning rate at `step`: linear warmup for cfg.warmup steps, then cosine from cfg.lr to
    cfg.lr * cfg.min_lr_ratio. Here (torch only) so that a method whose schedule rides on it can copy it."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))
