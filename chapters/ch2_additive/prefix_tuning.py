"""Prefix tuning: learn per-layer keys and values that every real token can attend to.

Paper: Xiang Lisa Li, Percy Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
ACL 2021, arXiv 2101.00190 (code: XiangLi1999/PrefixTuning).

Idea: give each attention layer P extra key/value slots, already in the projected K/V space, placed before
the real tokens. The frozen model is steered through what its attention reads; nothing else changes.

In layer l, with real keys/values K, V [H, T, hd] and the prefix K^P_l, V^P_l [H, P, hd]:

    K' = [K^P_l ; K],   V' = [V^P_l ; V]
    attn(q_t) = softmax(q_t K'^T / sqrt(hd)) V'     q_t sees all P prefix slots and the real keys <= t

Reparameterisation (training only): the prefix is produced by an MLP from a small table,

    flat = W_2 tanh(W_1 E + b_1) + b_2        E [P, d] -> [P, mid] -> [P, 2 L d]

and after training `consolidate()` evaluates it once, stores flat [P, 2Ld] and drops E and the MLP.

What trains: with the MLP, P d + (d mid + mid) + (mid 2Ld + 2Ld); stored (or trained directly without the
MLP): 2 P L d. The language model stays frozen.

Choices (the paper leaves these open or its released code differs; each says which it follows):
- positions: the prefix has no position of its own and the real tokens take positions P..P+T-1, as in the
  reference code and Hugging Face `peft` (GPT-2 counts the prefix as past keys). So P + T must fit in
  block_size. `shift_positions=False` gives the alternative (real tokens at 0..T-1);
- flat layout: index ((2 l + kv) H + h) hd + j of one prefix row (kv = 0 key, 1 value), peft's layout,
  so peft's prompt embeddings copy over unchanged;
- init: PyTorch's defaults (the paper's "random"; the table without MLP is N(0, 1) like peft's embedding),
  or "real-word" init from `init_text`: the frozen model's own keys/values on that text. Without the MLP
  they are copied; with it the MLP is regressed onto them (MSE, Adam), as the reference code does.
- no prefix dropout (the paper's default is 0);
- dtype and device: the encoder (table, or embedding and MLP) takes those of the model's embedding weight;
  it is built in float32 first, so the random init is the same for every dtype.

Mechanism: `apply_prefix_tuning` adds the encoder to the model as `model.prefix_encoder` and installs a
forward pre-hook that passes `prefix_kv` and `position_offset` on every call, including each step of
cached generation, so training, evaluation and `model.generate` work while `minimal/gpt.py` stays untouched.
Everything (arguments, init text, the real-word fit) is done before the model changes. `count_prefix_tuning`
is the trainable count as a formula of the GPTConfig.

Copy: minimal/hooks.py, minimal/peft.py, minimal/gpt.py, chapters/ch2_additive/prefix_tuning.py
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from minimal.hooks import Hooks
from minimal.peft import freeze_base

if TYPE_CHECKING:
    from minimal.gpt import GPT, KV, GPTConfig


class PrefixEncoder(nn.Module):
    """Produces the per-layer prefix keys/values: through an MLP (training) or from a stored table."""

    def __init__(self, n_tokens: int, n_layer: int, n_head: int, n_embd: int, projection: bool = True,
                 hidden: int | None = None) -> None:
        super().__init__()
        self.n_tokens, self.n_layer, self.n_head, self.n_embd = n_tokens, n_layer, n_head, n_embd
        self.projection = projection
        width = 2 * n_layer * n_embd
        if projection:
            hidden = hidden or n_embd
            self.embedding = nn.Embedding(n_tokens, n_embd)  # E [P, d]
            self.mlp = nn.Sequential(nn.Linear(n_embd, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.prefix = nn.Parameter(torch.randn(n_tokens, width))  # [P, 2Ld]
        self.shift_positions = True
        self.handle = None  # the forward pre-hook, removed by remove_prefix_tuning

    def flat(self) -> torch.Tensor:
        """The prefix as one row per virtual token: [P, 2Ld]."""
        if self.projection:
            return self.mlp(self.embedding.weight)  # [P, 2Ld]
        return self.prefix

    def kv(self) -> list[KV]:
        """Per layer (key, value), each [1, H, P, hd] (batch 1 broadcasts over the batch in attention)."""
        P, L, H = self.n_tokens, self.n_layer, self.n_head
        t = self.flat().view(P, 2 * L, H, self.n_embd // H).permute(1, 2, 0, 3)  # [2L, H, P, hd]
        return [(t[2 * i].unsqueeze(0), t[2 * i + 1].unsqueeze(0)) for i in range(L)]

    @torch.no_grad()
    def consolidate(self) -> None:
        """Evaluate the MLP once, keep its output [P, 2Ld] as the prefix, and drop E and the MLP."""
        if not self.projection:
            raise ValueError("this prefix has no reparameterisation MLP to consolidate")
        table = self.flat().detach().clone()
        del self.embedding, self.mlp
        self.prefix = nn.Parameter(table)
        self.projection = False

    def pass_prefix(self, model: GPT, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook: add prefix_kv (and the position shift) to every call of the model."""
        if kwargs.get("prefix_kv") is not None:
            raise ValueError("prefix tuning supplies prefix_kv itself; do not pass another one")
        kwargs["prefix_kv"] = self.kv()
        if self.shift_positions:
            kwargs["position_offset"] = kwargs.get("position_offset", 0) + self.n_tokens
        return args, kwargs


