"""AdapterFusion: learn, per layer and per token, how to mix adapters trained on other tasks.

Paper: Jonas Pfeiffer, Aishwarya Kamath, Andreas Rücklé, Kyunghyun Cho, Iryna Gurevych, "AdapterFusion:
Non-Destructive Task Composition for Transfer Learning", EACL 2021, arXiv 2005.00247 (reference
implementation: adapter-hub's adapters library, `BertFusion`). Built on adapters.py: copy it with this file.

Idea, in two stages. (1) Knowledge extraction: train one Pfeiffer adapter per source task, each on its own
(the backbone frozen, so the tasks cannot overwrite each other). (2) Knowledge composition: freeze the
backbone and every adapter; learn a small attention that reads the sublayer output and decides how much
of each adapter's output to use, for the target task.

At layer l, with f = mlp(ln_2(x)) [B, T, d] and the N adapters' outputs u_n = W_up^n ReLU(W_down^n f + b) + b':

    q   = f Q + b_Q                  [B, T, d]
    k_n = u_n K + b_K                [B, T, N, d]
    v_n = u_n V                      [B, T, N, d]     (no bias)
    s   = softmax_n(q . k_n / temp)  [B, T, N]        the fusion weights, per token
    x  <- x + f + sum_n s_n v_n

What trains in stage 2: Q, K (d^2 + d each) and V (d^2) in every layer: L (3d^2 + 2d) numbers.

Choices (where the paper, written for post-LN BERT, leaves the GPT version open):
- pre-LN mapping of the post-LN original: the query is the MLP output f, keys/values the adapters' deltas,
  and the residual f is added after mixing (the reference code's `residual_before=False`); so with N = 1
  and V = I the fused model is exactly the single-adapter model of adapters.py (`apply_pfeiffer`);
- init as the reference code: Q, K ~ N(0, 0.02^2), biases 0; V = identity with 1e-6 off the diagonal
  (`value_offdiag=0` gives the exact identity); temperature fixed (the optional annealing from 50 is
  not implemented);
- the reference code's regulariser `value_reg * sum_l ||I - V_l||_F^2` (0.01) is on by default, as an
  extra loss through the shared training loop's hooks; `value_reg=0` turns it off;
- the fused adapters are copied into the fusion layers and frozen, so the originals are never touched;
- the fusion layers (and the fused copies) take the dtype and device of the model's embedding weight.

`count_adapter_fusion(config)` is the stage-2 trainable count as a formula of the GPTConfig. Stage 1 runs the
shared training loop (minimal/train.py), imported only by `train_source_adapter`.

Copy: minimal/hooks.py, minimal/peft.py, minimal/gpt.py, chapters/ch2_additive/adapters.py, chapters/ch2_additive/adapter_fusion.py
"""  # noqa: E501

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from chapters.ch2_additive.adapters import Adapter, apply_pfeiffer, remove_adapters
from minimal.hooks import Hooks
from minimal.peft import freeze_base

if TYPE_CHECKING:
    from minimal.gpt import GPT, GPTConfig
    from minimal.train import Batch, TrainConfig, TrainResult

AdapterSet = list[Adapter]  # one Pfeiffer adapter per layer, from stage 1


# ------------------------------------------------------------------------------------------ stage 1


def train_source_adapter(
    model: GPT,
    get_batch: Callable[[torch.Generator], Batch],
    cfg: TrainConfig,
    bottleneck: int = 8,
    init: str = "near_identity",
) -> tuple[AdapterSet, TrainResult]:
    """Stage 1 for one source task: add Pfeiffer adapters, train them, take them out again.

    The model is left as it was (frozen backbone, identity hooks); returns the trained adapters, one per
    layer, and the training record.
    """
    from minimal.train import train  # the shared loop (tqdm): needed for stage 1 only

    apply_pfeiffer(model, bottleneck=bottleneck, init=init)
    result = train(model, get_batch, cfg, desc="adapter")
    removed = remove_adapters(model)
    adapters = [removed[f"h.{i}.mlp_out"] for i in range(len(model.h))]
    for a in adapters:
        a.requires_grad_(False)
    return adapters, result


# ------------------------------------------------------------------------------------------ stage 2


