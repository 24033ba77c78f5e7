"""LT-SFT: Lottery-Ticket Sparse Fine-Tuning, and composition of sparse fine-tunings.

Paper: Ansell, Ponti, Korhonen, Vulic, "Composable Sparse Fine-Tuning for Cross-Lingual Transfer",
ACL 2022, arXiv 2110.07560.

Idea: fine-tune everything briefly to learn *which* K entries matter (the ones that moved most), rewind
to the pretrained values, and fine-tune only those K. The result is a sparse difference vector phi that
is simply added to a model, and two of them (a language phi_L and a task phi_T) compose by addition.

    phase 1:  theta1 = FT(theta0)                          all maskable entries train
    select:   M = top-K of |theta1 - theta0|               global over the maskable entries
    rewind:   theta <- theta0
    phase 2:  theta = theta0 + M * Delta,  only Delta trains;  phi = M * Delta  (|phi_i| <= 1e-7 dropped)
    optional, both phases:  loss += (lambda / Phi) * sum_i |theta_i - theta0_i|      (L1 pull to theta0)
    compose:  theta = theta0 + phi_L(target language) + phi_T(task, trained with phi_L(source) applied)

What trains: phase 1 everything maskable (every parameter except wte and the LayerNorms, as the
released scripts freeze LayerNorm and the output embeddings); phase 2 exactly K entries.

Implementation: `apply_lt_sft` runs phase 1 with its own short loop (`full_finetune`: the shared loop's
recipe, AdamW with betas (0.9, 0.95), cosine from lr to lr/10 without warmup, gradients clipped to norm 1,
written out so that this file does not need minimal/train.py), selects, rewinds, and leaves the model
re-parametrised as theta0 + M * Delta (the delta
parametrisation of `minimal.sparse`, so entries outside M are not parameters and stay bitwise theta0);
the shared loop then runs phase 2 with its own fresh optimiser. `SparseDiff` is phi as an object
(per-tensor flat indices and values) that can be added to or subtracted from a plain model, summed with
another phi, or made from two dense states, which gives the dense-delta baseline for composition.

Choices: the released code masks .grad (gradient masking) in phase 2; the delta parametrisation trains
the same entries with the same gradients and adds the guarantee above. K is a fraction of all
parameters here (the paper fixes K to match adapter sizes). One round (the iterative variant that
unfreezes K/n more entries per round is not built). Our head is the tied wte and stays frozen; tasks
use verbaliser tokens. To train a task phi on top of a language phi, add phi_L to the model first: the
task phi is then measured from that model, exactly as in the paper's recipe.
Departure from the released code: the selected entries train as the value vector of a sparse delta
(`minimal.sparse`), which is 1-D and so never weight-decayed (the loop decays matrices only); with
the leaderboard's weight decay 0 the two agree.
A failed apply leaves the model as it was (phase 1 rewinds in any case). Stacked on another method, LT-SFT
leaves that method's parameters out of phase 1 and the mask: they keep training. `count_lt_sft(config,
fraction)` is K by formula; the deltas take the dtype and device of their parameters.

Copy: minimal/hooks.py, minimal/peft.py, minimal/sparse.py, chapters/ch3_selective/lt_sft.py
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from minimal.hooks import Hooks
from minimal.peft import freeze_base, trained_before
from minimal.sparse import Masks, add_sparse_deltas, budget, mask_overlap, sparse_deltas, topk_mask

if TYPE_CHECKING:
    from minimal.gpt import GPT, GPTConfig

Batch = tuple[torch.Tensor, torch.Tensor]  # idx [B, T], labels [B, T]
State = dict[str, torch.Tensor]  # parameter name -> tensor


def maskable_names(model: GPT) -> list[str]:
    """Every parameter except the tied embedding/head (wte), the LayerNorms and an earlier method's trainables."""
    earlier = trained_before(model)
    return [n for n, _ in model.named_parameters()
            if n != "wte.weight" and ".ln_" not in n and not n.startswith("ln_") and n not in earlier]


@torch.no_grad()
def read_state(model: nn.Module, names: Iterable[str]) -> State:
    """Copies of the named tensors as the forward pass sees them (through any parametrisation)."""
    out = {}
    for name in names:
        module_name, _, attr = name.rpartition(".")
        out[name] = getattr(model.get_submodule(module_name) if module_name else model, attr).detach().clone()
    return out


