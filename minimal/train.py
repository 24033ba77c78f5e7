"""One training loop for pretraining and fine-tuning.

The loop: AdamW over the parameters that require grad, linear warmup then cosine decay to `min_lr`,
gradient clipping, periodic evaluation, and a history of losses and metrics. Methods plug in through
`Hooks` (minimal/hooks.py) instead of copying the loop:

    optimizer = hooks.make_optimizer(params, cfg) or AdamW;  hooks.setup(model, cfg, optimizer)
    loss = model(idx, labels=labels).loss + hooks.extra_loss(model)      # e.g. an L1 or orthogonality term
    loss.backward();  hooks.after_backward(model, step)                  # e.g. gradient masks
    clip;  optimizer.step();  hooks.step_end(model, step, optimizer)     # e.g. pruning, merges, restarts

Evaluation (perplexity, task metrics) is in minimal/evaluate.py. The result reports the trainable
parameter count, seconds per step, and peak memory: on CUDA the allocator's peak, on CPU the largest, over
the steps, of the bytes of parameters, gradients and optimizer state counted from the tensors themselves
(taken right after each optimizer step, so a method that shrinks its state later, like a ReLoRA reset
or a LISA re-draw, still shows its peak).
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm import tqdm

from minimal.hooks import Hooks, lr_at
from minimal.peft import count_trainable

Batch = tuple[torch.Tensor, torch.Tensor]  # idx [B, T], labels [B, T]


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 20
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 0  # 0: evaluate only at the end
    log_every: int = 50
    seed: int = 0
    progress: bool | None = None  # None: a bar when interactive, plain lines otherwise (CI)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "warmup", "eval_every", "log_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"TrainConfig.{name} must be an int, got {value!r} ({type(value).__name__})")
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"TrainConfig.{name} must be a finite number, got {value!r}")
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps}, {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup <= self.steps:
            raise ValueError(f"warmup must be in [0, steps], got {self.warmup}")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "lr"} every step
    evals: list[dict] = field(default_factory=list)  # {"step", ...eval_fn's metrics}
    trainable: int = 0
    total: int = 0
    seconds_per_step: float = 0.0
    peak_memory_bytes: int = 0

    @property
    def final_loss(self) -> float:
        tail = [h["loss"] for h in self.history[-10:]]
        return sum(tail) / len(tail)


def default_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (biases, norms and vectors are not decayed)."""
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)


def tensor_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of parameters, their gradients and the optimizer state, counted from the tensors."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _interactive(cfg: TrainConfig) -> bool:
    if cfg.progress is not None:
        return cfg.progress
    return sys.stderr.isatty() and not os.environ.get("CI")


def train(
    model: nn.Module,
    get_batch: Callable[[torch.Generator], Batch],
    cfg: TrainConfig,
    hooks: Hooks | None = None,
    eval_fn: Callable[[nn.Module], dict] | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train the parameters of `model` that require grad; `get_batch(gen)` draws a batch."""
    hooks = hooks or Hooks()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad: apply a method (or unfreeze something) before training")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = next(model.parameters()).device
    optimizer = hooks.make_optimizer(params, cfg) or default_optimizer(params, cfg)
    hooks.setup(model, cfg, optimizer)
    counts = count_trainable(model)
    result = TrainResult(trainable=hooks.n_trainable or counts.trainable, total=counts.total)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=cfg.steps, desc=desc, disable=not _interactive(cfg), leave=False)
    model.train()
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        idx, labels = (t.to(device) for t in get_batch(gen))
        loss = model(idx, labels=labels).loss
        extra = hooks.extra_loss(model)
        if extra is not None:
            loss = loss + extra
        if not math.isfinite(loss.item()):  # before backward and step: a bad loss never reaches the weights
            raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        hooks.after_backward(model, step)
        grads = [p.grad for p in params if p.grad is not None]
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        if grads and not torch.isfinite(norm):
            raise FloatingPointError(f"a gradient became non-finite at step {step} (norm {norm.item()}); the "
                                     "weights were not updated. Lower the learning rate or check the method")
        optimizer.step()
        if device.type != "cuda":  # the CPU peak: parameters, gradients and state right after the step
            result.peak_memory_bytes = max(result.peak_memory_bytes, tensor_bytes(model, optimizer))
        hooks.step_end(model, step, optimizer)
        result.history.append({"step": step, "loss": loss.item(), "lr": lr})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if not _interactive(cfg) and cfg.log_every and (step + 1) % cfg.log_every == 0:
            print(f"{desc}: step {step + 1}/{cfg.steps} loss {loss.item():.4f} lr {lr:.2e}", flush=True)
        if eval_fn is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            result.evals.append({"step": step + 1, **eval_fn(model)})
            model.train()
    result.seconds_per_step = (time.perf_counter() - t0) / cfg.steps
    bar.close()
    if device.type == "cuda":
        result.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    if eval_fn is not None:
        result.evals.append({"step": cfg.steps, **eval_fn(model)})
    model.eval()
    return result