class FusionLayer(nn.Module):
    """Replaces `Block.mlp_out`: f [B, T, d] -> f + sum_n s_n V u_n over the frozen adapters' deltas u_n."""

    def __init__(self, d: int, adapters: dict[str, Adapter], temperature: float = 1.0,
                 value_offdiag: float = 1e-6, query_std: float = 0.02) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict({name: copy.deepcopy(a).requires_grad_(False) for name, a in adapters.items()})
        self.query = nn.Linear(d, d)  # Q [d, d], b_Q
        self.key = nn.Linear(d, d)  # K [d, d], b_K
        self.value = nn.Linear(d, d, bias=False)  # V [d, d]
        self.temperature = temperature
        self.last_weights: torch.Tensor | None = None  # s [B, T, N] of the latest forward, for display
        with torch.no_grad():
            for lin in (self.query, self.key):
                nn.init.normal_(lin.weight, std=query_std)
                nn.init.zeros_(lin.bias)
            self.value.weight.fill_(value_offdiag)
            self.value.weight.fill_diagonal_(1.0)

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        u = torch.stack([a.up(a.act(a.down(f))) for a in self.adapters.values()], dim=-2)  # [B, T, N, d]
        q = self.query(f)  # [B, T, d]
        k = self.key(u)  # [B, T, N, d]
        v = self.value(u)  # [B, T, N, d]
        scores = (k @ q.unsqueeze(-1)).squeeze(-1) / self.temperature  # [B, T, N]
        s = scores.softmax(dim=-1)  # [B, T, N]
        self.last_weights = s.detach()
        return f + (s.unsqueeze(-1) * v).sum(dim=-2)  # [B, T, d]


def apply_adapter_fusion(
    model: GPT,
    adapters: dict[str, AdapterSet],
    temperature: float = 1.0,
    value_reg: float = 0.01,
    value_offdiag: float = 1e-6,
) -> Hooks:
    """Stage 2: freeze `model` and the adapters (task name -> one adapter per layer); fuse them in every layer.

    Returns the hooks that add the value regulariser value_reg * sum_l ||I - V_l||_F^2 to the loss.
    """
    blocks = getattr(model, "h", None)
    if blocks is None or not all(hasattr(b, "mlp_out") for b in blocks):
        raise TypeError(f"AdapterFusion needs a GPT whose blocks have the hook mlp_out (minimal/gpt.py), "
                        f"got {type(model).__name__}")
    if not adapters:
        raise ValueError("AdapterFusion needs at least one trained adapter set (task name -> adapters per layer)")
    L, d = model.config.n_layer, model.config.n_embd
    for name, layers in adapters.items():
        if len(layers) != L:
            raise ValueError(f"adapter set {name!r} has {len(layers)} adapters, the model has {L} layers")
        for i, a in enumerate(layers):
            if not isinstance(a, Adapter):
                raise TypeError(f"adapter set {name!r}, layer {i}: expected an Adapter, got {type(a).__name__}")
            if a.down.in_features != d:
                raise ValueError(f"adapter set {name!r}, layer {i}: adapter width {a.down.in_features}, model {d}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if value_reg < 0:
        raise ValueError(f"value_reg must be >= 0, got {value_reg}")
    for i, block in enumerate(model.h):
        if not isinstance(block.mlp_out, nn.Identity):
            raise ValueError(f"h.{i}.mlp_out already holds {type(block.mlp_out).__name__}; remove it first")
    w = model.wte.weight
    built = [FusionLayer(d, {name: layers[i] for name, layers in adapters.items()}, temperature,
                         value_offdiag).to(w.device, w.dtype) for i in range(L)]
    freeze_base(model)
    for block, layer in zip(model.h, built, strict=True):
        block.mlp_out = layer
    if value_reg == 0:
        return Hooks()

    def regulariser(m: nn.Module) -> torch.Tensor:
        values = [b.mlp_out.value.weight for b in m.h]  # V_l [d, d]
        eye = torch.eye(d, dtype=values[0].dtype, device=values[0].device)
        return value_reg * sum(((eye - v) ** 2).sum() for v in values)

    return Hooks(extra_loss=regulariser)


def fusion_layers(model: GPT) -> list[FusionLayer]:
    layers = [b.mlp_out for b in model.h if isinstance(b.mlp_out, FusionLayer)]
    if not layers:
        raise ValueError("this model has no AdapterFusion layers; call apply_adapter_fusion first")
    return layers


@torch.no_grad()
def fusion_weights(model: GPT, idx: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[list[str], torch.Tensor]:
    """The adapter names and the fusion weights [L, N]: softmax attention averaged over tokens.

    idx [B, T]; mask [B, T] (bool) chooses the tokens to average over (e.g. labels != -100), default all.
    Each row sums to 1.
    """
    layers = fusion_layers(model)
    was_training = model.training
    model.eval()
    model(idx)
    model.train(was_training)
    keep = torch.ones(idx.shape, dtype=torch.bool, device=idx.device) if mask is None else mask.bool()
    if not bool(keep.any()):
        raise ValueError("fusion_weights: the mask selects no token")
    rows = [layer.last_weights[keep].mean(dim=0) for layer in layers]  # each [N]
    return layers[0].names, torch.stack(rows)  # [L, N]


def count_adapter_fusion(config: GPTConfig) -> int:
    """Stage-2 trainable count: L (3d^2 + 2d) (Q and K with biases, V without), whatever the number of adapters."""
    return config.n_layer * (3 * config.n_embd**2 + 2 * config.n_embd)