@torch.no_grad()
def rewind(model: nn.Module, state: State) -> None:
    """Copy `state` back into the model's parameters (bitwise)."""
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"cannot rewind {missing[:5]}: not plain parameters of the model (merge deltas first?)")
    for n, t in state.items():
        params[n].copy_(t)


def most_changed_mask(theta0: State, theta1: State, k: int) -> Masks:
    """M = top-k of |theta1 - theta0| over every entry of every tensor (global)."""
    if set(theta0) != set(theta1):
        raise ValueError(f"theta0 and theta1 cover different tensors: {sorted(set(theta0) ^ set(theta1))}")
    return topk_mask({n: (theta1[n] - theta0[n]).abs() for n in theta0}, k)


def l1_pull(theta0: State, lam: float, n_params: int) -> Callable[[nn.Module], torch.Tensor]:
    """extra_loss(model) = (lam / n_params) * sum |theta - theta0| over the tensors of theta0."""
    if lam < 0 or n_params <= 0:
        raise ValueError(f"lam must be >= 0 and n_params positive, got {lam}, {n_params}")

    def extra_loss(model: nn.Module) -> torch.Tensor:
        total = 0.0
        for name, t0 in theta0.items():
            module_name, _, attr = name.rpartition(".")
            theta = getattr(model.get_submodule(module_name) if module_name else model, attr)
            total = total + (theta - t0).abs().sum()
        return total * (lam / n_params)

    return extra_loss


# ------------------------------------------------------------------------------------------ phi


@dataclass
class SparseDiff:
    """phi: a sparse difference vector. index[name] [nnz] flat positions, values[name] [nnz] the changes."""

    index: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    shapes: dict[str, torch.Size]

    @classmethod
    def between(cls, theta0: State, theta: State, eps: float | None = 1e-7) -> SparseDiff:
        """phi = theta - theta0 on the entries with |change| > eps (eps=None keeps every entry: a dense delta)."""
        if set(theta0) != set(theta):
            raise ValueError(f"the states cover different tensors: {sorted(set(theta0) ^ set(theta))}")
        index, values = {}, {}
        for n in theta0:
            if theta[n].shape != theta0[n].shape:
                raise ValueError(f"{n}: shapes {tuple(theta[n].shape)} and {tuple(theta0[n].shape)} differ")
            d = (theta[n] - theta0[n]).reshape(-1)  # [numel]
            keep = torch.ones_like(d, dtype=torch.bool) if eps is None else d.abs() > eps
            index[n] = keep.nonzero().squeeze(1)
            values[n] = d[index[n]].clone()
        return cls(index, values, {n: t.shape for n, t in theta0.items()})

    @classmethod
    def from_model(cls, model: nn.Module, eps: float = 1e-7) -> SparseDiff:
        """phi of a model trained with sparse deltas (theta0 + M * Delta): the entries of Delta above eps."""
        index, values, shapes = {}, {}, {}
        for name, sd, vals in sparse_deltas(model):
            keep = vals.detach().abs() > eps
            index[name], values[name] = sd.index[keep].clone(), vals.detach()[keep].clone()
            shapes[name] = sd.theta0.shape
        if not index:
            raise ValueError("the model has no sparse deltas (apply_lt_sft it, or use SparseDiff.between)")
        return cls(index, values, shapes)

    def nnz(self) -> int:
        return sum(v.numel() for v in self.values.values())

    def masks(self) -> Masks:
        """The support of phi as bool masks."""
        out = {}
        for n, idx in self.index.items():
            m = torch.zeros(self.shapes[n].numel(), dtype=torch.bool, device=idx.device)
            m[idx] = True
            out[n] = m.view(self.shapes[n])
        return out

    def to_dense(self) -> State:
        out = {}
        for n, idx in self.index.items():
            d = torch.zeros(self.shapes[n].numel(), dtype=self.values[n].dtype, device=self.values[n].device)
            out[n] = d.index_add(0, idx, self.values[n]).view(self.shapes[n])
        return out

    def __add__(self, other: SparseDiff) -> SparseDiff:
        """Composition: the union of the supports, values summed where both change an entry."""
        index, values, shapes = dict(self.index), dict(self.values), dict(self.shapes)
        for n, idx in other.index.items():
            if n in shapes and shapes[n] != other.shapes[n]:
                raise ValueError(f"{n}: shapes {tuple(shapes[n])} and {tuple(other.shapes[n])} differ")
            if n not in index:
                index[n], values[n], shapes[n] = idx, other.values[n], other.shapes[n]
                continue
            both = torch.cat([index[n], idx])  # [nnz_a + nnz_b]
            merged, inverse = torch.unique(both, return_inverse=True)
            summed = torch.zeros(merged.numel(), dtype=values[n].dtype, device=values[n].device)
            index[n], values[n] = merged, summed.index_add(0, inverse, torch.cat([values[n], other.values[n]]))
        return SparseDiff(index, values, shapes)

    def __neg__(self) -> SparseDiff:
        return SparseDiff(dict(self.index), {n: -v for n, v in self.values.items()}, dict(self.shapes))

    @torch.no_grad()
    def apply_to(self, model: nn.Module, alpha: float = 1.0) -> nn.Module:
        """theta <- theta + alpha * phi, in place, on a model with plain parameters; returns the model."""
        params = dict(model.named_parameters())
        missing = [n for n in self.index if n not in params]
        if missing:
            raise ValueError(f"phi changes {missing[:5]}, which are not plain parameters of the model "
                             "(merge_sparse_deltas first, or a model of another architecture)")
        for n, idx in self.index.items():
            if params[n].shape != self.shapes[n]:
                raise ValueError(f"{n}: phi is for shape {tuple(self.shapes[n])}, "
                                 f"the model has {tuple(params[n].shape)}")
            flat = params[n].view(-1)
            flat.index_add_(0, idx, (alpha * self.values[n]).to(flat.dtype))
        return model


