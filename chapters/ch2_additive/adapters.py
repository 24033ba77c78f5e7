"""Bottleneck adapters: small residual MLPs inserted into every block of a frozen model.

Papers:
- Neil Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019, arXiv 1902.00751
  (code: google-research/adapter-bert). Two adapters per block, LayerNorms trained too.
- Jonas Pfeiffer et al., "AdapterFusion: Non-Destructive Task Composition for Transfer Learning",
  EACL 2021, arXiv 2005.00247. The single-adapter placement (after the feed-forward sublayer only).

Idea: a bottleneck of width m << d, added residually to a sublayer's output, learns the task while every
pretrained weight stays fixed; with a (near-)zero up-projection it starts as (almost) the identity.

    Adapter(h) = h + W_up act(W_down h + b_down) + b_up      W_down [m, d], W_up [d, m]

Placement in the pre-LN GPT (BERT is post-LN; as in the paper, each adapter reads a sublayer's output
before it joins the residual stream), through the identity hooks `Block.attn_out` and `Block.mlp_out`:

    Houlsby:   x <- x + A1(attn(ln_1(x)));   x <- x + A2(mlp(ln_2(x)))       act = GELU
    Pfeiffer:  x <- x + A(mlp(ln_2(x)))                                      act = ReLU

What trains: the adapters, L (2md + m + d) numbers per adapter position, so 2L(2md + m + d) for Houlsby
and L(2md + m + d) for Pfeiffer. Houlsby also trains every LayerNorm (ln_1, ln_2, ln_f: 4Ld + 2d) as in
the paper; Pfeiffer trains the adapters only (`train_layernorm` switches either way). The tied head stays
frozen: our tasks are next-token prediction, so there is no new classifier head to train.

Choices:
- init "near_identity" (default, the official code): both projections truncated normal, std 1e-3, cut at
  2 std, biases zero; the output moves by a tiny amount at init. "zero": W_up = b_up = 0 and W_down keeps
  nn.Linear's default init, so the model is exactly the base at init (the paper notes far-from-identity
  initialisations fail to train);
- the Pfeiffer adapter reads the sublayer output f (x <- x + f + A'(f)), the same hook as Houlsby's second
  adapter, not the adapters library's (x + f) input;
- the adapters take the dtype and device of the model's embedding weight.

`build_adapters` checks everything and builds the adapters without touching the model; `insert_adapters`
then freezes the base and puts them in (SparseAdapter and AdapterFusion reuse both). `count_houlsby` and
`count_pfeiffer` are the trainable counts as formulas of the GPTConfig.

Copy: minimal/hooks.py, minimal/peft.py, minimal/gpt.py, chapters/ch2_additive/adapters.py
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from minimal.hooks import Hooks
from minimal.peft import freeze_base, replace_module, unfreeze

if TYPE_CHECKING:
    from minimal.gpt import GPT, GPTConfig

PLACEMENTS = {"houlsby": ("attn_out", "mlp_out"), "pfeiffer": ("mlp_out",)}
ACTIVATIONS = {"gelu": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU}
INITS = ("near_identity", "zero")


class Adapter(nn.Module):
    """h [..., d] -> h + up(act(down(h))): a residual bottleneck of width m."""

    def __init__(self, d: int, m: int, activation: str = "gelu", init: str = "near_identity") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.down = nn.Linear(d, m)  # W_down [m, d]
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(m, d)  # W_up [d, m]
        self.reset(init)

    @torch.no_grad()
    def reset(self, init: str) -> None:
        if init == "near_identity":
            for lin in (self.down, self.up):
                nn.init.trunc_normal_(lin.weight, std=1e-3, a=-2e-3, b=2e-3)
                nn.init.zeros_(lin.bias)
        elif init == "zero":
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        else:
            raise ValueError(f"unknown adapter init {init!r}; choose one of {INITS}")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))  # [..., d]


def build_adapters(
    model: GPT,
    bottleneck: int = 8,
    placement: str = "houlsby",
    activation: str | None = None,
    init: str = "near_identity",
) -> dict[str, Adapter]:
    """Check the arguments and the model; return the new adapters by hook name ("h.0.attn_out", ...).

    Built in float32 (so the random init is the same for every dtype), then cast to the model's dtype and
    device. The model is not changed.
    """
    blocks = getattr(model, "h", None)
    if blocks is None or not all(hasattr(b, "attn_out") and hasattr(b, "mlp_out") for b in blocks):
        raise TypeError(f"adapters need a GPT whose blocks have the hooks attn_out and mlp_out (minimal/gpt.py), "
                        f"got {type(model).__name__}")
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown adapter placement {placement!r}; choose one of {sorted(PLACEMENTS)}")
    d = model.config.n_embd
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or not 0 < bottleneck <= d:
        raise ValueError(f"bottleneck must be an int in [1, n_embd={d}], got {bottleneck!r}")
    if init not in INITS:
        raise ValueError(f"unknown adapter init {init!r}; choose one of {INITS}")
    activation = activation or ("gelu" if placement == "houlsby" else "relu")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    for i, block in enumerate(blocks):
        for hook in ("attn_out", "mlp_out"):
            if not isinstance(getattr(block, hook), nn.Identity):
                raise ValueError(f"h.{i}.{hook} already holds {type(getattr(block, hook)).__name__}; "
                                 "call remove_adapters(model) first")
    w = model.wte.weight
    return {f"h.{i}.{hook}": Adapter(d, bottleneck, activation, init).to(device=w.device, dtype=w.dtype)
            for i in range(len(blocks)) for hook in PLACEMENTS[placement]}


def insert_adapters(model: GPT, adapters: dict[str, Adapter], train_layernorm: bool) -> None:
    """Freeze the base (see minimal.peft.freeze_base), put each adapter in its hook, unfreeze the LayerNorms."""
    freeze_base(model)
    for name, adapter in adapters.items():
        replace_module(model, name, adapter)
    if train_layernorm:
        unfreeze(model, lambda n: ".ln_" in n or n.startswith("ln_f."))


def apply_adapters(
    model: GPT,
    bottleneck: int = 8,
    placement: str = "houlsby",
    activation: str | None = None,
    init: str = "near_identity",
    train_layernorm: bool | None = None,
) -> Hooks:
    """Freeze `model` and put a trainable adapter at each placement hook of every block.

    placement "houlsby" (after attention and after the MLP; GELU; LayerNorms train by default) or
    "pfeiffer" (after the MLP only; ReLU; adapters only by default).
    """
    adapters = build_adapters(model, bottleneck, placement, activation, init)  # validates; the model is unchanged
    insert_adapters(model, adapters, placement == "houlsby" if train_layernorm is None else train_layernorm)
    return Hooks()


def apply_houlsby(model: GPT, bottleneck: int = 8, init: str = "near_identity",
                  train_layernorm: bool = True) -> Hooks:
    return apply_adapters(model, bottleneck, "houlsby", init=init, train_layernorm=train_layernorm)


def apply_pfeiffer(model: GPT, bottleneck: int = 8, init: str = "near_identity",
                   train_layernorm: bool = False) -> Hooks:
    return apply_adapters(model, bottleneck, "pfeiffer", init=init, train_layernorm=train_layernorm)


def remove_adapters(model: GPT) -> dict[str, Adapter]:
    """Put the identity hooks back; return the removed adapters by name (e.g. "h.0.mlp_out")."""
    removed = {}
    for i, block in enumerate(model.h):
        for hook in ("attn_out", "mlp_out"):
            if isinstance(getattr(block, hook), Adapter):
                removed[f"h.{i}.{hook}"] = getattr(block, hook)
                setattr(block, hook, nn.Identity())
    if not removed:
        raise ValueError("this model has no adapters to remove")
    return removed


def count_adapters(config: GPTConfig, bottleneck: int = 8, placement: str = "houlsby",
                   train_layernorm: bool | None = None) -> int:
    """n L (2md + m + d) for n adapters per block (2 Houlsby, 1 Pfeiffer), plus ln_1, ln_2 of every block and
    ln_f when the LayerNorms train (Houlsby's default): 4Ld + 2d (2Ld + d without biases)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown adapter placement {placement!r}; choose one of {sorted(PLACEMENTS)}")
    L, d, m = config.n_layer, config.n_embd, bottleneck
    layernorms = (2 * L + 1) * (2 * d if config.bias else d)
    train_layernorm = placement == "houlsby" if train_layernorm is None else train_layernorm
    return len(PLACEMENTS[placement]) * L * (2 * m * d + m + d) + (layernorms if train_layernorm else 0)


def count_houlsby(config: GPTConfig, bottleneck: int = 8, train_layernorm: bool = True) -> int:
    """2L (2md + m + d) + 4Ld + 2d: two adapters per block and every LayerNorm."""
    return count_adapters(config, bottleneck, "houlsby", train_layernorm)


def count_pfeiffer(config: GPTConfig, bottleneck: int = 8, train_layernorm: bool = False) -> int:
    """L (2md + m + d): one adapter per block, after the MLP."""
    return count_adapters(config, bottleneck, "pfeiffer", train_layernorm)
