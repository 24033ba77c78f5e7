"""MoRA: a square trainable matrix between fixed compression and decompression maps.

Paper: Ting Jiang, Shaohan Huang, Shengyue Luo, Zihan Zhang, Haizhen Huang, Furu Wei, Weiwei Deng, Feng Sun,
Qi Zhang, Deqing Wang, Fuzhen Zhuang, "MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning", 2024,
arXiv 2405.12130 (code: kongds/MoRA, a fork of Hugging Face peft).

Idea: spend LoRA's budget r (in + out) on one square matrix M [R, R], R ~ sqrt(r (in + out)), and reach it
through parameter-free maps in -> R and R -> out. The update can have rank R (or more) instead of r, which
helps where the task is to store many new facts, and it still merges into W0.

    y  = x W0^T + b0 + decompress( compress(x) M^T )          dW = decompress o M o compress   [out, in]
    R  = floor(sqrt(r (in + out)) + 1/2)     (made even for "rotation")         M = 0 at init

The four operator families of the paper (all with c = ceil(in / R) chunks; "wrap-pad" appends the first
c R - in entries of x to its end, as the released code does):

    truncation  compress x -> x[:R];  decompress z -> [z; 0]          dW = M in the top-left R x R block
    sharing     compress: wrap-pad, cut into c chunks of R, sum them; decompress: tile z, cut to out
                (the released "type 1"):  dW[i, j] = M[i mod R, j mod R]  (+ the wrapped columns)
    reshaping   wrap-pad, cut into c chunks, apply M to each chunk; decompress: concatenate (tile or cut
                to out):  dW = blockdiag(M, ..., M) folded to [out, in]
    rotation    as reshaping, but chunk b is first rotated RoPE-style by angles b * omega, omega_k =
                10000^(-2k/R) (the released "type 6"):  dW = blockdiag(M Rot_0, M Rot_1, ...) folded

What trains: M of each adapted layer, R^2 numbers (about r (in + out), a rank-r LoRA's budget). No scale.

Choices (where the paper leaves it open, we follow the released code):
- the budget rule, the wrap-padding, the tiling and the RoPE rotation follow the released code; "sharing" is
  its type 1 (modular groups), "rotation" its type 6. Types 2-4 (contiguous groups) are not included.
- R must not exceed min(in, out) of the layer (a larger square matrix would mostly see padding); pass
  `r_hat` to set R directly instead of deriving it from r.
- `delta_weight()` is the branch applied to the identity matrix, so merge uses exactly the map the forward
  uses; the tests check it against each family's dense formula built independently.

dtype and device: M and the rotation tables take the weight's. `count_mora` is the trainable count as a
formula of the GPT config. `recall_experiment` (the notebook's memorisation run) imports the training loop
and the data only when it is called.

Copy: minimal/hooks.py, minimal/peft.py, chapters/ch4_low_rank/lora.py, chapters/ch4_low_rank/mora.py
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch4_low_rank.lora import target_shapes
from minimal.hooks import Hooks
from minimal.peft import Mergeable, inject

if TYPE_CHECKING:
    from minimal.gpt import GPT, GPTConfig

KINDS = ("truncation", "sharing", "reshaping", "rotation")


def mora_rank(in_features: int, out_features: int, r: int, kind: str = "sharing") -> int:
    """R with R^2 close to LoRA's r (in + out): floor(sqrt(r (in + out)) + 1/2), even for rotation."""
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"MoRA's LoRA-equivalent rank r must be a positive int, got {r!r}")
    r_hat = int(math.floor(math.sqrt((in_features + out_features) * r) + 0.5))
    return r_hat - r_hat % 2 if kind == "rotation" else r_hat


def rope_angles(r_hat: int, chunks: int) -> torch.Tensor:
    """theta [chunks, R]: chunk b turns coordinate pair (k, k + R/2) by b * 10000^(-2k/R)."""
    omega = 1.0 / 10000 ** (torch.arange(0, r_hat, 2, dtype=torch.float64) / r_hat)  # [R/2]
    theta = torch.arange(chunks, dtype=torch.float64)[:, None] * omega  # [chunks, R/2]
    return torch.cat([theta, theta], dim=-1)  # [chunks, R]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[u, v] -> [-v, u] on the last dimension."""
    u, v = x.chunk(2, dim=-1)
    return torch.cat([-v, u], dim=-1)


