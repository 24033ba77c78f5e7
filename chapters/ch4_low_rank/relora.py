"""ReLoRA: a high-rank update built from a sequence of low-rank ones, by merging and restarting LoRA.

Paper: Vladislav Lialin, Sherin Muckatira, Namrata Shivagunde, Anna Rumshisky, "ReLoRA: High-Rank Training
Through Low-Rank Updates", ICLR 2024, arXiv 2307.05695 (code: Guitaricet/relora).

Idea: train a LoRA for N steps, fold it into the base weight, start a fresh LoRA, repeat; the sum of k rank-r
updates can reach rank k r. Restarts stay stable thanks to three tricks: most of the LoRA optimizer state is
pruned at each restart, the learning rate drops to zero and re-warms ("jagged" cosine), and a few full-rank
steps come first (warm start).

    within a cycle:  y = x W^T + b + s (x A^T) B^T          W frozen, A [r, in] and B [out, r] trained
    every N steps:   W <- W + s B A,   A <- kaiming_uniform,   B <- 0      (the function is unchanged)
    after k resets:  W - W_start = sum_j s B_j A_j                          (rank up to k r)
    lr(t) = (t - t_k) / W_r * env(t_k + W_r)   for t_k <= t < t_k + W_r     (t_k: the k-th restart step)
          = env(t)                              otherwise                  (env: the loop's warmup + cosine)
    restarts t_k: warm_start (if > 0), then every `period` steps, up to the run length T = cfg.steps
    state pruning at a restart: exp_avg, exp_avg_sq of A and B keep only entries above the p-quantile of |.|

What trains: the LoRA factors A, B of the targeted layers (for the first `warm_start` steps: the targeted
weights W themselves, full rank, instead). `train_rest=True` also trains every non-targeted parameter
(embeddings, LayerNorms, biases) full rank, as the released code does for pretraining.

Loop (minimal/hooks.py; apply_relora returns the ReLoRA controller): setup reads T = cfg.steps and the lr
envelope from the TrainConfig; after_backward drops the LoRA gradients during the warm start; step_end merges,
restarts, prunes the optimizer state and sets the next step's lr.

Choices:
- this course applies ReLoRA to fine-tuning a pretrained base (the paper pretrains); non-target parameters
  are therefore frozen by default, like LoRA's, rather than trained as in the released code;
- wrap with A Kaiming-uniform, B = 0 (the code zeroes both and re-initialises at its first update step:
  equivalent); a restart re-draws A the same way and zeroes B;
- optimizer reset: magnitude pruning with ratio 0.9 by default; "random" pruning and a "full" reset are
  options; the step counters are kept, as in the code;
- the pruning mask is chosen once per parameter (on exp_avg) and applied to both moments. The released code
  prunes exp_avg and exp_avg_sq independently, which can keep a first moment whose second moment was zeroed;
  right after a restart A's gradient is exactly 0 (B = 0), so Adam then steps by m / eps and the run blows
  up (seen on the tiny model: even random pruning at 0.999 spiked, a full reset did not). `joint_prune=False`
  restores the code's behaviour;
- the jagged schedule re-warms to the envelope of the shared loop's own warmup + cosine; the restart at the
  end of the warm start also re-warms. The loop sets each group's lr as lr_at(step) * lr_scale, so the hooks
  set lr_scale (the loop's logged lr is the envelope, not the jagged value);
- a restart is skipped when it would fall on the last step, so the number of steps need not divide by N.

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/lora.py, chapters/ch4_low_rank/relora.py
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from chapters.ch4_low_rank.lora import LoRALinear, apply_lora, count_lora, target_shapes
from minimal.hooks import Hooks, lr_at
from minimal.peft import unfreeze

if TYPE_CHECKING:
    from minimal.gpt import GPTConfig

PRUNE_MODES = ("magnitude", "random", "full")


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@torch.no_grad()
def merge_and_reinit(model: nn.Module) -> int:
    """W <- W + s B A, then A <- kaiming_uniform, B <- 0 in every LoRALinear (the model's function is kept)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("merge_and_reinit: the model has no LoRALinear; apply LoRA first")
    for layer in layers:
        if layer.merged:
            raise ValueError("merge_and_reinit: a LoRALinear is merged (inference mode); unmerge it first")
        layer.base.weight += layer.delta_weight().to(layer.base.weight.dtype)
        nn.init.kaiming_uniform_(layer.A, a=math.sqrt(5))
        layer.B.zero_()
    return len(layers)


@torch.no_grad()
def prune_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params: Iterable[nn.Parameter],
    mode: str = "magnitude",
    ratio: float = 0.9,
    generator: torch.Generator | None = None,
    joint: bool = True,
) -> None:
    """Zero most of the moment tensors of `params` in place (other parameters' state is left alone).

    magnitude: zero the ceil(ratio * numel) entries of smallest |value| (ties: all of them); random: zero
    each entry with probability `ratio`; full: zero everything. Step counters are kept.
    joint=True: one mask per parameter, chosen on exp_avg and applied to every moment; joint=False: each
    moment tensor is pruned on its own (the released code).
    """
    if mode not in PRUNE_MODES:
        raise ValueError(f"prune mode must be one of {PRUNE_MODES}, got {mode!r}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"prune ratio must be in [0, 1], got {ratio}")
    for p in params:
        state = optimizer.state.get(p, {})
        moments = [t for key, t in sorted(state.items()) if torch.is_tensor(t) and key != "step" and t.dim() > 0]
        if joint and "exp_avg" in state:  # chosen on the first moment
            drop = _drop_mask(state["exp_avg"], mode, ratio, generator)
            masks = [drop] * len(moments)
        else:
            masks = [_drop_mask(t, mode, ratio, generator) for t in moments]
        for t, drop in zip(moments, masks):
            t.masked_fill_(drop, 0.0)


def _drop_mask(t: torch.Tensor, mode: str, ratio: float, generator: torch.Generator | None) -> torch.Tensor:
    """True where an entry of t is pruned."""
    if mode == "full" or ratio == 1.0:
        return torch.ones_like(t, dtype=torch.bool)
    if mode == "random":
        return (torch.rand(t.shape, generator=generator) < ratio).to(t.device)
    k = math.ceil(ratio * t.numel())  # at least `ratio` of the entries go
    if k == 0:
        return torch.zeros_like(t, dtype=torch.bool)
    return t.abs() <= t.abs().flatten().kthvalue(k).values


def restart_steps(total_steps: int, period: int, warm_start: int = 0) -> list[int]:
    """The steps at which a fresh LoRA cycle starts (and the lr re-warms): warm_start (if > 0), then every period."""
    first = [warm_start] if warm_start > 0 else []
    return first + list(range(warm_start + period, total_steps, period))


def jagged_cosine_lr(step: int, cfg: Any, restarts: list[int], restart_warmup: int) -> float:
    """The loop's warmup + cosine envelope, re-warmed linearly from 0 over restart_warmup steps at each restart."""
    for t_k in restarts:
        if t_k <= step < t_k + restart_warmup:
            return (step - t_k) / restart_warmup * lr_at(t_k + restart_warmup, cfg)
    return lr_at(step, cfg)


def set_lr_scale(optimizer: torch.optim.Optimizer, step: int, cfg: Any, restarts: list[int], warmup: int) -> None:
    """lr_scale of every group, so that the loop's lr (envelope x lr_scale) is the jagged lr at `step`."""
    if step >= cfg.steps:
        return
    env = lr_at(step, cfg)
    scale = jagged_cosine_lr(step, cfg, restarts, warmup) / env if env > 0 else 0.0
    for group in optimizer.param_groups:
        group["lr_scale"] = scale


class ReLoRA(Hooks):
    """Merges and restarts the LoRA every `period` steps, prunes its optimizer state, re-warms the lr."""

    def __init__(self, layers: list[LoRALinear], period: int, restart_warmup: int, prune: str, prune_ratio: float,
                 joint_prune: bool, warm_start: int, seed: int) -> None:
        super().__init__()
        self.layers, self.period, self.restart_warmup, self.warm_start = layers, period, restart_warmup, warm_start
        self.prune, self.prune_ratio, self.joint_prune = prune, prune_ratio, joint_prune
        self.lora_params = [p for m in layers for p in (m.A, m.B)]
        self.generator = torch.Generator().manual_seed(seed)
        self.cfg: Any = None  # the run's TrainConfig, from setup()
        self.restarts: list[int] = []

    def setup(self, model: nn.Module, cfg: Any, optimizer: torch.optim.Optimizer) -> None:
        """Before step 0: the restart steps of this run (cfg.steps) and the lr of step 0."""
        if self.warm_start >= cfg.steps:
            raise ValueError(f"warm_start ({self.warm_start}) must be shorter than the run ({cfg.steps} steps)")
        self.cfg, self.restarts = cfg, restart_steps(cfg.steps, self.period, self.warm_start)
        set_lr_scale(optimizer, 0, cfg, self.restarts, self.restart_warmup)

    def after_backward(self, model: nn.Module, step: int) -> None:
        if step < self.warm_start:  # full-rank warm start: the LoRA branch (B = 0) does not move yet
            for p in self.lora_params:
                p.grad = None

    def step_end(self, model: nn.Module, step: int, optimizer: torch.optim.Optimizer) -> None:
        if self.cfg is None:
            raise RuntimeError("ReLoRA: setup(model, cfg, optimizer) has not run (train() calls it before step 0)")
        nxt = step + 1
        if self.warm_start > 0 and nxt == self.warm_start:  # end of the warm start: freeze W, drop its state
            for m in self.layers:
                m.base.weight.requires_grad_(False)
                m.base.weight.grad = None
                optimizer.state.pop(m.base.weight, None)
            merge_and_reinit(model)
        elif nxt in self.restarts:
            merge_and_reinit(model)
            prune_optimizer_state(optimizer, self.lora_params, self.prune, self.prune_ratio, self.generator,
                                  self.joint_prune)
        set_lr_scale(optimizer, nxt, self.cfg, self.restarts, self.restart_warmup)


def apply_relora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    targets: str | Iterable[str] = ("c_attn",),
    period: int = 40,
    restart_warmup: int = 5,
    prune: str = "magnitude",
    prune_ratio: float = 0.9,
    joint_prune: bool = True,
    warm_start: int = 0,
    train_rest: bool = False,
    dropout: float = 0.0,
    seed: int = 0,
) -> ReLoRA:
    """Wrap the targets in LoRA; return the ReLoRA controller (the loop's hooks), which merges and restarts
    it every `period` steps. The run length comes from the loop's TrainConfig, in setup."""
    if not isinstance(period, int) or isinstance(period, bool) or period <= 0:
        raise ValueError(f"period (N, steps between restarts) must be a positive int, got {period!r}")
    if not isinstance(restart_warmup, int) or not 0 <= restart_warmup < period:
        raise ValueError(f"restart_warmup must be an int in [0, period={period}), got {restart_warmup!r}")
    if not isinstance(warm_start, int) or warm_start < 0:
        raise ValueError(f"warm_start must be a non-negative int, got {warm_start!r}")
    if prune not in PRUNE_MODES:
        raise ValueError(f"prune must be one of {PRUNE_MODES}, got {prune!r}")
    if not 0.0 <= prune_ratio <= 1.0:
        raise ValueError(f"prune_ratio must be in [0, 1], got {prune_ratio}")
    apply_lora(model, r=r, alpha=alpha, targets=targets, dropout=dropout)
    layers = lora_layers(model)
    if train_rest:
        wrapped = {id(m.base.weight) for m in layers}
        unfreeze(model, lambda n: id(model.get_parameter(n)) not in wrapped)
        for m in layers:
            m.base.weight.requires_grad_(warm_start > 0)
    elif warm_start > 0:
        for m in layers:
            m.base.weight.requires_grad_(True)
    return ReLoRA(layers, period, restart_warmup, prune, prune_ratio, joint_prune, warm_start, seed)


def count_relora(config: GPTConfig, r: int = 8, targets: str | Iterable[str] = ("c_attn",), warm_start: int = 0,
                 train_rest: bool = False) -> int:
    """Trainable entries right after apply_relora: LoRA's r (in + out) per layer; warm_start > 0 adds the
    targeted weights (out x in each); train_rest adds every other parameter of the GPT (biases included)."""
    weights = sum(o * i for o, i in target_shapes(config, targets).values())
    V, T, L, d = config.vocab_size, config.block_size, config.n_layer, config.n_embd
    per_block = 12 * d * d + (13 * d if config.bias else 2 * d)  # 4 linears and 2 LayerNorms, biases or not
    total = V * d + T * d + L * per_block + (2 * d if config.bias else d)  # wte (= the head), wpe, blocks, ln_f
    n = count_lora(config, r, targets)
    if warm_start > 0:
        n += weights
    if train_rest:
        n += total - weights
    return n