def compose(model: nn.Module, *diffs: SparseDiff) -> nn.Module:
    """A copy of the model with every phi added: theta0 + phi_1 + phi_2 + ..."""
    if not diffs:
        raise ValueError("compose: give at least one SparseDiff")
    out = copy.deepcopy(model)
    for d in diffs:
        d.apply_to(out)
    return out


def compare_composition(model: nn.Module, sparse: list[SparseDiff], dense: list[SparseDiff],
                        evaluate: Callable[[nn.Module], float]) -> dict[str, float]:
    """theta0 + sum of sparse phis against theta0 + sum of dense deltas, and how much each set overlaps.

    overlap: Jaccard overlap of the first two supports (1.0 for dense deltas, which touch every entry:
    that shared support is where they interfere).
    """
    def overlap(diffs: list[SparseDiff]) -> float:
        if len(diffs) < 2:
            return 0.0
        a, b = diffs[0].masks(), diffs[1].masks()
        names = set(a) | set(b)
        shapes = {**diffs[0].shapes, **diffs[1].shapes}
        empty = {n: torch.zeros(shapes[n], dtype=torch.bool) for n in names}
        return mask_overlap({n: a.get(n, empty[n]).cpu() for n in names}, {n: b.get(n, empty[n]).cpu() for n in names})

    return {"sparse": evaluate(compose(model, *sparse)), "dense": evaluate(compose(model, *dense)),
            "sparse_overlap": overlap(sparse), "dense_overlap": overlap(dense)}


# ------------------------------------------------------------------------------------------ apply


@dataclass
class Phase1:
    mask: Masks  # the K selected entries (every maskable tensor, mostly False)
    theta0: State  # the maskable tensors before phase 1 (what the model was rewound to)
    theta1: State  # the maskable tensors after phase 1


def batch_source(data: Any, block_size: int, batch_size: int) -> Callable[[torch.Generator], Batch]:
    """get_batch(gen): random batches of a minimal.data.Task's train split, or `data` itself if it is callable."""
    if hasattr(data, "splits"):  # a Task: minimal.data (tokenizer included) is loaded already, since it made it
        from minimal.data import task_batch

        return lambda gen: task_batch(data, batch_size, block_size, gen)
    if callable(data):
        return data
    raise TypeError(f"data must be a minimal.data.Task or a get_batch(gen) function, got {type(data).__name__}")


