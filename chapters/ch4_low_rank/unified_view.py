"""A unified view of parameter-efficient tuning: parallel adapters, prefix tuning as gated attention, MAM.

Paper: Junxian He, Chunting Zhou, Xuezhe Ma, Taylor Berg-Kirkpatrick, Graham Neubig, "Towards a Unified
View of Parameter-Efficient Transfer Learning", ICLR 2022, arXiv 2110.04366.

Idea: adapters, prefix tuning and LoRA all add a learned modification dh to some hidden state h; they
differ in the function that computes dh, what it reads, where it is added and how it is scaled. Taking the
best choice on each axis gives the "mix-and-match" (MAM) adapter.

    parallel adapter (PA)      h <- h + s * f(x W_down) W_up       x = the sublayer's input, f = ReLU
    scaled PA                  the same with s = 4 (plain PA: s = 1)
    prefix tuning, one head    softmax(q [P_k; K]^T / sqrt(hd)) [P_v; V]
                                 = (1 - lam) softmax(q K^T / sqrt(hd)) V + lam softmax(q P_k^T / sqrt(hd)) P_v
                               lam = sum_i e^{a_i} / (sum_i e^{a_i} + sum_j e^{b_j}),
                               a_i = q P_k,i / sqrt(hd) (prefix scores),  b_j = q K_j / sqrt(hd)
                               i.e. a parallel adapter on attention with f = softmax, gated by lam
    MAM adapter                prefix tuning (l slots per layer) on attention + scaled PA on the MLP

`gated_prefix_attention` computes the right-hand side and `prefix_attention` the left-hand side; the tests
check the identity, also against the GPT's own attention with a prefix.

What trains: PA: the adapter of every block, L (2 r d + r + d) numbers (weights and biases); MAM: the
prefix, 2 l d L numbers (l = n_tokens), plus the PA on the MLP. Everything else is frozen.

Choices (where the paper leaves the details open):
- the PA sits beside the whole sublayer: `where="mlp"` reads ln_2(x) (the MLP's input) and adds to the MLP's
  output, `where="attn"` does the same around attention; it is attached with a forward hook on the
  sublayer module, so module names (and other methods' targets) do not change;
- init: W_down as nn.Linear's default, W_up = b_up = 0 (identity at init); prefix tuning is not identity
  at init (lam > 0 whenever l > 0);
- the MAM prefix is trained directly (no MLP reparameterisation) and starts from the frozen model's own
  keys/values on l random tokens; like `minimal.gpt`'s convention for prefixes the real tokens take
  positions l..l+T-1, so l + T must fit in block_size.

dtype and device: the adapters and the prefix take those of the model's embedding weight. The methods use
GPT's extension points (the blocks' `attn`/`mlp` sublayers, `forward(prefix_kv=..., position_offset=...)`
and the returned `cache`) without importing the class. `count_parallel_adapter`, `count_scaled_parallel_adapter`
and `count_mam_adapter` are the trainable counts as formulas of the GPT config.

Copy: minimal/hooks.py, minimal/peft.py, minimal/gpt.py, chapters/ch4_low_rank/unified_view.py
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

ACTIVATIONS = {"relu": nn.ReLU, "gelu": lambda: nn.GELU(approximate="tanh"), "identity": nn.Identity}
PLACES = ("mlp", "attn")


# ------------------------------------------------------------------------------------------ prefix = gated attention


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    """q [..., T, hd], k [..., S, hd] -> scaled scores [..., T, S]; causal aligns the last T keys to queries."""
    att = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [..., T, S]
    if causal:
        T, S = att.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)  # [T, S]
        att = att.masked_fill(~mask, float("-inf"))
    return att


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
                     causal: bool = True) -> torch.Tensor:
    """One softmax over [P_k; K]: the prefix-tuning attention. pk, pv [..., l, hd] -> [..., T, hd]."""
    att = torch.cat([_scores(q, pk, causal=False), _scores(q, k, causal)], dim=-1)  # [..., T, l + S]
    return att.softmax(dim=-1) @ torch.cat([pv, v], dim=-2)  # [..., T, hd]


def gated_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
                           causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - lam) attn(q, K, V) + lam attn(q, P_k, P_v), two separate softmaxes; returns (out, lam [..., T, 1])."""
    s_x, s_p = _scores(q, k, causal), _scores(q, pk, causal=False)  # [..., T, S], [..., T, l]
    lse_x, lse_p = s_x.logsumexp(-1, keepdim=True), s_p.logsumexp(-1, keepdim=True)  # log of each softmax mass
    lam = torch.sigmoid(lse_p - lse_x)  # e^lse_p / (e^lse_p + e^lse_x): [..., T, 1]
    h_x = s_x.softmax(-1) @ v  # the unchanged attention: [..., T, hd]
    h_p = s_p.softmax(-1) @ pv  # the "adapter": f = softmax, W_down = P_k^T, W_up = P_v: [..., T, hd]
    return (1 - lam) * h_x + lam * h_p, lam


# ------------------------------------------------------------------------------------------ parallel adapters


class ParallelAdapter(nn.Module):
    """x [..., d] -> s * up(f(down(x))) [..., d], added beside a sublayer that also reads x."""

    def __init__(self, d: int, r: int, scale: float = 1.0, activation: str = "relu",
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.scale = float(scale)
        self.down = nn.Linear(d, r, device=device, dtype=dtype)  # W_down [r, d]
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(r, d, device=device, dtype=dtype)  # W_up [d, r]
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.act(self.down(x)))  # [..., d]


