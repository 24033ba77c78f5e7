"""The lottery ticket hypothesis: iterative magnitude pruning with rewinding.

Paper: Frankle, Carbin, "The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural Networks",
ICLR 2019, arXiv 1803.03635. Rewinding to an early iterate: Frankle, Dziugaite, Roy, Carbin, "Linear
Mode Connectivity and the Lottery Ticket Hypothesis", ICML 2020, arXiv 1912.05671.

Idea: a randomly initialised dense network contains a sparse subnetwork (a "winning ticket") that,
trained alone *from its original initial values*, does as well as the whole network. It is found by
training, removing the smallest weights, resetting the survivors to their initial values, and repeating.
Not a PEFT method: it is the train -> select -> rewind -> retrain recipe that LT-SFT applies to
fine-tuning differences (see lt_sft.py), shown here on its original ground, training from scratch.

    forward uses M * theta;                          M = 1 at the start, theta_init saved before training
    round r:  train M * theta from the rewind point for j steps -> theta_j
              M <- M minus the round(p * |M|) surviving entries of smallest |theta_j|   (per tensor, or global)
              theta <- M * theta_rewind,  theta_rewind = theta_init (the ticket) or theta_k (rewinding, k early)
    after R rounds a fraction (1 - p)^R survives (up to rounding); the ticket is (M, theta_rewind)
    control: the same M with fresh random values (`random_reinit`) trains worse

What is pruned: the weight of every nn.Linear (for the GPT: c_attn, attn.c_proj, c_fc, mlp.c_proj); the
embeddings, LayerNorms and biases are never pruned and always train. Works on the tiny GPT or any
nn.Module made of nn.Linear layers (an MLP).

Implementation: `apply_lottery_ticket` zeroes the pruned entries and trains with `minimal.sparse.GradMask`
(gradient times M after backward, and every pruned entry copied back to 0 after each optimiser step), so
pruned weights stay exactly zero whatever AdamW's weight decay or momentum would do; this is the
paper's "masked gradients and re-masking after each step". Every round starts a fresh optimiser and the
same schedule (the shared loop's). Choices: p is applied per tensor by default (the paper's rule for
small networks; `per_layer=False` prunes globally, its rule for deep ones); one rate for all layers.
`apply_lottery_ticket` returns the GradMask itself (a Hooks, n_trainable = the surviving and unpruned
entries, `count_lottery_ticket`); `find_ticket` and `ticket_vs_random` run the shared loop, so they
import minimal/train.py when called, and training the ticket alone needs only the files below.

Copy: minimal/hooks.py, minimal/sparse.py, chapters/ch3_selective/lottery_ticket.py
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from minimal.sparse import GradMask, Masks, check_masks

if TYPE_CHECKING:
    from minimal.gpt import GPTConfig
    from minimal.train import Batch, TrainConfig

State = dict[str, torch.Tensor]


def prunable_names(model: nn.Module) -> list[str]:
    """The weight of every nn.Linear in the model."""
    names = [f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("the model has no nn.Linear layer to prune")
    return names


def full_masks(model: nn.Module) -> Masks:
    params = dict(model.named_parameters())
    return {n: torch.ones_like(params[n], dtype=torch.bool) for n in prunable_names(model)}


def remaining_fraction(masks: Masks) -> float:
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def snapshot(model: nn.Module) -> State:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@torch.no_grad()
def prune_step(model: nn.Module, masks: Masks, p: float, per_layer: bool = True) -> Masks:
    """Remove round(p * survivors) surviving entries of smallest |theta| (in each tensor, or over all)."""
    if not 0 < p < 1:
        raise ValueError(f"p (the fraction of surviving weights pruned per round) must be in (0, 1), got {p}")
    params = check_masks(model, masks)
    groups = [[n] for n in masks] if per_layer else [list(masks)]
    new = {n: m.clone() for n, m in masks.items()}
    for names in groups:
        alive = torch.cat([masks[n].reshape(-1) for n in names])  # [numel]
        score = torch.cat([params[n].detach().abs().reshape(-1).float() for n in names])
        score = torch.where(alive, score, torch.full_like(score, float("inf")))  # pruned entries are never re-pruned
        n_remove = round(p * int(alive.sum()))
        keep = alive.clone()
        keep[torch.sort(score, stable=True).indices[:n_remove]] = False
        start = 0
        for n in names:
            new[n] = keep[start:start + masks[n].numel()].view(masks[n].shape)
            start += masks[n].numel()
    return new


@torch.no_grad()
def rewind_to(model: nn.Module, state: State, masks: Masks) -> None:
    """theta <- state for every parameter, then theta <- M * theta on the pruned tensors."""
    params = dict(model.named_parameters())
    if set(state) != set(params):
        raise ValueError(f"the saved state does not match the model: {sorted(set(state) ^ set(params))[:5]}")
    for n, t in state.items():
        params[n].copy_(t * masks[n] if n in masks else t)


def apply_lottery_ticket(model: nn.Module, masks: Masks) -> GradMask:
    """Train the subnetwork M: zero the pruned entries, everything else trains, pruned entries stay 0."""
    check_masks(model, masks)  # before anything changes
    for p in model.parameters():
        p.requires_grad_(True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m.to(params[n].device))
    return GradMask(model, masks, restore=True)  # restore: pruned entries copied back to 0


def count_lottery_ticket(config: GPTConfig, masks: Masks) -> int:
    """Phi minus the pruned entries, Phi = V d + T d + L (12 d^2 + 13 d) + 2 d: what trains in the ticket."""
    V, T, L, d = config.vocab_size, config.block_size, config.n_layer, config.n_embd
    return V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d - sum(int((~m).sum()) for m in masks.values())


def _saving_at(step_end: Callable, k: int, saved: dict[str, State]) -> Callable:
    """step_end that also stores theta_k (the weights after k optimiser steps) in saved["rewind"]."""

    def hook(model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        step_end(model, step, optimizer)
        if step + 1 == k:
            saved["rewind"] = snapshot(model)

    return hook


@dataclass
class Ticket:
    masks: Masks  # the surviving weights
    rewind_state: State  # theta_init (rewind_step = 0) or theta_k: where every round restarts
    history: list[dict] = field(default_factory=list)  # per round: remaining fraction before pruning, final loss


def find_ticket(model: nn.Module, get_batch: Callable[[torch.Generator], Batch], cfg: TrainConfig, rounds: int,
                p: float = 0.2, rewind_step: int = 0, per_layer: bool = True) -> Ticket:
    """Iterative magnitude pruning: `rounds` x (train cfg.steps, prune p of the survivors, rewind).

    rewind_step = 0 resets to the initial values (the original ticket); k > 0 rewinds to the weights
    after k steps of the first round (for deeper networks). On return the model holds the ticket:
    M * theta_rewind, ready to be trained with apply_lottery_ticket(model, ticket.masks).
    """
    from minimal.train import train  # the shared loop (tqdm); only this helper and ticket_vs_random need it

    if rounds <= 0:
        raise ValueError(f"rounds must be positive, got {rounds}")
    if not 0 <= rewind_step <= cfg.steps:
        raise ValueError(f"rewind_step must be in [0, cfg.steps={cfg.steps}], got {rewind_step}")
    masks = full_masks(model)
    saved: dict[str, State] = {"init": snapshot(model)}
    history = []
    for r in range(rounds):
        hooks = apply_lottery_ticket(model, masks)
        if r == 0 and rewind_step > 0:
            hooks.step_end = _saving_at(hooks.step_end, rewind_step, saved)
        result = train(model, get_batch, cfg, hooks, desc=f"IMP round {r + 1}/{rounds}")
        history.append({"round": r + 1, "remaining": remaining_fraction(masks), "final_loss": result.final_loss})
        masks = prune_step(model, masks, p, per_layer)
        rewind_to(model, saved.get("rewind", saved["init"]), masks)
    return Ticket(masks, saved.get("rewind", saved["init"]), history)


@torch.no_grad()
def random_reinit(model: nn.Module, masks: Masks, seed: int = 1) -> nn.Module:
    """The control: a copy with fresh random values drawn as at initialisation, pruned by the same masks."""
    torch.manual_seed(seed)
    if hasattr(model, "config"):  # a GPT: a new one of the same config, initialised as at construction
        like = next(model.parameters())
        fresh = type(model)(model.config).to(device=like.device, dtype=like.dtype)
    else:
        fresh = copy.deepcopy(model)
        for m in fresh.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    params = dict(fresh.named_parameters())
    for n, m in masks.items():
        params[n].mul_(m)
    return fresh


def ticket_vs_random(model: nn.Module, ticket: Ticket, get_batch: Callable[[torch.Generator], Batch],
                     cfg: TrainConfig, evaluate: Callable[[nn.Module], float], seed: int = 1) -> dict[str, float]:
    """Train the winning ticket and a random re-initialisation of the same mask identically; evaluate both."""
    from minimal.train import train  # the shared loop (tqdm): imported only when a comparison runs

    winner = copy.deepcopy(model)
    rewind_to(winner, ticket.rewind_state, ticket.masks)
    control = random_reinit(model, ticket.masks, seed)
    out = {"remaining": remaining_fraction(ticket.masks)}
    for name, net in (("ticket", winner), ("random", control)):
        train(net, get_batch, cfg, apply_lottery_ticket(net, ticket.masks), desc=name)
        out[name] = evaluate(net)
    return out
