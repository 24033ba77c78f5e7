"""Chain of LoRA (COLA): fine-tune with a sequence of LoRAs, each merged in before the next one starts.

Paper: Wenhan Xia, Chengwei Qin, Elad Hazan, "Chain of LoRA: Efficient Fine-tuning of Language Models via
Residual Learning", 2024, arXiv 2401.04151.
Builds on lora.py and relora.py (merge_and_reinit): copy both with this file.

Idea: split the step budget into M links. Train a LoRA, "tie a knot" (fold it into the weights), and start a
fresh LoRA that learns what is still missing; like Frank-Wolfe, each link adds a low-rank correction, so the
total update can reach rank M r at LoRA's memory cost.

    link j (j = 1..M):  y = x (W^(j-1))^T + b + s (x A_j^T) B_j^T        only A_j [r, in], B_j [out, r] train
    knot:               W^(j) = W^(j-1) + s B_j A_j,   A_{j+1} ~ kaiming_uniform,   B_{j+1} = 0
    final:              W = W0 + sum_j s B_j A_j                            (rank <= M r)

What trains: the current link's A and B of the targeted layers (the same count as LoRA: r (in + out) each).
The biases, LayerNorms and embeddings stay frozen; W changes only at knots.

Choices (spec sheet section 18 and decision 15):
- one global learning-rate schedule across links (the paper adds no re-warmups); `link_warmup=n` re-warms the
  lr from 0 over n steps after every knot, as an option;
- at a knot the optimizer state of A and B is dropped, so the new link starts from fresh Adam moments;
- links have equal length, ceil(steps / M) steps (the last one may be shorter, and a run shorter than M
  steps has fewer links: one per step); every link has the same rank
  (the paper's rank step-down ablation, e.g. 8 -> 4 -> 2, is not implemented);
- M = 1 is plain LoRA, step for step (a test checks it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from chapters.ch4_low_rank.lora import apply_lora
from chapters.ch4_low_rank.relora import jagged_cosine_lr, lora_layers, merge_and_reinit
from minimal.gpt import GPT
from minimal.hooks import Hooks
from minimal.train import TrainConfig, default_optimizer, lr_at


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


def apply_chain_of_lora(
    model: GPT,
    r: int = 8,
    alpha: float = 16.0,
    targets: str | Iterable[str] = ("c_attn",),
    links: int = 3,
    link_warmup: int = 0,
    dropout: float = 0.0,
) -> Hooks:
    """Freeze the model, wrap the targets in LoRA, and tie a knot at the start of links 2..M.

    The hooks read the run length from the TrainConfig given to hooks.make_optimizer (train() calls it).
    """
    if not isinstance(links, int) or isinstance(links, bool) or links <= 0:
        raise ValueError(f"links (the chain length M) must be a positive int, got {links!r}")
    if not isinstance(link_warmup, int) or link_warmup < 0:
        raise ValueError(f"link_warmup must be a non-negative int, got {link_warmup!r}")
    apply_lora(model, r=r, alpha=alpha, targets=targets, dropout=dropout)
    run: dict = {}

    def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
        run["cfg"], run["knots"] = cfg, knot_steps(cfg.steps, links)
        if link_warmup and link_warmup >= cfg.steps / links:
            raise ValueError(f"link_warmup ({link_warmup}) must be shorter than a link ({cfg.steps / links:g} steps)")
        return default_optimizer(params, cfg)

    def step_end(model: nn.Module, step: int, opt: torch.optim.Optimizer) -> None:
        if "cfg" not in run:
            raise RuntimeError("Chain-of-LoRA hooks: call hooks.make_optimizer(params, cfg) first (train() does)")
        if step + 1 in run["knots"]:
            tie_knot(model, opt)
        if link_warmup and step + 1 < run["cfg"].steps:
            cfg = run["cfg"]
            env = lr_at(step + 1, cfg)
            scale = jagged_cosine_lr(step + 1, cfg, run["knots"], link_warmup) / env if env > 0 else 0.0
            for group in opt.param_groups:
                group["lr_scale"] = scale

    return Hooks(step_end=step_end, make_optimizer=make_optimizer)
