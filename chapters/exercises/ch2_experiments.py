"""Checkers for `ch2_additive_experiments.ipynb` (SparseAdapter budgets and SNIP masks, FISH's Fisher and budget).

The names start with "ch2." like the chapter's other checkers (`ch2.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from chapters.exercises import Mismatch, checker, close, equal, predicted, run, tiny_gpt
from chapters.exercises.ch2 import SHAPES

# ----------------------------------------------------------------------------------- large-sparse budget


@checker("ch2.large_sparse")
def check_large_sparse(answer: Any) -> None:
    """{"width": m', "kept": non-zero adapter weights} for the dense m = 8 budget keeping a fraction 0.25 (s = 0.75)
    of the weights, on `small`."""
    from chapters.ch2_additive import sparse_adapter as sa
    from minimal.pretrained import load_base

    if answer is None or (isinstance(answer, dict) and any(v is None or v is ... for v in answer.values())):
        raise NotImplementedError
    if not isinstance(answer, dict) or set(answer) != {"width", "kept"}:
        raise Mismatch("the answer should be a dict with the keys 'width' and 'kept'")
    width = predicted(answer["width"], "'width'")
    kept = predicted(answer["kept"], "'kept'")
    want_width = sa.large_sparse_bottleneck(8, 0.25)
    if width != want_width:
        raise Mismatch(f"the large-sparse width for m = 8 keeping 0.25 of the weights (s = 0.75) is {want_width}, "
                       f"you predicted {width} (the widest m' whose kept share of weights fits the dense m = 8 "
                       "budget)")
    model = load_base("small")
    torch.manual_seed(0)
    sa.apply_sparse_adapter(model, bottleneck=want_width, fraction=0.25, criterion="random")
    want_kept = sa.nonzero_count(model)["weights"]
    if kept != want_kept:
        raise Mismatch(f"a Pfeiffer adapter of width {want_width} on small (2 blocks, d = 64) keeping 0.25 keeps "
                       f"{want_kept:,} weights, you predicted {kept:,} (W_down and W_up of each block; biases "
                       "are not pruned and not counted here)")


# ----------------------------------------------------------------------------------- SNIP masks


def random_weights_and_grads(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Adapter-like weight and gradient tensors of two blocks; continuous values, so no ties."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"h.0.mlp_out.down": (5, 7), "h.0.mlp_out.up": (7, 5), "h.1.mlp_out.down": (5, 7),
              "h.1.mlp_out.up": (7, 5)}
    weights = {n: torch.randn(s, generator=g) * (1 + i) for i, (n, s) in enumerate(shapes.items())}
    grads = {n: torch.randn(s, generator=g) * (3 - i) for i, (n, s) in enumerate(shapes.items())}
    return weights, grads


def library_snip_masks(weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                       fraction: float) -> dict[str, torch.Tensor]:
    """sparse_adapter.py's rule: |W * dL/dW|, normalised, global top ceil(fraction N)."""
    from chapters.ch2_additive import sparse_adapter as sa
    from minimal.sparse import topk_mask

    scores = sa._normalise({n: (w * grads[n]).abs() for n, w in weights.items()})
    return topk_mask(scores, sa.n_keep(sum(s.numel() for s in scores.values()), fraction))


@checker("ch2.snip_masks")
def check_snip_masks(snip_masks: Callable[..., dict[str, torch.Tensor]]) -> None:
    """snip_masks(weights, grads, fraction): bool masks keeping the top ceil(fraction N) SNIP scores, globally."""
    for seed in range(3):
        weights, grads = random_weights_and_grads(seed)
        total = sum(w.numel() for w in weights.values())  # 140
        for f in (1.0, 0.5, 0.45, 0.1):  # 0.45: fraction N = 63 exactly; 0.1: 14
            got = run(snip_masks, {n: w.clone() for n, w in weights.items()},
                      {n: g.clone() for n, g in grads.items()}, f, what=f"snip_masks(weights, grads, {f})")
            want = library_snip_masks(weights, grads, f)
            if not isinstance(got, dict) or set(got) != set(want):
                raise Mismatch(f"fraction={f}: expected a dict with the keys {sorted(want)}")
            for n, m in got.items():
                if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != want[n].shape:
                    raise Mismatch(f"fraction={f}: the mask of {n!r} should be a bool tensor of shape "
                                   f"{tuple(want[n].shape)}")
            equal(sum(int(m.sum()) for m in got.values()), sum(int(m.sum()) for m in want.values()),
                  f"fraction={f}, {total} weights: the number of kept weights (ceil(fraction N), N over all "
                  "tensors together)")
            for n in want:
                if not torch.equal(got[n], want[n]):
                    raise Mismatch(f"fraction={f}: in {n!r} you keep {int(got[n].sum())} weights, SNIP keeps "
                                   f"{int(want[n].sum())} there (score |W * grad|, rank all tensors together)")
    # a budget that is not a whole number of weights: fraction N = 31.5 of 70 -> keep 32 (ceil)
    weights, grads = random_weights_and_grads(3)
    weights = {n: w for n, w in list(weights.items())[:2]}
    grads = {n: grads[n] for n in weights}
    got = run(snip_masks, weights, grads, 0.45, what="snip_masks(weights, grads, 0.45)")
    equal(sum(int(m.sum()) for m in got.values()), 32, "fraction=0.45 of 70 weights: the number kept (ceil(f N))")


# ----------------------------------------------------------------------------------- empirical Fisher


def fisher_samples(model, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n token sequences; only the last 3 positions are targets (like an answer after a prompt)."""
    g = torch.Generator().manual_seed(seed)
    T = model.config.block_size - 4
    idx = torch.randint(0, model.config.vocab_size, (n, T), generator=g)
    labels = torch.full_like(idx, -100)
    labels[:, -3:] = idx[:, -3:]
    return idx, labels


@checker("ch2.empirical_fisher")
def check_empirical_fisher(fisher: Callable[..., dict[str, torch.Tensor]]) -> None:
    """fisher(model, idx, labels) -> {name: F}: the mean over examples of the squared per-example gradient."""
    from minimal.sparse import empirical_fisher

    for i, shape in enumerate(SHAPES[:2]):
        model = tiny_gpt(shape, seed=i)
        idx, labels = fisher_samples(model, 5, seed=i)
        want = empirical_fisher(model, idx, labels, method="loop")
        got = run(fisher, model, idx.clone(), labels.clone(), what="fisher(model, idx, labels)")
        if not isinstance(got, dict) or set(got) != set(want):
            raise Mismatch(f"expected a dict with one score tensor per parameter, keys like {sorted(want)[:3]}")
        scale = max(float(w.abs().max()) for w in want.values())  # compare relative to the largest score
        for n in want:
            if not isinstance(got[n], torch.Tensor):
                raise Mismatch(f"the score of {n} should be a tensor, got {type(got[n]).__name__}")
            close(got[n].detach() / scale, want[n] / scale,
                  f"{shape[0]}-block model, {n} (scores divided by the largest one)", atol=1e-5, rtol=1e-3)


# ----------------------------------------------------------------------------------- FISH budget


@checker("ch2.fish_budget")
def check_fish_budget(answer: Any) -> None:
    """k, the number of entries FISH trains on `base` at 0.5%."""
    from chapters.ch2_additive.fish_mask import fish_mask
    from minimal.pretrained import load_base
    from minimal.sparse import mask_count

    got = predicted(answer, "k")
    model = load_base("base")
    want = mask_count(fish_mask(model, None, None, fraction=0.005, score="random"))
    if got != want:
        raise Mismatch(f"FISH at 0.5% trains {want:,} entries of base, you predicted {got:,} (k = floor(0.005 Phi), "
                       "Phi counts every parameter of the model, the excluded wte too)")
