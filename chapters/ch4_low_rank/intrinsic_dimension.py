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

The model runs with the effective parameters through `torch.func.functional_call`, so theta0 is never
written to: `SubspaceModel` wraps the frozen GPT and recomputes theta0 + P z on every forward.

What trains: z (d numbers) for DID; z and the m scalars lam (d numbers in all) for SAID.

Choices (spec sheet section 19 and decision 19):
- projection "fastfood" (default: O(D log D) time, O(D) memory, so it scales to the shipped base) or
  "dense": a seeded Gaussian matrix [D_t, d] with unit-norm columns, which costs D d memory and is only
  for tiny models and for checking Fastfood. Each tensor gets its own independent randomness from `seed`;
- every parameter tensor is projected by default (the tied embedding counts once); `exclude` drops tensors
  by name prefix (e.g. ("wte", "wpe") keeps the embeddings at theta0);
- LL covers d as well as D_t (the reference code truncates z for tensors smaller than d);
- the rank-1 "light" projector of the T-Few port is not included;
- z = 0 and lam = 1 at init, so the model starts exactly at theta0.

`apply_intrinsic_dimension` returns (the SubspaceModel, Hooks): train and evaluate the returned module,
which has the GPT's `config` and `generate`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.func import functional_call

from minimal.gpt import GPT, GPTConfig, GPTOutput
from minimal.hooks import Hooks
from minimal.peft import freeze

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

    def __init__(self, d: int, D: int, generator: torch.Generator) -> None:
        super().__init__()
        self.d, self.D = d, D
        LL = 2 ** math.ceil(math.log2(max(D, d, 2)))
        self.register_buffer("B", torch.randint(0, 2, (LL,), generator=generator).float() * 2 - 1)  # +-1 [LL]
        self.register_buffer("Pi", torch.randperm(LL, generator=generator))  # [LL]
        self.register_buffer("G", torch.randn(LL, generator=generator))  # [LL]
        self.nu = math.sqrt(LL * self.G.square().sum().item()) * math.sqrt(D / LL)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(v, (0, self.B.shape[0] - self.d))  # [LL]
        x = fwht(self.B * x)[self.Pi]  # Pi H B v: [LL]
        return fwht(self.G * x)[: self.D] / self.nu  # [D]


class DenseProjection(nn.Module):
    """P v with P [D, d] a fixed Gaussian with unit-norm columns (D d numbers: tiny models only)."""

    def __init__(self, d: int, D: int, generator: torch.Generator) -> None:
        super().__init__()
        P = torch.randn(D, d, generator=generator)  # [D, d]
        self.register_buffer("P", P / P.norm(dim=0, keepdim=True))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.P @ v  # [D]


class SubspaceModel(nn.Module):
    """A frozen GPT run at theta0 + lam * P z through functional_call; z (and lam) are the only parameters."""

    def __init__(self, base: GPT, d: int, projection: str = "fastfood", said: bool = False, seed: int = 0,
                 exclude: Iterable[str] = ()) -> None:
        super().__init__()
        if projection not in PROJECTIONS:
            raise ValueError(f"unknown projection {projection!r}; choose one of {PROJECTIONS}")
        exclude = tuple(exclude)
        names = [n for n, _ in base.named_parameters() if not (exclude and n.startswith(exclude))]
        if not names:
            raise ValueError(f"exclude={exclude} leaves no parameter to project")
        m = len(names) if said else 0
        if not isinstance(d, int) or isinstance(d, bool) or d <= m:
            need = f"more than the {m} SAID scalars" if said else "positive"
            raise ValueError(f"subspace dimension d must be an int, {need}; got {d!r}")
        self.base = freeze(base)
        self.names, self.said = names, said
        self.z = nn.Parameter(torch.zeros(d - m, device=base.wte.weight.device))  # [d - m]
        self.lam = nn.Parameter(torch.ones(m, device=base.wte.weight.device)) if said else None  # [m]
        g = torch.Generator().manual_seed(seed)
        params = dict(base.named_parameters())
        cls = FastfoodProjection if projection == "fastfood" else DenseProjection
        self.proj = nn.ModuleList(cls(d - m, params[n].numel(), g) for n in names).to(base.wte.weight.device)

    @property
    def config(self) -> GPTConfig:
        """The wrapped GPT's config (block_size etc., read by the training loop and evaluation)."""
        return self.base.config

    def effective_params(self) -> dict[str, torch.Tensor]:
        """{name: theta0 + lam_t P_t z} for every projected tensor."""
        params = dict(self.base.named_parameters())
        out = {}
        for i, (name, P) in enumerate(zip(self.names, self.proj)):
            delta = P(self.z).view_as(params[name])  # [D_t] -> the tensor's shape
            out[name] = params[name] + (self.lam[i] * delta if self.said else delta)
        return out

    def forward(self, *args, **kwargs) -> GPTOutput:
        """GPT.forward's arguments, run with the effective parameters."""
        return functional_call(self.base, self.effective_params(), args, kwargs)

    def generate(self, *args, **kwargs) -> torch.Tensor:
        return GPT.generate(self, *args, **kwargs)  # GPT's decoding loop, calling this module's forward


def apply_intrinsic_dimension(model: GPT, d: int = 1000, projection: str = "fastfood", said: bool = False,
                              seed: int = 0, exclude: Iterable[str] = ()) -> tuple[SubspaceModel, Hooks]:
    """Freeze `model` and return (SubspaceModel over it, Hooks): train the returned module."""
    if not isinstance(model, GPT):
        raise TypeError(f"intrinsic dimension needs a minimal.gpt.GPT, got {type(model).__name__}")
    return SubspaceModel(model, d, projection, said, seed, exclude), Hooks()


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
