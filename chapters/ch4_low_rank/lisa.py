"""LISA: full-parameter fine-tuning of a few randomly chosen blocks at a time.

Paper: Rui Pan, Xiang Liu, Shizhe Diao, Renjie Pi, Jipeng Zhang, Chi Han, Tong Zhang, "LISA: Layerwise
Importance Sampling for Memory-Efficient Large Language Model Fine-Tuning", NeurIPS 2024, arXiv 2403.17919
(code: OptimalScale/LMFlow).

Idea: LoRA's updates are dominated by the bottom (embedding) and top (head) layers. So always train those,
and for the transformer blocks train only gamma of the L blocks at a time, drawn uniformly at random anew
every K steps; Adam keeps state for the active tensors only, so memory is close to LoRA's.

    period p (steps p K .. p K + K - 1):  S_p ~ uniform gamma-subset of {0..L-1}
    trainable:  wte (= the tied head), wpe, ln_f   and   h[i] for i in S_p          (P(h[i] trains) = gamma / L)
    optimizer state:  2 (|E/H| + sum_{i in S_p} |h[i]|) numbers   instead of  2 |all parameters|

What trains: at any step, the embeddings (wte is also the output head), wpe, ln_f and the gamma sampled
blocks, all full rank with AdamW.

Choices (where the paper and the LMFlow code leave it open):
- the head is tied to wte here, so "embedding + head" means wte and wpe, and the final LayerNorm ln_f is
  counted as part of the head;
- at each resample the optimizer state of deactivated blocks is dropped and newly active blocks start with
  fresh state (memory-faithful); `keep_state=True` keeps stale states instead;
- every parameter must be trainable when the loop builds its optimizer (AdamW over all of them), so apply
  leaves everything trainable; the first block sample is drawn in `setup`, before step 0, and frozen blocks
  simply get no gradient. `n_trainable` states the entries trained in one period;
- sampling uses its own torch.Generator(seed), so runs are reproducible and independent of the data order;
- LISA trains whole blocks, so it must be the first method on a model (stacked, it raises).

`apply_lisa` returns the `LISA` controller (a Hooks). `count_lisa` is the per-period count as a formula of the
GPT config; the method needs the model's blocks `model.h`, not the GPT class.

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/lisa.py
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from minimal.hooks import Hooks
from minimal.peft import APPLIED, freeze_base

if TYPE_CHECKING:
    from minimal.gpt import GPT, GPTConfig

ALWAYS_TRAINED = ("wte.", "wpe.", "ln_f.")


def sample_blocks(n_layer: int, n_active: int, generator: torch.Generator) -> list[int]:
    """n_active distinct block indices drawn uniformly from range(n_layer), sorted."""
    return sorted(torch.randperm(n_layer, generator=generator)[:n_active].tolist())


def active_blocks(model: GPT) -> list[int]:
    """The blocks whose parameters currently require grad."""
    return [i for i, block in enumerate(model.h) if any(p.requires_grad for p in block.parameters())]


def set_active_blocks(model: GPT, blocks: list[int], optimizer: torch.optim.Optimizer | None = None,
                      keep_state: bool = False) -> None:
    """Make exactly `blocks` trainable (plus the always-trained tensors); drop the others' optimizer state."""
    for i, block in enumerate(model.h):
        on = i in blocks
        for p in block.parameters():
            p.requires_grad_(on)
            if not on:
                p.grad = None
                if optimizer is not None and not keep_state:
                    optimizer.state.pop(p, None)
    for name, p in model.named_parameters():
        if name.startswith(ALWAYS_TRAINED):
            p.requires_grad_(True)


def lisa_numel(model: GPT, n_active: int) -> int:
    """Entries trained in one period, counted on the model: wte, wpe, ln_f plus n_active blocks (all alike)."""
    always = sum(p.numel() for n, p in model.named_parameters() if n.startswith(ALWAYS_TRAINED))
    return always + n_active * sum(p.numel() for p in model.h[0].parameters())


def adam_state_bytes(model: GPT, n_active: int | None = None, bytes_per_number: int = 4) -> int:
    """Bytes of Adam's two moments: full fine-tuning (n_active=None) or LISA with n_active blocks."""
    n = sum(p.numel() for p in model.parameters()) if n_active is None else lisa_numel(model, n_active)
    return 2 * n * bytes_per_number


class LISA(Hooks):
    """Every `period` steps, train only `n_active` random blocks (plus wte, wpe, ln_f)."""

    def __init__(self, model: GPT, n_active: int, period: int, seed: int = 0, keep_state: bool = False) -> None:
        super().__init__(n_trainable=lisa_numel(model, n_active))
        self.n_layer, self.n_active, self.period, self.keep_state = len(model.h), n_active, period, keep_state
        self.generator = torch.Generator().manual_seed(seed)

    def resample(self, model: GPT, optimizer: torch.optim.Optimizer | None = None) -> list[int]:
        """Draw a new set of active blocks and switch to it; return it."""
        blocks = sample_blocks(self.n_layer, self.n_active, self.generator)
        set_active_blocks(model, blocks, optimizer, self.keep_state)
        return blocks

    def setup(self, model: nn.Module, cfg: Any, optimizer: torch.optim.Optimizer) -> None:
        """Before step 0: check that the optimizer holds every parameter, then draw the first blocks."""
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if any(id(p) not in held for p in model.parameters()):
            raise ValueError("LISA: every parameter must be trainable when the optimizer is built (the blocks are "
                             "switched on and off during the run)")
        self.resample(model, optimizer)

    def step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        if (step + 1) % self.period == 0:
            self.resample(model, optimizer)


def apply_lisa(model: GPT, n_active: int = 1, period: int = 20, seed: int = 0, keep_state: bool = False) -> LISA:
    """Unfreeze everything (the loop's optimizer must hold it all); return the LISA controller."""
    L = len(model.h)
    if not isinstance(n_active, int) or isinstance(n_active, bool) or not 1 <= n_active <= L:
        raise ValueError(f"n_active (gamma) must be an int in [1, {L}] for this {L}-block model, got {n_active!r}")
    if not isinstance(period, int) or isinstance(period, bool) or period <= 0:
        raise ValueError(f"period (K, steps between resamples) must be a positive int, got {period!r}")
    if getattr(model, APPLIED, 0):
        raise ValueError("LISA trains whole blocks; apply it to a model without another method")
    lisa = LISA(model, n_active, period, seed, keep_state)
    freeze_base(model)  # marks the model as carrying a method; then everything trains
    for p in model.parameters():
        p.requires_grad_(True)
    return lisa


def count_lisa(config: GPTConfig, n_active: int = 1) -> int:
    """Entries trained in one period (hooks.n_trainable): V d + T d + 2 d + n_active (12 d^2 + 13 d)."""
    V, T, d = config.vocab_size, config.block_size, config.n_embd
    return V * d + T * d + 2 * d + n_active * (12 * d * d + 13 * d)
