"""VeRA: vector-based random matrix adaptation.

Paper: Dawid J. Kopiczko, Tijmen Blankevoort, Yuki M. Asano, "VeRA: Vector-based Random Matrix
Adaptation", ICLR 2024, arXiv 2310.11454.

Idea: LoRA's two thin matrices, but random, frozen, and one pair shared by every adapted layer. Each layer
learns only two scaling vectors: d scales the r directions of A, b scales the out rows of B. A layer then
costs r + out numbers instead of LoRA's r (in + out), so r can be large (256, 1024) for a tiny budget.

    A [r, in_max], B [out_max, r]   frozen, one pair per apply_vera call, drawn from `projection_seed`
    layer l of shape [out, in]:     A_l = A[:, :in]  [r, in]      B_l = B[:out, :]  [out, r]
    y  = x W0^T + b0 + b * ((d * (drop(x) A_l^T)) B_l^T)         d [r], b [out]  (trained, per layer)
    delta_weight = diag(b) B_l diag(d) A_l   [out, in]
    init: A, B ~ U(-sqrt(6 / fan_in), sqrt(6 / fan_in)) (kaiming-uniform, gain sqrt(2)), d = d_initial, b = 0
          => dW = 0 at init

What trains: d and b of every targeted layer, r + out numbers per layer. A, B, the base weights and
everything else are frozen.

Choices where paper and peft differ (we follow peft 0.21, VeraConfig / VeraModel):
- Sharing across shapes: the paper's adapted layers all have one shape and share one A, B. For layers of
  different shapes peft draws one pair sized to the largest in and the largest out and gives each layer
  its top-left slice; so do we. Layers of one shape therefore use exactly the same matrices.
- Random draw: peft's, so the same seed gives the same A and B as peft: a float32 CPU torch.Generator
  seeded with `projection_seed` draws A first, then B (fan_in = in_max for A, r for B); the result is then
  cast to the weight's dtype and device. d_initial = 0.1 is peft's default (the paper's Table 6c ablates it);
  d_initial = 0 is refused, since with b = 0 as well neither vector would ever get a gradient. d is filled
  in the weight's dtype (peft fills float32, then casts: float32(0.1) in a float64 model).
- r may exceed in or out (peft allows it; rank(dW) <= min(r, in, out) still holds).
- Saving: A and B are buffers of one `VeRAProjection` module held by every layer. `save_adapter(model,
  directory, config)` saves d and b only (peft's save_projection=False): loading relies on the same
  projection_seed rebuilding A and B, and load_adapter checks the seed (it is recorded per layer). Pass
  `extra=projection_names(model)` to save A and B too (peft's default save_projection=True); load_adapter
  then checks and copies them.
- No trainable bias options (peft's bias="all" / "vera_only").

dtype and device: A, B, d and b take the dtype and device of the adapted weight (the shared A, B: those of
the first targeted layer; every targeted layer must match them). `count_vera(config, r, targets)` is the
trainable count as a formula of the GPT config.

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/lora.py, chapters/ch4_low_rank/vera.py
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from chapters.ch4_low_rank.lora import target_shapes
from minimal.hooks import Hooks
from minimal.peft import Mergeable, find_linears, inject

if TYPE_CHECKING:
    from minimal.gpt import GPTConfig


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """peft's VeRA draw: U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1], float32 on the CPU."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjection(nn.Module):
    """The frozen random pair A [r, in_max], B [out_max, r], one module held by every VeRA layer."""

    def __init__(self, r: int, in_max: int, out_max: int, projection_seed: int = 0,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"VeRA rank r must be a positive int, got {r!r}")
        if not isinstance(projection_seed, int) or isinstance(projection_seed, bool):
            raise ValueError(f"VeRA projection_seed must be an int, got {projection_seed!r}")
        self.r, self.projection_seed = r, projection_seed
        g = torch.Generator(device="cpu").manual_seed(projection_seed)
        A = kaiming_uniform((r, in_max), g)  # [r, in_max], drawn first (as peft)
        B = kaiming_uniform((out_max, r), g)  # [out_max, r]
        self.register_buffer("A", A.to(device, dtype))
        self.register_buffer("B", B.to(device, dtype))

    def extra_repr(self) -> str:
        return f"A={tuple(self.A.shape)}, B={tuple(self.B.shape)}, projection_seed={self.projection_seed}"


