"""Intrinsic dimension: fine-tune only a d-dimensional vector, randomly projected into the full parameter space.

Papers:
- Armen Aghajanyan, Luke Zettlemoyer, Sonal Gupta, "Intrinsic Dimensionality Explains the Effectiveness of
  Language Model Fine-Tuning", ACL 2021, arXiv 2012.13255 (DID and SAID, the Fastfood projection).
- Chunyuan Li, Heerad Farkhoor, Rosanne Liu, Jason Yosinski, "Measuring the Intrinsic Dimension of Objective
  Landscapes", ICLR 2018, arXiv 1804.08838 (subspace training, dense and Fastfood projections, d90).

Idea: freeze every weight at its pretrained value theta0 and move the whole model only along a random
d-dimensional subspace. The smallest d that reaches 90% of full fine-tuning's score (d90) measures how
hard the task is for this model: it is tiny for pretrained language models.

    DID   theta_t = theta0_t + P_t z                 z [d] trained, P_t: R^d -> R^{D_t} fixed and random
    SAID  theta_t = theta0_t + lam_t P_t z           z [d - m], one scalar lam_t per tensor (m tensors)
    Fastfood  P_t v = (1 / nu_t) [H G Pi H B pad(v)]_{:D_t}     padded to LL = 2^ceil(log2 max(D_t, d))
              B random +-1, H the (unnormalised) Walsh-Hadamard transform, Pi a random permutation,
              G diagonal N(0, 1), nu_t = sqrt(LL sum G^2) sqrt(D_t / LL) so that |P_t v| ~ |v|

The model is changed in place: every projected parameter gets a torch parametrization (`SubspaceOffset`),
so `module.weight` is computed as theta0 + lam_t P_t z on every access, while theta0 stays stored, frozen,
as `module.parametrizations.weight.original`. z (and lam) live in `model.subspace`, the only parameters
that train. `bake(model)` writes theta0 + P z into plain parameters and removes all of it (like a merge);
assigning a projected weight (a merge by a method stacked on top) stores theta0 = theta - lam_t P_t z.

What trains: z (d numbers) for DID; z and the m scalars lam (d numbers in all) for SAID.

Choices (where the papers leave it open or the reference code differs):
- projection "fastfood" (default: O(D log D) time, O(D) memory, so it scales to the shipped base) or
  "dense": a seeded Gaussian matrix [D_t, d] with unit-norm columns, which costs D d memory and is only
  for tiny models and for checking Fastfood. Each tensor gets its own independent randomness from `seed`
  (the random tables are drawn in float32 on the CPU, so they do not depend on the model's dtype or device,
  and are not saved: the seed rebuilds them);
- every parameter tensor is projected by default (a tied tensor counts once); `exclude` drops tensors by
  name prefix (e.g. ("wte", "wpe") keeps the embeddings at theta0). Stacked on an earlier method, only the
  frozen tensors are projected: the earlier method's trainables keep training as they are;
- LL covers d as well as D_t (the reference code truncates z for tensors smaller than d);
- the rank-1 "light" projector of the T-Few port is not included;
- z = 0 and lam = 1 at init, so the model starts exactly at theta0.

dtype and device: z, lam and the projection tables take those of the projected parameters. The method needs
only nn.Module parameters, not the GPT class. `count_intrinsic_dimension` is the trainable count (d).

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/intrinsic_dimension.py
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from minimal.hooks import Hooks
from minimal.peft import APPLIED, freeze_base

if TYPE_CHECKING:
    from minimal.gpt import GPTConfig

PROJECTIONS = ("fastfood", "dense")


@functools.lru_cache(maxsize=32)
def hadamard(n: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    """The Sylvester Hadamard matrix [n, n] (n a power of two): H_2n = [[H_n, H_n], [H_n, -H_n]]."""
    H = torch.ones(1, 1, dtype=dtype, device=device)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], dim=1), torch.cat([H, -H], dim=1)], dim=0)
    return H


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform over the last dimension (a power of two): x [..., n] -> H x.

    H_n = H_a (x) H_b with n = a b, so on x reshaped to X [a, b] the transform is H_a X H_b: two smaller
    transforms (recursively), each a small matrix product, instead of one n x n matrix.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two length, got {n}")
    if n <= 256:
        return x @ hadamard(n, x.dtype, str(x.device))  # H is symmetric: [..., n]
    a = 2 ** (n.bit_length() // 2)
    X = fwht(x.unflatten(-1, (a, n // a)))  # X H_b: [..., a, b]
    return fwht(X.transpose(-1, -2)).transpose(-1, -2).flatten(-2)  # H_a X H_b: [..., n]


class FastfoodProjection(nn.Module):
    """P v = [H G Pi H B pad(v)]_{:D} / nu for v [d]; fixed random buffers, no parameters."""

    def __init__(self, d: int, D: int, generator: torch.Generator, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.d, self.D = d, D
        LL = 2 ** math.ceil(math.log2(max(D, d, 2)))
        B = torch.randint(0, 2, (LL,), generator=generator).float() * 2 - 1  # +-1 [LL]
        Pi = torch.randperm(LL, generator=generator)  # [LL]
        G = torch.randn(LL, generator=generator)  # [LL]
        self.nu = math.sqrt(LL * G.square().sum().item()) * math.sqrt(D / LL)
        self.register_buffer("B", B.to(device, dtype), persistent=False)  # rebuilt from the seed, not saved
        self.register_buffer("Pi", Pi.to(device), persistent=False)
        self.register_buffer("G", G.to(device, dtype), persistent=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(v, (0, self.B.shape[0] - self.d))  # [LL]
        x = fwht(self.B * x)[self.Pi]  # Pi H B v: [LL]
        return fwht(self.G * x)[: self.D] / self.nu  # [D]


class DenseProjection(nn.Module):
    """P v with P [D, d] a fixed Gaussian with unit-norm columns (D d numbers: tiny models only)."""

    def __init__(self, d: int, D: int, generator: torch.Generator, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        P = torch.randn(D, d, generator=generator)  # [D, d]
        self.register_buffer("P", (P / P.norm(dim=0, keepdim=True)).to(device, dtype), persistent=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.P @ v  # [D]


class Subspace(nn.Module):
    """The trained coordinates: z [d - m] and, for SAID, lam [m] (one scalar per projected tensor)."""

    def __init__(self, d: int, m: int, said: bool, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.d, self.said = d, said
        self.z = nn.Parameter(torch.zeros(d - m, device=device, dtype=dtype))  # [d - m]
        self.lam = nn.Parameter(torch.ones(m, device=device, dtype=dtype)) if said else None  # [m]


class SubspaceOffset(nn.Module):
    """The parametrization of one tensor t: theta0_t -> theta0_t + lam_t P_t z (z, lam read from the Subspace)."""

    def __init__(self, subspace: Subspace, index: int, projection: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "subspace", subspace)  # a reference, not a submodule: z is registered once
        self.index, self.projection = index, projection

    def delta(self, like: torch.Tensor) -> torch.Tensor:
        """lam_t P_t z in the shape of the tensor `like`."""
        delta = self.projection(self.subspace.z).view_as(like)  # [D_t] -> the tensor's shape
        return self.subspace.lam[self.index] * delta if self.subspace.said else delta

    def forward(self, theta0: torch.Tensor) -> torch.Tensor:
        return theta0 + self.delta(theta0)

    def right_inverse(self, theta: torch.Tensor) -> torch.Tensor:
        """What torch stores when the weight is assigned (a merge stacked on top): theta0 = theta - lam P z."""
        return theta - self.delta(theta)


def apply_intrinsic_dimension(model: nn.Module, d: int = 1000, projection: str = "fastfood", said: bool = False,
                              seed: int = 0, exclude: Iterable[str] = ()) -> Hooks:
    """Freeze `model` and move it only along a random d-dimensional subspace (in place; z trains).

    Everything is checked and built before the model changes, so a bad argument leaves it as it was.
    """
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {projection!r}; choose one of {PROJECTIONS}")
    if hasattr(model, "subspace"):
        raise ValueError("this model already has an intrinsic-dimension subspace (model.subspace)")
    exclude = tuple(exclude)
    stacked = getattr(model, APPLIED, 0) > 0  # keep an earlier method's trainables as they are
    params = {n: p for n, p in model.named_parameters()
              if not (exclude and n.startswith(exclude)) and not (stacked and p.requires_grad)}
    if not params:
        raise ValueError(f"exclude={exclude} leaves no parameter to project")
    m = len(params) if said else 0
    if not isinstance(d, int) or isinstance(d, bool) or d <= m:
        need = f"more than the {m} SAID scalars" if said else "positive"
        raise ValueError(f"subspace dimension d must be an int, {need}; got {d!r}")
    first = next(iter(params.values()))
    subspace = Subspace(d, m, said, first.device, first.dtype)
    g = torch.Generator().manual_seed(seed)
    cls = FastfoodProjection if projection == "fastfood" else DenseProjection
    offsets = {id(p): SubspaceOffset(subspace, i, cls(d - m, p.numel(), g, p.device, p.dtype))
               for i, p in enumerate(params.values())}
    # every place that holds a projected tensor (a tied tensor is held by two modules, one offset for both)
    holders = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in offsets:
            owner, _, attr = name.rpartition(".")
            holders.append((model.get_submodule(owner), attr, offsets[id(p)]))
    freeze_base(model)
    model.subspace = subspace
    for module, attr, offset in holders:
        parametrize.register_parametrization(module, attr, offset)
    return Hooks()


def count_intrinsic_dimension(config: GPTConfig, d: int = 1000) -> int:
    """Trainable entries after apply_intrinsic_dimension: d (z, or z and the SAID scalars)."""
    return d


@torch.no_grad()
def bake(model: nn.Module) -> nn.Module:
    """Write theta0 + lam P z into plain parameters and remove the subspace: the model without the method."""
    holders = [(module, attr) for module in model.modules() if parametrize.is_parametrized(module)
               for attr, chain in module.parametrizations.items() if any(isinstance(f, SubspaceOffset) for f in chain)]
    values = [getattr(module, attr).clone() for module, attr in holders]  # all first: a tied tensor is held twice
    for module, attr in holders:
        parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
    for (module, attr), value in zip(holders, values):
        getattr(module, attr).copy_(value)
    del model.subspace
    return model


def d90(scores: dict[int, float], full_score: float, fraction: float = 0.9) -> int | None:
    """The smallest subspace dimension whose score reaches `fraction` of full fine-tuning's (None if none)."""
    reached = [d for d, s in scores.items() if s >= fraction * full_score]
    return min(reached) if reached else None


def rank_for_energy(delta: torch.Tensor, energy: float = 0.9) -> int:
    """The matrix analogue of d90: the smallest k with sigma_1^2 + ... + sigma_k^2 >= energy * sum_i sigma_i^2.

    delta [out, in] (a weight update W_ft - W0, or any matrix); 0 for a zero matrix.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    s2 = torch.linalg.svdvals(delta.detach().float()) ** 2  # [min(out, in)], descending
    total = s2.sum()
    if total == 0:
        return 0
    cum = torch.cumsum(s2, 0) / total  # [k] fraction of the energy in the top 1, 2, ... components
    return min(int((cum < energy).sum().item()) + 1, s2.numel())
