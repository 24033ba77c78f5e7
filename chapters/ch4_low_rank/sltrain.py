"""SLTrain: a weight (or weight update) that is low-rank plus sparse on a fixed random support.

Paper: Andi Han, Jiaxiang Li, Wei Huang, Mingyi Hong, Akiko Takeda, Pratik Jawanpuria, Bamdev Mishra,
"SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining", NeurIPS 2024,
arXiv 2406.02214 (code: andyjm3/SLTrain).

Idea: a low-rank product captures the head of a weight's spectrum but not its tail; add a sparse matrix whose
support is drawn uniformly at random once and never changed, so only its values train. Sparse plus low rank
is generically full rank at a LoRA-like parameter count.

    S = scatter(values [nnz] into zeros [out * in] at idx [nnz]).view(out, in)     idx fixed (a buffer)
    paper ("pretrain"):    W  = s B A + S                  y = s (x A^T) B^T + x S^T + b
    course ("finetune"):   W  = W0 + s B A + S   (W0 frozen)
    A [r, in] kaiming-uniform, B [out, r] = 0, s = alpha / r, nnz = floor(fraction * in * out)

What trains: A, B and the nnz values of each targeted layer: r (in + out) + floor(fraction in out) numbers.
In "pretrain" mode also every other parameter (embeddings, LayerNorms, all biases), as in the paper.

Choices (the paper pretrains; this course mostly fine-tunes):
- the paper pretrains from scratch (there is no W0). This course fine-tunes a pretrained base, so the
  default mode="finetune" learns the update delta = s B A + S on a frozen W0 with the values starting at 0,
  so the model starts exactly at the base. mode="pretrain" is the paper's parameterisation: the layer's
  base is a new frozen zero W0 (kept only to reuse the Mergeable protocol; a memory-faithful version would
  drop it) with a new bias, values start U(-1/sqrt(in), 1/sqrt(in)) and the biases U(-1/sqrt(out),
  1/sqrt(out)) as in the code; the original layer is never written to. Pretrain mode trains everything, so
  it must be the first method on a model;
- the support is sorted(randperm(in * out)[:nnz]) from a seeded generator, one draw per layer;
- the sparse product scatters the values into a dense matrix for each forward (the released code has a
  custom sparse kernel); gradients reach only the values, by the gather that the scatter implies.

dtype and device follow the wrapped weight. `count_sltrain` is the trainable count as a formula of the config.

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/lora.py, chapters/ch4_low_rank/sltrain.py
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch4_low_rank.lora import check_rank, target_shapes
from minimal.hooks import Hooks
from minimal.peft import APPLIED, Mergeable, inject

if TYPE_CHECKING:
    from minimal.gpt import GPT, GPTConfig

MODES = ("finetune", "pretrain")


class SLTrainLinear(Mergeable):
    """y = base(x) + s (x A^T) B^T + x S^T with S sparse on a fixed random support (see the module docstring)."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, fraction: float = 0.03,
                 mode: str = "finetune", generator: torch.Generator | None = None) -> None:
        super().__init__(base)
        check_rank(r, base, type(self).__name__)
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        out_f, in_f = base.out_features, base.in_features
        nnz = math.floor(fraction * in_f * out_f) if 0 < fraction <= 1 else 0
        if nnz < 1:
            raise ValueError(f"fraction must be in (0, 1] and give at least one entry of a [{out_f}, {in_f}] "
                             f"matrix, got {fraction}")
        self.r, self.alpha, self.fraction, self.mode = r, float(alpha), fraction, mode
        self.scale = alpha / r
        w = base.weight  # [out, in]
        self.A = nn.Parameter(torch.empty(r, in_f, device=w.device, dtype=w.dtype))  # [r, in]
        self.B = nn.Parameter(torch.zeros(out_f, r, device=w.device, dtype=w.dtype))  # [out, r]
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        idx = torch.randperm(in_f * out_f, generator=generator)[:nnz].sort().values  # [nnz], flat row-major
        self.register_buffer("idx", idx.to(w.device))
        self.values = nn.Parameter(torch.zeros(nnz, device=w.device, dtype=w.dtype))  # [nnz]
        if mode == "pretrain":  # no W0: the layer is s B A + S (+ a fresh bias); `base` itself is not touched
            def draw(n: int, bound: float) -> torch.Tensor:  # U(-bound, bound), drawn on the CPU from `generator`
                return torch.empty(n).uniform_(-bound, bound, generator=generator).to(w.device, w.dtype)

            with torch.no_grad():
                self.values.copy_(draw(nnz, 1 / math.sqrt(in_f)))
            zero = nn.Linear(in_f, out_f, bias=False, device="meta")  # no storage, no init
            zero.weight = nn.Parameter(torch.zeros_like(w), requires_grad=False)  # [out, in]
            if base.bias is not None:
                zero.bias = nn.Parameter(draw(out_f, 1 / math.sqrt(out_f)))  # [out]
            self.base = zero

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def sparse_weight(self) -> torch.Tensor:
        """S as a dense [out, in] matrix: the values scattered at their fixed flat positions."""
        out_f, in_f = self.base.out_features, self.base.in_features
        flat = self.values.new_zeros(out_f * in_f).scatter(0, self.idx, self.values)  # [out * in]
        return flat.view(out_f, in_f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [..., out]
        if self.merged:
            return y
        low = self.scale * ((x @ self.A.T) @ self.B.T)  # [..., r] -> [..., out]
        return y + low + F.linear(x, self.sparse_weight())  # [..., out]

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.B @ self.A + self.sparse_weight()  # [out, in]

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, nnz={self.nnz}, mode={self.mode}, merged={self.merged}"


def apply_sltrain(
    model: GPT,
    r: int = 8,
    alpha: float = 16.0,
    fraction: float = 0.03,
    targets: str | Iterable[str] = ("c_attn",),
    mode: str = "finetune",
    seed: int = 0,
) -> Hooks:
    """Freeze the model and wrap the targets in SLTrainLinear; in "pretrain" mode train everything else too."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "pretrain" and getattr(model, APPLIED, 0):
        raise ValueError("SLTrain's pretrain mode trains every parameter; apply it to a model without a method")
    gen = torch.Generator().manual_seed(seed)
    inject(model, targets, lambda lin: SLTrainLinear(lin, r=r, alpha=alpha, fraction=fraction, mode=mode,
                                                     generator=gen))
    if mode == "pretrain":
        for module in model.modules():
            if isinstance(module, SLTrainLinear):
                module.base.weight.requires_grad_(False)  # the zero placeholder, never trained
        for name, p in model.named_parameters():
            if not name.endswith(".base.weight"):
                p.requires_grad_(True)
    return Hooks()


def count_sltrain(config: GPTConfig, r: int = 8, fraction: float = 0.03, targets: str | Iterable[str] = ("c_attn",),
                  mode: str = "finetune") -> int:
    """Trainable entries after apply_sltrain: r (in + out) + floor(fraction in out) per layer; in "pretrain"
    mode also every other parameter of the GPT except the targets' (zero) weights."""
    shapes = target_shapes(config, targets).values()
    adapters = sum(r * (i + o) + math.floor(fraction * i * o) for o, i in shapes)
    if mode == "finetune":
        return adapters
    V, T, L, d = config.vocab_size, config.block_size, config.n_layer, config.n_embd
    every = V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d  # the GPT's parameters (tied head, biases)
    return every - sum(o * i for o, i in shapes) + adapters