class VeRALinear(Mergeable):
    """y = base(x) + b * ((d * (drop(x) A_l^T)) B_l^T) with A_l, B_l sliced from a shared VeRAProjection."""

    def __init__(self, base: nn.Linear, proj: VeRAProjection, d_initial: float = 0.1, dropout: float = 0.0) -> None:
        super().__init__(base)
        w = base.weight  # [out, in]
        if proj.A.shape[1] < base.in_features or proj.B.shape[0] < base.out_features:
            raise ValueError(f"VeRA projection A {tuple(proj.A.shape)}, B {tuple(proj.B.shape)} is too small for a "
                             f"layer of shape [out={base.out_features}, in={base.in_features}]")
        if proj.A.dtype != w.dtype or proj.A.device != w.device:
            raise ValueError(f"VeRA projection is {proj.A.dtype} on {proj.A.device} but the layer weight is "
                             f"{w.dtype} on {w.device}; put the model on one dtype and device first")
        if not (isinstance(d_initial, (int, float)) and math.isfinite(d_initial) and d_initial != 0):
            raise ValueError(f"VeRA d_initial must be a finite non-zero number (b starts at 0, so d = 0 would "
                             f"never get a gradient), got {d_initial!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.proj = proj  # shared: registered under every layer, stored once (named_buffers skips duplicates)
        self.r, self.projection_seed = proj.r, proj.projection_seed  # recorded by save_adapter, checked on load
        self.d = nn.Parameter(torch.full((proj.r,), float(d_initial), device=w.device, dtype=w.dtype))  # [r]
        self.b = nn.Parameter(torch.zeros(base.out_features, device=w.device, dtype=w.dtype))  # [out]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's A_l [r, in] and B_l [out, r]: views into the shared pair."""
        return self.proj.A[:, : self.base.in_features], self.proj.B[: self.base.out_features, :]

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """b * ((d * (x A_l^T)) B_l^T) without the base path; x [..., in] -> [..., out]."""
        A, B = self.sliced()
        return self.b * ((self.d * (x @ A.T)) @ B.T)  # [..., r] -> [..., out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [..., out]
        if self.merged:
            return y
        return y + self.branch(self.dropout(x))

    def delta_weight(self) -> torch.Tensor:
        A, B = self.sliced()
        return (self.b[:, None] * B) @ (self.d[:, None] * A)  # diag(b) B diag(d) A: [out, in]

    def extra_repr(self) -> str:
        return f"r={self.r}, projection_seed={self.projection_seed}, merged={self.merged}"


def apply_vera(
    model: nn.Module,
    r: int = 256,
    targets: str | Iterable[str] = ("c_attn",),
    projection_seed: int = 0,
    d_initial: float = 0.1,
    dropout: float = 0.0,
) -> Hooks:
    """Freeze `model` and wrap every targeted nn.Linear in a VeRALinear sharing one random A, B pair.

    targets: as in apply_lora (peft's name rule). The pair is sized to the largest in and out among the
    targets. Every layer is built (and checked) before the model changes.
    """
    names = find_linears(model, targets)
    linears = [model.get_submodule(n) for n in names]
    w = linears[0].weight
    proj = VeRAProjection(r, max(lin.in_features for lin in linears), max(lin.out_features for lin in linears),
                          projection_seed, w.device, w.dtype)
    inject(model, targets, lambda lin: VeRALinear(lin, proj, d_initial=d_initial, dropout=dropout))
    return Hooks()


def projection_names(model: nn.Module) -> list[str]:
    """Buffer names of the shared A and B, for save_adapter(..., extra=projection_names(model))."""
    return [f"{n}.{t}" for n, m in model.named_modules() if isinstance(m, VeRAProjection) for t in ("A", "B")]


def count_vera(config: GPTConfig, r: int = 256, targets: str | Iterable[str] = ("c_attn",)) -> int:
    """Trainable entries after apply_vera: r + out per adapted layer (d and b)."""
    return sum(r + o for o, i in target_shapes(config, targets).values())
