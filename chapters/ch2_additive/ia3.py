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
- unmerge divides by the vectors, so it refuses when an entry is 0 (peft adds 1e-8 and warns instead).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minimal.gpt import GPT
from minimal.hooks import Hooks
from minimal.peft import Mergeable, freeze, inject

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
        self.scale = nn.Parameter(torch.ones(size - fixed, device=base.weight.device))  # l, ones at init

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
        self._rescale(self.vector())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise ValueError("IA3Linear is not merged; nothing to unmerge")
        vec = self.vector()
        if bool((vec == 0).any()):
            raise ValueError("cannot unmerge (IA)^3: a scale entry is 0, so the original weight is lost")
        self._rescale(1.0 / vec)
        self.merged = False

    def _rescale(self, vec: torch.Tensor) -> None:
        if self.mode == "output":
            self.base.weight.mul_(vec.unsqueeze(1).to(self.base.weight.dtype))  # rows of W [out, in]
            if self.base.bias is not None:
                self.base.bias.mul_(vec.to(self.base.bias.dtype))
        else:
            self.base.weight.mul_(vec.unsqueeze(0).to(self.base.weight.dtype))  # columns of W [out, in]


def apply_ia3(model: GPT, attn: str = "kv") -> Hooks:
    """Freeze `model`; wrap every attn.c_attn (output scale) and mlp.c_proj (input scale) with a ones vector."""
    if not isinstance(model, GPT):
        raise TypeError(f"(IA)^3 needs a minimal.gpt.GPT, got {type(model).__name__}")
    if attn not in ATTN_SCOPES:
        raise ValueError(f"attn must be one of {ATTN_SCOPES}, got {attn!r}")
    if any(isinstance(m, IA3Linear) for m in model.modules()):
        raise ValueError("this model already has (IA)^3 vectors; unload them first (minimal.peft.unload)")
    d = model.config.n_embd
    freeze(model)
    inject(model, ["attn.c_attn"], lambda lin: IA3Linear(lin, "output", fixed=d if attn == "kv" else 0))
    inject(model, ["mlp.c_proj"], lambda lin: IA3Linear(lin, "input"))
    return Hooks()


def n_trainable(n_layer: int, n_embd: int, attn: str = "kv") -> int:
    """L (d + d + 4d) = 6Ld for the paper's k, v and ff vectors; 7Ld when queries are scaled too."""
    if attn not in ATTN_SCOPES:
        raise ValueError(f"attn must be one of {ATTN_SCOPES}, got {attn!r}")
    return n_layer * n_embd * (6 if attn == "kv" else 7)
