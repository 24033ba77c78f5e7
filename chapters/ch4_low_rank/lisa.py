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

Choices (spec sheet section 21 and decisions 13, 14):
- the head is tied to wte here, so "embedding + head" means wte and wpe, and the final LayerNorm ln_f is
  counted as part of the head;
- at each resample the optimizer state of deactivated blocks is dropped and newly active blocks start with
  fresh state (memory-faithful); `keep_state=True` keeps stale states instead;
- the first block sample is drawn when the optimizer is built (hooks.make_optimizer, i.e. when train()
  starts): the loop collects the trainable parameters before that, so every block must be trainable then;
- sampling uses its own torch.Generator(seed), so runs are reproducible and independent of the data order.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minimal.gpt import GPT
from minimal.hooks import Hooks
from minimal.train import TrainConfig, default_optimizer

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


def lisa_trainable_count(model: GPT, n_active: int) -> int:
    """Entries trained in one period: wte, wpe, ln_f plus n_active blocks (all blocks have the same size)."""
    always = sum(p.numel() for n, p in model.named_parameters() if n.startswith(ALWAYS_TRAINED))
    return always + n_active * sum(p.numel() for p in model.h[0].parameters())


def adam_state_bytes(model: GPT, n_active: int | None = None, bytes_per_number: int = 4) -> int:
    """Bytes of Adam's two moments: full fine-tuning (n_active=None) or LISA with n_active blocks."""
    n = sum(p.numel() for p in model.parameters()) if n_active is None else lisa_trainable_count(model, n_active)
    return 2 * n * bytes_per_number


def apply_lisa(model: GPT, n_active: int = 1, period: int = 20, seed: int = 0, keep_state: bool = False) -> Hooks:
    """Unfreeze everything (the loop collects it); every `period` steps train only `n_active` random blocks."""
    L = len(model.h)
    if not isinstance(n_active, int) or isinstance(n_active, bool) or not 1 <= n_active <= L:
        raise ValueError(f"n_active (gamma) must be an int in [1, {L}] for this {L}-block model, got {n_active!r}")
    if not isinstance(period, int) or period <= 0:
        raise ValueError(f"period (K, steps between resamples) must be a positive int, got {period!r}")
    for p in model.parameters():
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)

    def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
        if len(params) != len(list(model.parameters())):
            raise ValueError("LISA: every parameter must be trainable when the optimizer is built")
        opt = default_optimizer(params, cfg)
        set_active_blocks(model, sample_blocks(L, n_active, gen), opt, keep_state)
        return opt

    def step_end(model: nn.Module, step: int, opt: torch.optim.Optimizer) -> None:
        if (step + 1) % period == 0:
            set_active_blocks(model, sample_blocks(L, n_active, gen), opt, keep_state)

    return Hooks(step_end=step_end, make_optimizer=make_optimizer)
