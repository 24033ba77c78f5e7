"""BitFit: fine-tune only the bias terms.

Paper: Ben Zaken, Ravfogel, Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models", ACL 2022 (short), arXiv 2106.10199.

Idea: freeze every weight matrix, embedding and LayerNorm gain; train only the bias vectors. A subset,
the query bias and the middle-of-MLP bias, keeps most of the benefit with about half the biases.

    y = W x + b,   W frozen, b trainable           (every nn.Linear and LayerNorm in the model)

What trains (d = n_embd, L = n_layer):
- "all": every parameter named `*.bias`: c_attn (3d), attn.c_proj (d), mlp.c_fc (4d), mlp.c_proj (d),
  ln_1 and ln_2 beta (d each) per block, plus ln_f beta: L * 11d + d entries. This matches the released
  code, which selects every parameter whose name contains "bias" (LayerNorm beta included).
- "subset": the query bias b_q and mlp.c_fc.bias: L * 5d entries. Our attention projection is fused
  (c_attn.bias = b_q | b_k | b_v, [3d]), so b_q is the first d entries of a tensor whose other 2d entries
  must stay frozen. Implementation chosen: the delta parametrisation of `minimal.sparse` (c_attn.bias =
  theta0 + M * Delta with M = the first d entries, Delta stored only there), so b_k and b_v are not
  parameters at all and the trainable count is exactly L * 5d. mlp.c_fc.bias trains as a plain parameter.

Choices: the tied LM head (= wte) stays frozen and tasks are answered with verbaliser tokens, so no new
head is added (the paper trains a new classifier head densely). Models without biases (bias=False, like
LLaMA) cannot use BitFit: that is an error, not an empty run.
Departure from the released code: the selected entries train as the value vector of a sparse delta
(`minimal.sparse`), which is 1-D and so never weight-decayed (the loop decays matrices only); with
the leaderboard's weight decay 0 the two agree.

`count_bitfit(config, variant)` is the trainable count as a formula of the GPT config; the sparse delta
takes the dtype and device of the bias it sits on.

Copy: minimal/hooks.py, minimal/peft.py, minimal/sparse.py, chapters/ch3_selective/bitfit.py
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from minimal.hooks import Hooks
from minimal.peft import freeze_base, unfreeze
from minimal.sparse import add_sparse_deltas, check_masks

if TYPE_CHECKING:
    from minimal.gpt import GPT, GPTConfig

VARIANTS = ("all", "subset")


def apply_bitfit(model: GPT, variant: str = "all") -> Hooks:
    """Freeze the model, then make the biases of `variant` ("all" or "subset") trainable.

    Every check runs before the model changes, so a bad argument leaves it as it was.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown BitFit variant {variant!r}; choose one of {VARIANTS}")
    params = dict(model.named_parameters())
    if not any(n.endswith(".bias") for n in params):
        raise ValueError("this model has no bias parameters (GPTConfig(bias=False)); BitFit needs biases")
    if variant == "all":
        freeze_base(model)
        unfreeze(model, lambda n: n.endswith(".bias"))
        return Hooks()
    d = model.config.n_embd
    query = torch.zeros(3 * d, dtype=torch.bool)  # c_attn.bias = b_q | b_k | b_v
    query[:d] = True
    masks = {f"h.{i}.attn.c_attn.bias": query.clone() for i in range(len(model.h))}
    mlp = [f"h.{i}.mlp.c_fc.bias" for i in range(len(model.h))]
    taken = [n for n in [*masks, *mlp] if n not in params]  # wrapped or re-parametrised by an earlier method
    if taken:
        raise ValueError(f"BitFit-subset needs the plain query and mlp.c_fc biases, but another method already "
                         f"adapts {taken[:2]}; apply BitFit-subset to a fresh model")
    check_masks(model, masks)
    freeze_base(model)
    for n in mlp:
        params[n].requires_grad_(True)
    add_sparse_deltas(model, masks)
    return Hooks()


def count_bitfit(config: GPTConfig, variant: str = "all") -> int:
    """The number of trainable entries by formula: L * 11d + d ("all") or L * 5d ("subset")."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown BitFit variant {variant!r}; choose one of {VARIANTS}")
    L, d = config.n_layer, config.n_embd
    return L * 11 * d + d if variant == "all" else L * 5 * d


def bias_snapshot(model: GPT) -> dict[str, torch.Tensor]:
    """Every bias as the model uses it (module.bias, parametrised or not): module name -> copy."""
    return {n: m.bias.detach().clone() for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is not None}


def relative_bias_change(model: GPT, before: dict[str, torch.Tensor]) -> dict[str, float]:
    """||b - b0|| / ||b0|| per bias (module name -> ratio): which biases moved most during fine-tuning.

    c_attn is reported as its three parts (`.q`, `.k`, `.v`). A zero b0 (a fresh init) reports ||b - b0||.
    """
    now = bias_snapshot(model)
    if set(now) != set(before):
        raise ValueError("the snapshot was taken from a model with other bias modules")
    d = model.config.n_embd
    out = {}
    for name, b0 in before.items():
        parts = [("", b0, now[name])]
        if name.endswith("c_attn"):
            parts = list(zip("qkv", b0.split(d), now[name].split(d), strict=True))
        for tag, old, new in parts:
            change, size = (new - old).norm().item(), old.norm().item()
            out[f"{name}.{tag}" if tag else name] = change / size if size > 0 else change
    return out