class MoRALinear(Mergeable):
    """y = base(x) + decompress(compress(x) M^T) with M [R, R] the only trained tensor."""

    def __init__(self, base: nn.Linear, r: int = 8, kind: str = "sharing", r_hat: int | None = None) -> None:
        super().__init__(base)
        if kind not in KINDS:
            raise ValueError(f"unknown MoRA kind {kind!r}; choose one of {KINDS}")
        in_f, out_f = base.in_features, base.out_features
        if r_hat is None:
            r_hat = mora_rank(in_f, out_f, r, kind)
        elif not isinstance(r_hat, int) or isinstance(r_hat, bool) or r_hat <= 0:
            raise ValueError(f"r_hat must be a positive int, got {r_hat!r}")
        if r_hat > min(in_f, out_f):
            raise ValueError(f"MoRA square size R={r_hat} (from r={r}) exceeds min(in, out)={min(in_f, out_f)} of "
                             f"the layer [out={out_f}, in={in_f}]; use a smaller r")
        if kind == "rotation" and r_hat % 2:
            raise ValueError(f"rotation needs an even R, got {r_hat}")
        self.kind, self.r_hat = kind, r_hat
        self.chunks = math.ceil(in_f / r_hat)
        w = base.weight
        self.M = nn.Parameter(torch.zeros(r_hat, r_hat, device=w.device, dtype=w.dtype))  # [R, R]
        theta = rope_angles(r_hat, self.chunks)  # [c, R]
        self.register_buffer("cos", theta.cos().to(w.device, w.dtype), persistent=False)
        self.register_buffer("sin", theta.sin().to(w.device, w.dtype), persistent=False)

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> chunks [..., c', R] (c' = 1 for truncation and sharing, c for the others)."""
        R = self.r_hat
        if self.kind == "truncation":
            return x[..., :R].unsqueeze(-2)  # [..., 1, R]
        pad = self.chunks * R - x.shape[-1]
        chunks = torch.cat([x, x[..., :pad]], dim=-1).unflatten(-1, (self.chunks, R))  # wrap-pad: [..., c, R]
        if self.kind == "sharing":
            return chunks.sum(dim=-2, keepdim=True)  # [..., 1, R]
        if self.kind == "rotation":
            chunks = chunks * self.cos + rotate_half(chunks) * self.sin  # [..., c, R]
        return chunks

    def decompress(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., c', R] -> [..., out]: zero-pad (truncation) or concatenate, then tile and cut to out."""
        out_f = self.base.out_features
        flat = z.flatten(-2)  # [..., c' R]
        if self.kind == "truncation":
            return F.pad(flat, (0, out_f - flat.shape[-1]))  # [..., out]
        return flat.tile((math.ceil(out_f / flat.shape[-1]),))[..., :out_f]  # [..., out]

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.decompress(self.compress(x) @ self.M.T)  # [..., c', R] -> [..., out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [..., out]
        return y if self.merged else y + self.branch(x)

    def delta_weight(self) -> torch.Tensor:
        eye = torch.eye(self.base.in_features, device=self.M.device, dtype=self.M.dtype)  # rows: basis inputs
        return self.branch(eye).T  # [in, out] -> [out, in]

    def extra_repr(self) -> str:
        return f"kind={self.kind}, R={self.r_hat}, chunks={self.chunks}, merged={self.merged}"


def apply_mora(model: nn.Module, r: int = 8, kind: str = "sharing", targets: str | Iterable[str] = ("c_attn",),
               r_hat: int | None = None) -> Hooks:
    """Freeze `model` and wrap every targeted nn.Linear in a MoRALinear with LoRA rank r's budget."""
    inject(model, targets, lambda lin: MoRALinear(lin, r, kind, r_hat))  # builds (validates) every layer first
    return Hooks()


def count_mora(config: GPTConfig, r: int = 8, kind: str = "sharing", targets: str | Iterable[str] = ("c_attn",),
               r_hat: int | None = None) -> int:
    """Trainable entries after apply_mora: R^2 per adapted layer (R from r's budget unless r_hat is given)."""
    shapes = target_shapes(config, targets).values()
    return sum((mora_rank(i, o, r, kind) if r_hat is None else r_hat) ** 2 for o, i in shapes)


def budget_error(in_features: int, out_features: int, r: int, kind: str = "sharing") -> float:
    """|R^2 - r (in + out)| / (r (in + out)): how far MoRA's count is from LoRA rank r's."""
    lora = r * (in_features + out_features)
    return abs(mora_rank(in_features, out_features, r, kind) ** 2 - lora) / lora


def recall_experiment(
    make_model: Callable[[], GPT],
    methods: dict[str, Callable[[GPT], Hooks]] | None = None,
    r: int = 8,
    steps: int = 200,
    lr: float = 3e-3,
    batch_size: int = 16,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """MoRA's memorisation experiment at toy scale: train each method on `kv_recall`, score the recall.

    make_model() returns a fresh model whose vocabulary is the repo tokenizer's (e.g. `load_base`).
    methods maps a name to apply(model); by default the four MoRA kinds at LoRA rank r on c_attn (add a
    LoRA entry for the comparison). Returns {name: {"accuracy", "trainable", "final_loss"}}.
    """
    from minimal.data import get_task, task_batch
    from minimal.evaluate import evaluate_task
    from minimal.train import TrainConfig, train

    task = get_task("kv_recall")
    methods = methods or {f"mora-{k}": (lambda m, k=k: apply_mora(m, r=r, kind=k)) for k in KINDS}
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=min(10, steps), seed=seed, log_every=0,
                      progress=False)
    results = {}
    for name, apply in methods.items():
        torch.manual_seed(seed)
        model = make_model()
        hooks = apply(model)
        res = train(model, lambda g, b=model.config.block_size: task_batch(task, batch_size, b, g), cfg, hooks,
                    desc=name)
        acc = evaluate_task(model, task, "test")["accuracy"]
        results[name] = {"accuracy": acc, "trainable": res.trainable, "final_loss": res.final_loss}
    return results