def full_finetune(model: nn.Module, get_batch: Callable[[torch.Generator], Batch], steps: int, lr: float,
                  seed: int = 0, extra_loss: Callable[[nn.Module], torch.Tensor] | None = None) -> list[float]:
    """`steps` AdamW steps on the parameters that require grad; returns the losses.

    The shared loop's recipe with its defaults (minimal/train.py, warmup 0, weight decay 0): the same seeds,
    lr_t = lr/10 + (lr - lr/10) (1 + cos(pi t / steps)) / 2, gradients clipped to norm 1, betas (0.9, 0.95).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses, floor = [], lr * 0.1
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = floor + 0.5 * (lr - floor) * (1 + math.cos(math.pi * min(step / max(1, steps), 1.0)))
        idx, labels = (t.to(device) for t in get_batch(gen))
        loss = model(idx, labels=labels).loss
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"LT-SFT phase 1: the loss became {loss.item()} at step {step}; lower full_lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not torch.isfinite(torch.nn.utils.clip_grad_norm_(params, 1.0)):
            raise FloatingPointError(f"LT-SFT phase 1: a gradient became non-finite at step {step}; lower full_lr")
        optimizer.step()
        losses.append(loss.item())
    return losses


def find_mask(model: GPT, get_batch: Callable[[torch.Generator], Batch], k: int, steps: int = 60, lr: float = 5e-4,
              seed: int = 0, lam: float = 0.0) -> Phase1:
    """Phase 1 (full fine-tune of the maskable tensors, `full_finetune`), selection of the top-k changes, rewind.

    On return the model holds theta0 again, bitwise, with the requires_grad flags, the train/eval mode and
    no .grad, as before; also when phase 1 raises.
    """
    names = maskable_names(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    theta0 = read_state(model, names)
    everything = read_state(model, flags)
    was_training = model.training
    params = dict(model.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in theta0)
    extra = l1_pull(theta0, lam, sum(p.numel() for p in model.parameters())) if lam else None
    try:
        full_finetune(model, get_batch, steps, lr, seed, extra)
        theta1 = read_state(model, names)
    finally:
        rewind(model, everything)
        for n, f in flags.items():
            params[n].requires_grad_(f)
            params[n].grad = None
        model.train(was_training)
    return Phase1(most_changed_mask(theta0, theta1, k), theta0, theta1)


def apply_lt_sft(model: GPT, data: Any, fraction: float = 0.005, full_steps: int = 60, full_lr: float = 5e-4,
                 batch_size: int = 16, lam: float = 0.0, seed: int = 0) -> Hooks:
    """Phase 1 on `data` (a Task or get_batch(gen)), select K = floor(fraction * Phi), rewind, set up phase 2.

    Returns the hooks of phase 2 (the L1 pull when lam > 0); train with the shared loop, then read phi
    with SparseDiff.from_model(model).
    """
    if any(True for _ in sparse_deltas(model)):
        raise ValueError("the model already has sparse deltas; merge_sparse_deltas(model) first")
    if isinstance(full_steps, bool) or not isinstance(full_steps, int) or full_steps <= 0:
        raise ValueError(f"full_steps must be a positive int, got {full_steps!r}")
    if not full_lr > 0 or lam < 0:
        raise ValueError(f"full_lr must be positive and lam >= 0, got {full_lr}, {lam}")
    n_params = sum(p.numel() for p in model.parameters())  # Phi
    k = budget(fraction, n_params)
    maskable = set(maskable_names(model))
    n_maskable = sum(p.numel() for n, p in model.named_parameters() if n in maskable)
    if k > n_maskable:
        raise ValueError(f"fraction {fraction} asks for {k} entries but only {n_maskable} are maskable")
    get_batch = batch_source(data, model.config.block_size, batch_size)
    phase1 = find_mask(model, get_batch, k, full_steps, full_lr, seed, lam)
    freeze_base(model)
    add_sparse_deltas(model, phase1.mask)
    return Hooks(extra_loss=l1_pull(phase1.theta0, lam, n_params) if lam else None)


def count_lt_sft(config: GPTConfig, fraction: float = 0.005) -> int:
    """K = floor(fraction * Phi), Phi = V d + T d + L (12 d^2 + 13 d) + 2 d (every parameter of the GPT)."""
    V, T, L, d = config.vocab_size, config.block_size, config.n_layer, config.n_embd
    return int(fraction * (V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d))
