"""PaFi and HiWi: parameter-efficient fine-tuning that adds no inference latency.

Paper: Liao, Meng, Monz, "Parameter-Efficient Fine-Tuning without Introducing New Latency", ACL 2023,
arXiv 2305.16742.

PaFi. Train only the pretrained weights of *smallest* magnitude. The mask depends on theta0 alone, so
it needs no data and one mask serves every task (store the indices once, then values per task):

    M_i = 1  iff  |theta0_i| is among the k smallest over the eligible entries      (ties: lower index)
    theta = theta0 + M * Delta,   only Delta trains,   k = floor(rho * Phi)

(The mirror image of magnitude pruning: the lottery ticket keeps the large weights, PaFi trains the
small ones, whose change matters least to the pretrained function.)

HiWi. An adapter applied to parameters instead of hidden states: a pretrained tensor is fed through a
small bottleneck network whose output is added to it; the forward pass uses the adapted tensor.

    A(z) = W_up ReLU(W_down z + c) + c'          W_down [r, n], W_up [n, r], W_up = 0 and c' = 0 at init
    bias variant:    b' = b + A(b)               b = mlp.c_fc.bias [4d] (n = 4d)
    weight variant:  W' = W + A(W) row-wise      each row of mlp.c_fc.weight [4d, d] is one input z (n = d)
                     ("col": each column, n = 4d)

After training `merge_hiwi` computes b' (or W') once and drops the adapter: the model is again exactly
the base architecture (same modules, parameter names and shapes), so inference costs what the base
model costs and a task stores only the adapted tensor, whatever r was.

What trains: PaFi, exactly k entries of the block weight matrices (c_attn, attn.c_proj, c_fc,
mlp.c_proj; biases with include_biases=True). HiWi, the adapter parameters only (2 r n + r + n per
adapted tensor); the base tensor itself is frozen and only read.

Choices (the released code was not available, so these are our interpretations): PaFi's
eligible set is the block weight matrices, without embeddings and LayerNorm, the budget a fraction of
all parameters, ties broken by index; it trains with the delta parametrisation of `minimal.sparse`, so
unselected entries stay bitwise theta0 and `merge_sparse_deltas` restores plain tensors. HiWi adapts
mlp.c_fc.bias by default (the variant that matches the paper's 0.03% storage figure), one adapter per
layer and per tensor (not shared across layers), row-wise for weights; mlp.c_proj.bias and both MLP
weights can be chosen. It is a `torch.nn.utils.parametrize` parametrisation, so the adapted tensor is
recomputed from the frozen base tensor at every forward pass and merging removes every trace of it.
Our head is the tied wte, which stays frozen (tasks use verbaliser tokens).
Departure from the released code: the selected entries train as the value vector of a sparse delta
(`minimal.sparse`), which is 1-D and so never weight-decayed (the loop decays matrices only); with
the leaderboard's weight decay 0 the two agree.
Every check runs before the model changes. The PaFi deltas and the HiWi adapters take the dtype and device
of the tensor they adapt; `count_pafi(config, fraction)` and `count_hiwi(config, r, tensors, axis)` are the
trainable counts by formula.

Copy: minimal/hooks.py, minimal/peft.py, minimal/sparse.py, chapters/ch3_selective/pafi_hiwi.py
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from minimal.hooks import Hooks
from minimal.peft import freeze_base
from minimal.sparse import Masks, add_sparse_deltas, budget, sparse_deltas

if TYPE_CHECKING:
    from minimal.gpt import GPT, GPTConfig

# ------------------------------------------------------------------------------------------ PaFi

BLOCK_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BLOCK_BIASES = ("attn.c_attn.bias", "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias")


def pafi_eligible(model: GPT, include_biases: bool = False) -> list[str]:
    """The block linear weights (and their biases): the entries PaFi may train, in model order."""
    suffixes = BLOCK_WEIGHTS + (BLOCK_BIASES if include_biases else ())
    return [n for n, _ in model.named_parameters() if n.startswith("h.") and n.endswith(suffixes)]


@torch.no_grad()
def pafi_mask(model: GPT, fraction: float = 0.005, include_biases: bool = False) -> Masks:
    """The k = floor(fraction * Phi) eligible entries of smallest |theta0| (ties: the lower flat index).

    A function of the pretrained weights alone, so every task gets the same mask.
    """
    params = dict(model.named_parameters())
    names = pafi_eligible(model, include_biases)
    if not names:
        raise ValueError("the model has no block linear weights for PaFi to select from")
    k = budget(fraction, sum(p.numel() for p in params.values()))
    flat = torch.cat([params[n].detach().reshape(-1).abs().float() for n in names])  # [n_eligible]
    if k > flat.numel():
        raise ValueError(f"fraction {fraction} asks for {k} entries but only {flat.numel()} are eligible")
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[torch.sort(flat, stable=True).indices[:k]] = True  # stable: equal magnitudes -> lower index first
    masks, start = {}, 0
    for n in names:
        masks[n] = chosen[start:start + params[n].numel()].view(params[n].shape)
        start += params[n].numel()
    return masks


def apply_pafi(model: GPT, fraction: float = 0.005, include_biases: bool = False) -> Hooks:
    """Freeze the model; make the smallest-magnitude block weights trainable (delta parametrisation)."""
    if any(True for _ in sparse_deltas(model)):
        raise ValueError("the model already has sparse deltas; merge_sparse_deltas(model) first")
    mask = pafi_mask(model, fraction, include_biases)
    freeze_base(model)
    add_sparse_deltas(model, mask)
    return Hooks()


def count_pafi(config: GPTConfig, fraction: float = 0.005) -> int:
    """k = floor(fraction * Phi), Phi = V d + T d + L (12 d^2 + 13 d) + 2 d (every parameter of the GPT)."""
    V, T, L, d = config.vocab_size, config.block_size, config.n_layer, config.n_embd
    return int(fraction * (V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d))


# ------------------------------------------------------------------------------------------ HiWi

HIWI_TENSORS = ("mlp.c_fc.bias", "mlp.c_fc.weight", "mlp.c_proj.bias", "mlp.c_proj.weight")
AXES = ("row", "col")


class WeightAdapter(nn.Module):
    """The parametrisation z -> z + W_up ReLU(W_down z + c) + c', applied to the vectors of a tensor.

    A bias [n] is one vector; a weight [out, in] is `out` row vectors of length `in` ("row") or `in`
    column vectors of length `out` ("col"). Zero at init (W_up = 0, c' = 0), so z' = z.
    """

    def __init__(self, shape: torch.Size, r: int, axis: str = "row") -> None:
        super().__init__()
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        self.transpose = len(shape) == 2 and axis == "col"
        n = shape[0] if self.transpose else shape[-1]  # length of one input vector
        if not isinstance(r, int) or not 0 < r <= n:
            raise ValueError(f"HiWi bottleneck r must be an int in [1, {n}] (the adapted vector length), got {r!r}")
        self.down = nn.Linear(n, r)  # W_down, c
        self.up = nn.Linear(r, n)  # W_up, c'
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        v = z.T if self.transpose else z  # [..., n]: one adapter input per row
        v = v + self.up(torch.relu(self.down(v)))  # [..., n]
        return v.T if self.transpose else v


def _adapted(model: GPT) -> list[tuple[str, WeightAdapter]]:
    out = []
    for module_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for attr, plist in module.parametrizations.items():
                out += [(f"{module_name}.{attr}", p) for p in plist if isinstance(p, WeightAdapter)]
    return out


def apply_hiwi(model: GPT, r: int = 8, tensors: tuple[str, ...] = ("mlp.c_fc.bias",), axis: str = "row") -> Hooks:
    """Freeze the model; put a HiWi adapter on each chosen MLP tensor of every block (only adapters train)."""
    if isinstance(tensors, str):
        raise TypeError(f"tensors must be a tuple of names, got the string {tensors!r}")
    unknown = [t for t in tensors if t not in HIWI_TENSORS]
    if unknown or not tensors:
        raise ValueError(f"unknown HiWi tensors {unknown or list(tensors)}; choose among {HIWI_TENSORS}")
    if _adapted(model):
        raise ValueError("the model already has HiWi adapters; merge_hiwi(model) first")
    params = dict(model.named_parameters())
    missing = [f"h.{i}.{t}" for i in range(len(model.h)) for t in tensors if f"h.{i}.{t}" not in params]
    if missing:
        raise ValueError(f"the model has no plain parameter {missing[:2]} (a model without biases cannot use the "
                         "bias variant, and a layer that another method wrapped cannot be adapted)")
    plan = []  # (module, attribute, adapter): built first, so bad r or axis leave the model untouched
    for block in model.h:
        for t in tensors:
            module_name, attr = t.rsplit(".", 1)
            module = block.get_submodule(module_name)
            base = getattr(module, attr)
            plan.append((module, attr, WeightAdapter(base.shape, r, axis).to(device=base.device, dtype=base.dtype)))
    freeze_base(model)
    for module, attr, adapter in plan:
        parametrize.register_parametrization(module, attr, adapter)  # the base tensor stays frozen, only read
    return Hooks()


def count_hiwi(config: GPTConfig, r: int = 8, tensors: tuple[str, ...] = ("mlp.c_fc.bias",), axis: str = "row") -> int:
    """L * sum over the adapted tensors of 2 r n + r + n, n = the length of one adapted vector."""
    d = config.n_embd
    length = {"mlp.c_fc.bias": 4 * d, "mlp.c_proj.bias": d,  # a weight [out, in]: rows have length in
              "mlp.c_fc.weight": d if axis == "row" else 4 * d, "mlp.c_proj.weight": 4 * d if axis == "row" else d}
    return config.n_layer * sum(2 * r * length[t] + r + length[t] for t in tensors)


@torch.no_grad()
def hiwi_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """What a task stores: the adapted tensors z' = z + A(z) (same shapes as the base tensors)."""
    out = {}
    for name, _ in _adapted(model):
        module_name, attr = name.rsplit(".", 1)
        out[name] = getattr(model.get_submodule(module_name), attr).detach().clone()
    return out


def merge_hiwi(model: GPT) -> int:
    """Materialise every adapted tensor into a plain parameter and drop the adapters; return how many."""
    names = [name for name, _ in _adapted(model)]
    for name in names:
        module_name, attr = name.rsplit(".", 1)
        parametrize.remove_parametrizations(model.get_submodule(module_name), attr, leave_parametrized=True)
    return len(names)
