"""(IA)^3: learned vectors that rescale keys, values and the MLP's inner activations.

Paper: Haokun Liu, Derek Tam, Mohammed Muqeeth, Jay Mohta, Tenghao Huang, Mohit Bansal, Colin Raffel,
"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", NeurIPS 2022,
arXiv 2205.05638 (code: r-three/t-few). Used by TabLLM's T-Few recipe in chapter 5.

Idea: "Infused Adapter by Inhibiting and Amplifying Inner Activations": multiply a few activations element
by element with trained vectors that start at 1. No new matrices, and the vectors fold into the weights.

    k = l_k * (W_k x + b_k),    v = l_v * (W_v x + b_v)           l_k, l_v in R^d      (attention)
    f = W_2 (l_ff * gelu(W_1 x + b_1)) + b_2                      l_ff in R^{4d}      (MLP)

Merge: scale the rows (outputs) of c_attn's k and v parts and their biases by l_k, l_v, and the columns
(inputs) of mlp.c_proj by l_ff. Since the vectors start at 1, the model is exactly the base at init.

What trains: the vectors only, L (d + d + 4d) = 6Ld numbers (paper), or 7Ld with `attn="qkv"`.

Choices:
- `attn="kv"` (default) follows the paper: only the key and value thirds of the fused c_attn output are
  scaled; the query third keeps a fixed 1. `attn="qkv"` is Hugging Face `peft`'s GPT-2 default (targets
  c_attn, whose 3d outputs are all scaled, queries included) and is what the oracle test compares;
- the MLP vector scales the input of mlp.c_proj, i.e. after the GELU, which is the paper's l_ff and peft's
  "feedforward module" rule (the adapters library scales c_fc's output before the activation instead);
- the scale multiplies the layer output including its bias (peft does the same);
- unmerge divides by the vectors, so it refuses when an entry is 0 (peft adds 1e-8 and warns instead);
- the vectors take the dtype and device of the weight they scale (as peft), so merge and unmerge round
  only once, in the model's own precision: in float64 unmerge restores W0 up to float64 rounding.

`count_ia3(config, attn)` is the trainable count as a formula of the GPTConfig.

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch2_additive/ia3.py
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from minimal.hooks import Hooks
from minimal.peft import Mergeable, find_linears, freeze_base, replace_module

if TYPE_CHECKING:
    from minimal.gpt import GPT, GPTConfig

ATTN_SCOPES = ("kv", "qkv")


class IA3Linear(Mergeable):
    """Wraps an nn.Linear: scales its output (mode "output") or its input (mode "input") by a vector.

    In output mode the first `fixed` outputs keep the scale 1 (the query third of c_attn for attn="kv").
    """

    def __init__(self, base: nn.Linear, mode: str = "output", fixed: int = 0) -> None:
        super().__init__(base)
        if mode not in ("output", "input"):
            raise ValueError(f"mode must be 'output' or 'input', got {mode!r}")
        size = base.out_features if mode == "output" else base.in_features
        if not 0 <= fixed < size or (mode == "input" and fixed):
            raise ValueError(f"fixed must be in [0, {size}) in output mode and 0 in input mode, got {fixed}")
        self.mode, self.fixed = mode, fixed
        w = base.weight
        self.scale = nn.Parameter(torch.ones(size - fixed, dtype=w.dtype, device=w.device))  # l, ones at init

    def vector(self) -> torch.Tensor:
        """The full scale over the outputs [out] or the inputs [in]: 1 for the fixed entries, then l."""
        ones = self.scale.new_ones(self.fixed)
        return torch.cat([ones, self.scale])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.mode == "output":
            return self.base(x) * self.vector()  # [..., out]
        return self.base(x * self.vector())  # [..., out]

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise ValueError("IA3Linear is already merged; unmerge() before merging again")
        self._rescale(self.vector(), torch.mul)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise ValueError("IA3Linear is not merged; nothing to unmerge")
        vec = self.vector()
        if bool((vec == 0).any()):
            raise ValueError("cannot unmerge (IA)^3: a scale entry is 0, so the original weight is lost")
        self._rescale(vec, torch.div)
        self.merged = False

    def _rescale(self, vec: torch.Tensor, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """W <- op(W, l) on the rows (output mode, bias too) or the columns (input mode); op is mul or div."""
        w, b = self.base.weight, self.base.bias
        if self.mode == "output":
            w.copy_(op(w, vec.unsqueeze(1).to(w.dtype)))  # rows of W [out, in]
            if b is not None:
                b.copy_(op(b, vec.to(b.dtype)))
        else:
            w.copy_(op(w, vec.unsqueeze(0).to(w.dtype)))  # columns of W [out, in]


def apply_ia3(model: GPT, attn: str = "kv") -> Hooks:
    """Freeze `model`; wrap every attn.c_attn (output scale) and mlp.c_proj (input scale) with a ones vector.

    Works on any module with GPT-2's layer names. Every wrapper is built (and every target found) before the
    model changes.
    """
    if attn not in ATTN_SCOPES:
        raise ValueError(f"attn must be one of {ATTN_SCOPES}, got {attn!r}")
    if any(isinstance(m, IA3Linear) for m in model.modules()):
        raise ValueError("this model already has (IA)^3 vectors; unload them first (minimal.peft.unload)")
    built = []
    for name in find_linears(model, ["attn.c_attn"]):
        lin = model.get_submodule(name)
        fixed = lin.out_features // 3 if attn == "kv" else 0  # the query third of c_attn (q | k | v) keeps 1
        built.append((name, IA3Linear(lin, "output", fixed)))
    built += [(n, IA3Linear(model.get_submodule(n), "input")) for n in find_linears(model, ["mlp.c_proj"])]
    freeze_base(model)
    for name, module in built:
        replace_module(model, name, module)
    return Hooks()


def count_ia3(config: GPTConfig, attn: str = "kv") -> int:
    """L (d + d + 4d) = 6Ld for the paper's k, v and ff vectors; 7Ld when queries are scaled too."""
    if attn not in ATTN_SCOPES:
        raise ValueError(f"attn must be one of {ATTN_SCOPES}, got {attn!r}")
    return config.n_layer * config.n_embd * (6 if attn == "kv" else 7)