def _add_parallel(module: nn.Module, inputs: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
    """Forward hook on a sublayer: add its parallel adapter, which reads the sublayer's input."""
    delta = module.parallel_adapter(inputs[0])  # [B, T, d]
    if isinstance(output, tuple):  # attention returns (output, cache)
        return (output[0] + delta, *output[1:])
    return output + delta


def build_parallel_adapters(model: GPT, bottleneck: int, scale: float, where: str = "mlp",
                            activation: str = "relu") -> list[tuple[nn.Module, ParallelAdapter]]:
    """Check the arguments and build one ParallelAdapter per block; the model is not changed here."""
    if not hasattr(model, "h") or not hasattr(model, "config"):
        raise TypeError(f"parallel adapters need a GPT (blocks model.h and model.config), got {type(model).__name__}")
    if where not in PLACES:
        raise ValueError(f"unknown place {where!r}; choose one of {PLACES}")
    d = model.config.n_embd
    if not isinstance(bottleneck, int) or isinstance(bottleneck, bool) or not 0 < bottleneck <= d:
        raise ValueError(f"bottleneck must be an int in [1, n_embd={d}], got {bottleneck!r}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    sublayers = [getattr(block, where) for block in model.h]
    if any(hasattr(s, "parallel_adapter") for s in sublayers):
        raise ValueError(f"the {where} sublayers already have a parallel adapter")
    w = model.wte.weight
    return [(sub, ParallelAdapter(d, bottleneck, scale, activation, w.device, w.dtype)) for sub in sublayers]


def attach_parallel_adapters(built: list[tuple[nn.Module, ParallelAdapter]]) -> None:
    """Put each adapter on its sublayer and add its output there with a forward hook."""
    for sub, adapter in built:
        sub.parallel_adapter = adapter
        sub.parallel_handle = sub.register_forward_hook(_add_parallel)


def apply_parallel_adapter(model: GPT, bottleneck: int = 16, scale: float = 1.0, where: str = "mlp",
                           activation: str = "relu") -> Hooks:
    """Freeze `model` and add a parallel adapter (plain: s = 1) beside the MLP (or attention) of every block."""
    built = build_parallel_adapters(model, bottleneck, scale, where, activation)  # validates, changes nothing
    freeze_base(model)
    attach_parallel_adapters(built)
    return Hooks()


def apply_scaled_parallel_adapter(model: GPT, bottleneck: int = 16, scale: float = 4.0, where: str = "mlp",
                                  activation: str = "relu") -> Hooks:
    """The scaled PA: a parallel adapter whose output is multiplied by a fixed s (paper: 4)."""
    return apply_parallel_adapter(model, bottleneck, scale, where, activation)


def count_parallel_adapter(config: GPTConfig, bottleneck: int = 16) -> int:
    """Trainable entries after apply_parallel_adapter: L (2 r d + r + d), down and up weights and biases."""
    d, r = config.n_embd, bottleneck
    return config.n_layer * (2 * r * d + r + d)


def count_scaled_parallel_adapter(config: GPTConfig, bottleneck: int = 16) -> int:
    """Trainable entries after apply_scaled_parallel_adapter: the same as the plain PA (s is fixed)."""
    return count_parallel_adapter(config, bottleneck)


# ------------------------------------------------------------------------------------------ MAM adapter


class Prefix(nn.Module):
    """l trainable key/value slots per layer, kv [L, 2, H, l, hd], handed to GPT.forward by a pre-hook."""

    def __init__(self, kv: torch.Tensor) -> None:
        super().__init__()
        self.kv = nn.Parameter(kv)  # [L, 2, H, l, hd]
        self.handle = None

    def layers(self) -> list[KV]:
        return [(layer[0].unsqueeze(0), layer[1].unsqueeze(0)) for layer in self.kv]  # each [1, H, l, hd]

    def pass_prefix(self, model: GPT, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("prefix_kv") is not None:
            raise ValueError("the MAM adapter supplies prefix_kv itself; do not pass another one")
        kwargs["prefix_kv"] = self.layers()
        kwargs["position_offset"] = kwargs.get("position_offset", 0) + self.kv.shape[3]
        return args, kwargs


def apply_mam_adapter(model: GPT, n_tokens: int = 10, bottleneck: int = 16, scale: float = 4.0,
                      seed: int = 0) -> Hooks:
    """Freeze `model`; add prefix tuning (n_tokens slots per layer) and a scaled PA beside every MLP."""
    if not hasattr(model, "h") or not hasattr(model, "config"):
        raise TypeError(f"the MAM adapter needs a GPT (blocks model.h and model.config), got {type(model).__name__}")
    if hasattr(model, "mam_prefix"):
        raise ValueError("this model already has a MAM prefix")
    c = model.config
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or not 0 < n_tokens < c.block_size:
        raise ValueError(f"n_tokens must be an int in [1, block_size={c.block_size}), got {n_tokens!r}")
    built = build_parallel_adapters(model, bottleneck, scale, "mlp")  # validates, changes nothing
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, c.vocab_size, (1, n_tokens), generator=g).to(model.wte.weight.device)  # [1, l]
    with torch.no_grad():
        cache = model(ids).cache  # per layer (k, v) [1, H, l, hd]: the frozen model's own, in its dtype
    kv = torch.stack([torch.cat([k, v]) for k, v in cache])  # [L, 2, H, l, hd]
    freeze_base(model)
    attach_parallel_adapters(built)
    model.mam_prefix = Prefix(kv.clone())
    model.mam_prefix.handle = model.register_forward_pre_hook(model.mam_prefix.pass_prefix, with_kwargs=True)
    return Hooks()


def count_mam_adapter(config: GPTConfig, n_tokens: int = 10, bottleneck: int = 16) -> int:
    """Trainable entries after apply_mam_adapter: 2 l d L (prefix keys and values) + the PA on every MLP."""
    return 2 * n_tokens * config.n_embd * config.n_layer + count_parallel_adapter(config, bottleneck)
