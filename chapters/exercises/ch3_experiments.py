"""Checkers for the exercises of `ch3_selective_experiments.ipynb` (HiWi count, Jaccard, GLUE metrics)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from chapters.exercises import Mismatch, checker, close, predicted, run


@checker("ch3.hiwi_count")
def check_hiwi_count(answer: Any) -> None:
    """Trainable values of HiWi with r = 4 on `mlp.c_proj.bias` of every block of `base`, from the tensors."""
    from chapters.ch3_selective.pafi_hiwi import apply_hiwi
    from minimal.peft import count_trainable
    from minimal.pretrained import load_base

    got = predicted(answer)
    model = load_base("base")
    apply_hiwi(model, r=4, tensors=("mlp.c_proj.bias",))
    want = count_trainable(model).trainable
    if got != want:
        raise Mismatch(f"HiWi (r=4 on mlp.c_proj.bias) trains {want:,} values of base, you predicted {got:,} "
                       "(per block: W_down [r, n] and its bias c [r], W_up [n, r] and its bias c' [n])")


def random_masks(seed: int, density: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"x.weight": (8, 6), "x.bias": (8,), "y.weight": (5, 9)}
    def draw():
        return {n: torch.rand(s, generator=g) < density for n, s in shapes.items()}
    return draw(), draw()


@checker("ch3.mask_overlap")
def check_mask_overlap(jaccard: Callable[[dict, dict], float]) -> None:
    """jaccard(a, b): |a and b| / |a or b| over all the tensors of two masks together (0 when both are empty)."""
    from minimal.sparse import mask_overlap

    cases = [random_masks(seed, density) for seed, density in enumerate((0.1, 0.5, 0.9))]
    a, b = random_masks(7, 0.3)
    cases += [(a, a), ({n: torch.zeros_like(m) for n, m in a.items()}, b),
              ({n: torch.zeros_like(m) for n, m in a.items()}, {n: torch.zeros_like(m) for n, m in a.items()})]
    for i, (a, b) in enumerate(cases):
        got = run(jaccard, a, b, what=f"jaccard on case {i}")
        close(float(got), mask_overlap(a, b), f"Jaccard overlap, case {i} ({sum(int(m.sum()) for m in a.values())} "
              f"and {sum(int(m.sum()) for m in b.values())} selected entries)", atol=1e-9, rtol=0)


def binary_cases(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Random 0/1 predictions and labels, plus the edge cases: constant predictions, perfect, inverted."""
    rng = random.Random(seed)
    cases = []
    for n in (5, 20, 60):
        gold = [rng.randint(0, 1) for _ in range(n)]
        cases += [([rng.randint(0, 1) for _ in range(n)], gold), ([int(rng.random() < 0.8) for _ in range(n)], gold)]
    gold = [0, 1, 1, 0, 1, 0, 0, 1]
    cases += [([1] * 8, gold), ([0] * 8, gold), (gold[:], gold), ([1 - g for g in gold], gold)]
    return cases


@checker("ch3.matthews")
def check_matthews(mcc: Callable[[Sequence[int], Sequence[int]], float]) -> None:
    """mcc(pred, gold) on 0/1 lists (1 = positive), 0.0 when a factor of the denominator is 0."""
    from chapters.ch3_selective.glue_metrics import matthews

    for pred, gold in binary_cases():
        got = run(mcc, pred, gold, what=f"mcc(pred={pred[:8]}..., gold={gold[:8]}...)")
        close(float(got), matthews(pred, gold), f"MCC with pred={pred[:8]}{'...' if len(pred) > 8 else ''} "
              f"and gold={gold[:8]}{'...' if len(gold) > 8 else ''}", atol=1e-9, rtol=0)


@checker("ch3.spearman")
def check_spearman(rho: Callable[[Sequence[float], Sequence[float]], float]) -> None:
    """rho(x, y): Pearson correlation of the ranks, tied values sharing the mean of their ranks."""
    from chapters.ch3_selective.glue_metrics import spearman

    rng = random.Random(0)
    cases = [([3.0, 1.0, 2.0], [30.0, 10.0, 25.0]), ([1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0])]
    for n in (6, 15, 40):
        cases.append(([rng.gauss(0, 1) for _ in range(n)], [rng.gauss(0, 1) for _ in range(n)]))
        cases.append(([float(rng.randint(0, 3)) for _ in range(n)], [float(rng.randint(0, 1)) for _ in range(n)]))
        x = [rng.gauss(0, 1) for _ in range(n)]
        cases.append((x, [v ** 3 + 0.1 * rng.gauss(0, 1) for v in x]))  # monotone up to noise: far from Pearson
    for x, y in cases:
        has_ties = len(set(x)) < len(x) or len(set(y)) < len(y)
        got = run(rho, x, y, what=f"rho on {len(x)} values")
        close(float(got), spearman(x, y), f"Spearman on {len(x)} values{' with ties' if has_ties else ''}",
              atol=1e-9, rtol=0)
