"""Checkers for chapter 3's exercises in `ch3_selective.ipynb` (BitFit, top-k masks, gradient masking).

The experiments notebook's checkers are in `ch3_experiments.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from chapters.exercises import Mismatch, checker, equal, predicted, run, tiny_gpt

# (n_layer, n_embd, n_head) of the small random GPTs the checkers build
SHAPES = ((2, 16, 2), (3, 24, 4), (1, 8, 1))


# ----------------------------------------------------------------------------------- BitFit


@checker("ch3.bitfit_count")
def check_bitfit_count(answer: Any) -> None:
    """The number of entries BitFit ("all") trains on the shipped `small` model, counted from the tensors."""
    from chapters.ch3_selective.bitfit import apply_bitfit
    from minimal.peft import count_trainable
    from minimal.pretrained import load_base

    got = predicted(answer)
    model = load_base("small")
    apply_bitfit(model, "all")
    want = count_trainable(model).trainable
    if got != want:
        hint = " (did you count the LayerNorm biases, ln_1, ln_2 and ln_f?)" if got < want else ""
        raise Mismatch(f"BitFit trains {want:,} entries of small, you predicted {got:,}{hint}")


def library_bitfit_masks(model: torch.nn.Module, variant: str) -> dict[str, torch.Tensor]:
    """What the library's BitFit trains, as masks: name -> bool mask of the entries that train."""
    from chapters.ch3_selective.bitfit import apply_bitfit
    from minimal.sparse import delta_masks

    apply_bitfit(model, variant)
    masks = {n: m.cpu() for n, m in delta_masks(model).items()}  # the query third of c_attn.bias ("subset")
    masks.update({n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()
                  if p.requires_grad and "parametrizations" not in n})
    return masks


@checker("ch3.bitfit_masks")
def check_bitfit_masks(bitfit_masks: Callable[[torch.nn.Module, str], dict[str, torch.Tensor]]) -> None:
    """bitfit_masks(model, variant): True on exactly the entries the library's BitFit `variant` trains."""
    for shape in SHAPES:
        for variant in ("all", "subset"):
            model = tiny_gpt(shape, block_size=12)
            params = dict(model.named_parameters())
            got = run(bitfit_masks, model, variant, what=f"bitfit_masks(model, {variant!r})")
            want = library_bitfit_masks(tiny_gpt(shape, block_size=12), variant)
            if not isinstance(got, dict):
                raise Mismatch(f"expected a dict name -> bool mask, got {type(got).__name__}")
            unknown = sorted(n for n in got if n not in params)
            if unknown:
                raise Mismatch(f"masks name unknown parameters {unknown[:3]}; names are e.g. {list(params)[:3]}")
            for n, m in got.items():
                if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != params[n].shape:
                    raise Mismatch(f"the mask of {n} should be a bool tensor of shape {tuple(params[n].shape)}")
            got = {n: m for n, m in got.items() if bool(m.any())}  # all-False masks select nothing
            where = f"{variant!r} on a {shape[0]}-block model with d={shape[1]}"
            extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
            if extra or missing:
                raise Mismatch(f"{where}: " + (f"these should not train: {extra[:4]} " if extra else "")
                               + (f"these should train: {missing[:4]}" if missing else ""))
            for n in want:
                if not torch.equal(got[n].cpu(), want[n]):
                    chosen = got[n].nonzero().squeeze(1).tolist()
                    raise Mismatch(f"{where}: in {n} you select {int(got[n].sum())} entries "
                                   f"(from index {chosen[0]} to {chosen[-1]}), BitFit trains "
                                   f"{int(want[n].sum())} (from index {want[n].nonzero()[0].item()} "
                                   f"to {want[n].nonzero()[-1].item()})")


# ----------------------------------------------------------------------------------- masks