@torch.no_grad()
def prefix_from_tokens(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """The frozen model's own keys/values on the token sequence ids [P], in the flat layout [P, 2Ld].

    Calls `model.forward` directly, so any installed prefix hook is bypassed: this is the plain base model.
    """
    if ids.dim() != 1 or len(ids) == 0:
        raise ValueError(f"ids must be a non-empty 1-D tensor of token ids, got shape {tuple(ids.shape)}")
    cache = model.forward(ids.unsqueeze(0)).cache  # per layer (k, v), each [1, H, P, hd]
    t = torch.stack([x[0] for layer in cache for x in layer])  # [2L, H, P, hd]
    return t.permute(2, 0, 1, 3).reshape(len(ids), -1)  # [P, 2Ld]


def fit_to(encoder: PrefixEncoder, target: torch.Tensor, steps: int = 300, lr: float = 1e-3) -> float:
    """Regress the encoder's output onto target [P, 2Ld] (MSE, Adam); return the final loss."""
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = (encoder.flat() - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


def apply_prefix_tuning(
    model: GPT,
    n_tokens: int = 10,
    projection: bool = True,
    hidden: int | None = None,
    init_text: str | None = None,
    init_steps: int = 300,
    shift_positions: bool = True,
    seed: int = 0,
) -> Hooks:
    """Freeze `model`, attach a trainable prefix of n_tokens key/value slots per layer, and hook it in."""
    if not hasattr(model, "config") or not hasattr(model, "h"):
        raise TypeError(f"prefix tuning needs a GPT (model.config and blocks model.h), got {type(model).__name__}")
    if hasattr(model, "prefix_encoder"):
        raise ValueError("this model already has a prefix; call remove_prefix_tuning(model) first")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens <= 0:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    if shift_positions and n_tokens >= model.config.block_size:
        raise ValueError(f"n_tokens ({n_tokens}) leaves no position for input in block_size {model.config.block_size}")
    if hidden is not None and hidden <= 0:
        raise ValueError(f"hidden must be positive, got {hidden}")
    c, w = model.config, model.wte.weight
    torch.manual_seed(seed)
    encoder = PrefixEncoder(n_tokens, c.n_layer, c.n_head, c.n_embd, projection, hidden).to(w.device, w.dtype)
    encoder.shift_positions = shift_positions
    if init_text is not None:
        from minimal.tokenizer import get_tokenizer

        ids = get_tokenizer().encode(init_text)
        if not ids or max(ids) >= c.vocab_size:
            raise ValueError(f"init_text must be non-empty text within the model's vocabulary {c.vocab_size}")
        ids = (ids * math.ceil(n_tokens / len(ids)))[:n_tokens]  # cut, or repeat and cut, to P tokens
        target = prefix_from_tokens(model, torch.tensor(ids, device=w.device))
        if projection:
            fit_to(encoder, target, steps=init_steps)
        else:
            with torch.no_grad():
                encoder.prefix.copy_(target)
    freeze_base(model)
    model.prefix_encoder = encoder  # registered: it trains, counts and saves with the model
    encoder.handle = model.register_forward_pre_hook(encoder.pass_prefix, with_kwargs=True)
    return Hooks()


def consolidate_prefix(model: GPT) -> None:
    """After training: store the MLP's output as the prefix (2PLd numbers) and drop the MLP."""
    if not hasattr(model, "prefix_encoder"):
        raise ValueError("this model has no prefix")
    model.prefix_encoder.consolidate()


def remove_prefix_tuning(model: GPT) -> PrefixEncoder:
    """Detach the prefix (hook and parameters) and return it; the model is the plain base again."""
    if not hasattr(model, "prefix_encoder"):
        raise ValueError("this model has no prefix to remove")
    encoder = model.prefix_encoder
    encoder.handle.remove()
    del model.prefix_encoder
    return encoder


def count_prefix_tuning(config: GPTConfig, n_tokens: int = 10, projection: bool = True,
                        hidden: int | None = None) -> int:
    """The formula: P d + (d mid + mid) + (mid 2Ld + 2Ld) with the MLP, 2 P L d for the stored prefix."""
    P, L, d = n_tokens, config.n_layer, config.n_embd
    if not projection:
        return 2 * P * L * d
    m = hidden or d
    return P * d + d * m + m + m * 2 * L * d + 2 * L * d
