"""Chain of LoRA (COLA): fine-tune with a sequence of LoRAs, each merged in before the next one starts.

Paper: Wenhan Xia, Chengwei Qin, Elad Hazan, "Chain of LoRA: Efficient Fine-tuning of Language Models via
Residual Learning", 2024, arXiv 2401.04151.

Idea: split the step budget into M links. Train a LoRA, "tie a knot" (fold it into the weights), and start a
fresh LoRA that learns what is still missing; like Frank-Wolfe, each link adds a low-rank correction, so the
total update can reach rank M r at LoRA's memory cost.

    link j (j = 1..M):  y = x (W^(j-1))^T + b + s (x A_j^T) B_j^T        only A_j [r, in], B_j [out, r] train
    knot:               W^(j) = W^(j-1) + s B_j A_j,   A_{j+1} ~ kaiming_uniform,   B_{j+1} = 0
    final:              W = W0 + sum_j s B_j A_j                            (rank <= M r)

What trains: the current link's A and B of the targeted layers (the same count as LoRA: r (in + out) each).
The biases, LayerNorms and embeddings stay frozen; W changes only at knots.

Loop (minimal/hooks.py; apply_chain_of_lora returns the ChainOfLoRA controller): setup reads the run length
T = cfg.steps and places the knots; step_end ties a knot at the start of links 2..M.

Choices:
- one global learning-rate schedule across links (the paper adds no re-warmups); `link_warmup=n` re-warms the
  lr from 0 over n steps after every knot, as an option;
- at a knot the optimizer state of A and B is dropped, so the new link starts from fresh Adam moments;
- links have equal length, ceil(steps / M) steps (the last one may be shorter, and a run shorter than M
  steps has fewer links: one per step); every link has the same rank
  (the paper's rank step-down ablation, e.g. 8 -> 4 -> 2, is not implemented);
- M = 1 is plain LoRA, step for step (a test checks it).

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/lora.py, chapters/ch4_low_rank/relora.py, chapters/ch4_low_rank/chain_of_lora.py
"""  # noqa: E501

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from chapters.ch4_low_rank.lora import apply_lora, count_lora
from chapters.ch4_low_rank.relora import lora_layers, merge_and_reinit, set_lr_scale
from minimal.hooks import Hooks

if TYPE_CHECKING:
    from minimal.gpt import GPTConfig


def knot_steps(total_steps: int, links: int) -> list[int]:
    """The steps at which link 2, 3, ..., M begins: multiples of ceil(total_steps / links)."""
    length = math.ceil(total_steps / links)
    return list(range(length, total_steps, length))


def tie_knot(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Merge every LoRA into its base weight, start fresh factors, and drop their optimizer state."""
    n = merge_and_reinit(model)
    if optimizer is not None:
        for layer in lora_layers(model):
            optimizer.state.pop(layer.A, None)
            optimizer.state.pop(layer.B, None)
    return n


class ChainOfLoRA(Hooks):
    """Ties a knot at the start of links 2..M of the run (and optionally re-warms the lr after each)."""

    def __init__(self, links: int, link_warmup: int) -> None:
        super().__init__()
        self.links, self.link_warmup = links, link_warmup
        self.cfg: Any = None  # the run's TrainConfig, from setup()
        self.knots: list[int] = []

    def setup(self, model: nn.Module, cfg: Any, optimizer: torch.optim.Optimizer) -> None:
        """Before step 0: the knots of this run (cfg.steps)."""
        if self.link_warmup and self.link_warmup >= cfg.steps / self.links:
            raise ValueError(f"link_warmup ({self.link_warmup}) must be shorter than a link "
                             f"({cfg.steps / self.links:g} steps)")
        self.cfg, self.knots = cfg, knot_steps(cfg.steps, self.links)

    def step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        if self.cfg is None:
            raise RuntimeError("Chain of LoRA: setup(model, cfg, optimizer) has not run (train() calls it first)")
        if step + 1 in self.knots:
            tie_knot(model, optimizer)
        if self.link_warmup:
            set_lr_scale(optimizer, step + 1, self.cfg, self.knots, self.link_warmup)


def apply_chain_of_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    targets: str | Iterable[str] = ("c_attn",),
    links: int = 3,
    link_warmup: int = 0,
    dropout: float = 0.0,
) -> ChainOfLoRA:
    """Wrap the targets in LoRA (the rest frozen); return the controller (the loop's hooks) that ties a knot
    at the start of links 2..M. The run length comes from the loop's TrainConfig, in setup."""
    if not isinstance(links, int) or isinstance(links, bool) or links <= 0:
        raise ValueError(f"links (the chain length M) must be a positive int, got {links!r}")
    if not isinstance(link_warmup, int) or isinstance(link_warmup, bool) or link_warmup < 0:
        raise ValueError(f"link_warmup must be a non-negative int, got {link_warmup!r}")
    apply_lora(model, r=r, alpha=alpha, targets=targets, dropout=dropout)
    return ChainOfLoRA(links, link_warmup)


def count_chain_of_lora(config: GPTConfig, r: int = 8, targets: str | Iterable[str] = ("c_attn",)) -> int:
    """Trainable entries: one link at a time, LoRA's r (in + out) per adapted layer."""
    return count_lora(config, r, targets)