def random_scores(seed: int) -> dict[str, torch.Tensor]:
    """Score tensors of mixed shapes (matrices, vectors, a 3-d one); continuous, so no ties."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (6, 5), "a.bias": (6,), "b.weight": (4, 7), "c": (2, 3, 4)}
    return {n: torch.randn(s, generator=g) * (1 + i) for i, (n, s) in enumerate(shapes.items())}


@checker("ch3.topk_mask")
def check_topk_mask(topk: Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]]) -> None:
    """topk(scores, k): bool masks, one per score tensor, True on the k largest scores of all tensors together."""
    from minimal.sparse import topk_mask

    for seed in range(3):
        scores = random_scores(seed)
        total = sum(s.numel() for s in scores.values())
        for k in (1, 7, total // 3, total):
            got = run(topk, scores, k, what=f"topk(scores, k={k})")
            want = topk_mask(scores, k)
            if not isinstance(got, dict) or set(got) != set(want):
                raise Mismatch(f"k={k}: expected a dict with the keys {sorted(want)}, got "
                               f"{sorted(got) if isinstance(got, dict) else type(got).__name__}")
            for n in want:
                m = got[n]
                if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != want[n].shape:
                    raise Mismatch(f"k={k}: the mask of {n!r} should be a bool tensor of shape "
                                   f"{tuple(want[n].shape)}, got {getattr(m, 'dtype', type(m).__name__)} "
                                   f"{tuple(getattr(m, 'shape', ()))}")
            equal(sum(int(m.sum()) for m in got.values()), k, f"k={k}: the number of selected entries")
            for n in want:
                if not torch.equal(got[n], want[n]):
                    raise Mismatch(f"k={k}: in {n!r} you select {int(got[n].sum())} entries, the global top-k "
                                   f"has {int(want[n].sum())} there (compare all tensors together, largest first)")


# ----------------------------------------------------------------------------------- gradient masking


def random_masks(model: torch.nn.Module, seed: int, density: float = 0.3) -> dict[str, torch.Tensor]:
    """Random masks on three tensors of the model (a matrix, a bias, the position embedding)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    names = ["h.0.mlp.c_fc.weight", "h.0.attn.c_attn.bias", "wpe.weight"]
    return {n: torch.rand(params[n].shape, generator=g) < density for n in names}


def masked_training(model, masks, step_fn, steps: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """AdamW with weight decay on the masked tensors only; step_fn(model, optimizer) runs after backward."""
    from minimal.peft import freeze

    freeze(model)
    params = dict(model.named_parameters())
    for n in masks:
        params[n].requires_grad_(True)
    opt = torch.optim.AdamW([params[n] for n in masks], lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, model.config.vocab_size, (4, model.config.block_size), generator=g)
        opt.zero_grad()
        model(idx, labels=idx).loss.backward()
        step_fn(model, opt)
    return {n: params[n].detach().clone() for n in masks}


class LibraryStep:
    """The library's gradient masking (GradMask with restore) as a step_fn for `masked_training`."""

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks, self.hooks = masks, None

    def __call__(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        from minimal.sparse import GradMask

        if self.hooks is None:  # built before the first optimiser step: theta0 is the starting point
            self.hooks = GradMask(model, self.masks, restore=True)
        self.hooks.after_backward(model, 0)
        opt.step()
        self.hooks.step_end(model, 0, opt)


@checker("ch3.masked_step")
def check_masked_step(step: Callable[..., None]) -> None:
    """step(model, masks, theta0, optimizer): mask the gradients, step, restore the unselected entries."""
    from functools import partial

    def student(masks, theta0, model, opt):
        run(step, model, masks, theta0, opt, what="step(model, masks, theta0, optimizer)")

    for i, shape in enumerate(SHAPES):
        mine, lib = tiny_gpt(shape, seed=i, block_size=12), tiny_gpt(shape, seed=i, block_size=12)
        masks = random_masks(mine, seed=i)
        params = dict(mine.named_parameters())
        theta0 = {n: params[n].detach().clone() for n in masks}
        got = masked_training(mine, masks, partial(student, masks, theta0), seed=i)
        want = masked_training(lib, masks, LibraryStep(masks), seed=i)
        for n, m in masks.items():
            if not torch.equal(got[n][~m], theta0[n][~m]):
                moved = int((got[n][~m] != theta0[n][~m]).sum())
                raise Mismatch(f"{shape[0]}-block model: {moved} unselected entries of {n} moved; they must stay "
                               "bitwise equal to theta0 (weight decay moves them unless you copy them back)")
            if not torch.allclose(got[n][m], want[n][m], atol=1e-6, rtol=1e-5):
                gap = (got[n][m] - want[n][m]).abs().max().item()
                raise Mismatch(f"{shape[0]}-block model: the selected entries of {n} differ from the library's "
                               f"GradMask run by up to {gap:.3g} (did they train with their own gradient?)")
