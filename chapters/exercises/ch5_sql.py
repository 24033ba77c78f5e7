"""Checkers for chapter 5's exercises in `ch5_text_to_sql.ipynb` (FinSQL: plug-in size, EX comparison, M2 merge)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from chapters.exercises import Mismatch, checker, close
from chapters.exercises.ch5 import run

# the plug-in of the predict exercise: LoRA r = 16 on the fused attention input and the MLP's first layer
PLUGIN_R, PLUGIN_TARGETS = 16, ("c_attn", "c_fc")


@checker("ch5.plugin_count")
def check_plugin_count(answer: Any) -> None:
    """Trainable entries of a plug-in with r = 16 on c_attn and c_fc of `base`, counted from the tensors."""
    from chapters.ch5_applications.finsql import PluginConfig, new_plugin
    from minimal.peft import count_trainable
    from minimal.pretrained import load_base

    if answer is None or answer is ...:
        raise NotImplementedError
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise Mismatch(f"the answer should be an int (a number of entries), got {answer!r}")
    base = load_base("base")
    want = count_trainable(new_plugin(base, PluginConfig(r=PLUGIN_R, targets=PLUGIN_TARGETS))).trainable
    if answer != want:
        L, d = base.config.n_layer, base.config.n_embd
        hint = ""
        if answer == L * PLUGIN_R * (3 * d + 4 * d):
            hint = " (A has r x d_in entries and B has d_out x r: count both factors)"
        elif answer == want // L:
            hint = f" (that is one block; the model has {L})"
        raise Mismatch(f"the plug-in trains {want:,} entries, you predicted {answer:,}{hint}")


# ----------------------------------------------------------------------------------- execution accuracy


def result_cases() -> list[tuple[str, list[tuple], list[tuple], bool]]:
    """(description, predicted rows, gold rows, ordered): equal and unequal results of the kinds a query returns."""
    rng = random.Random(7)
    gold = [(f"t{i}", 2019 + i % 5, round(rng.uniform(-50, 50), 3)) for i in range(8)]
    shuffled = gold[:]
    rng.shuffle(shuffled)
    noisy = [(a, b, c + 1e-9) for a, b, c in gold]  # float noise far below 6 digits
    cases = [
        ("the same rows", gold, list(gold), False),
        ("the same rows in another order (no ORDER BY)", shuffled, gold, False),
        ("the same rows in another order (ORDER BY)", shuffled, gold, True),
        ("the same rows in the same order (ORDER BY)", list(gold), gold, True),
        ("floats that differ in the 9th digit", noisy, gold, False),
        ("floats that differ in the 3rd digit", [(a, b, c + 1e-3) for a, b, c in gold], gold, False),
        ("a row missing", gold[:-1], gold, False),
        ("a row twice instead of two distinct rows", [gold[0], gold[0]], [gold[0], gold[1]], False),
        ("a duplicate row dropped", [gold[0], gold[1]], [gold[0], gold[0], gold[1]], False),
        ("one number (avg) equal", [(12.3456789,)], [(12.34567891,)], True),
        ("one number (count) differs", [(3,)], [(4,)], False),
        ("an empty result against a non-empty one", [], [(1,)], False),
        ("two empty results", [], [], False),
        ("NULL against 0", [(None,)], [(0,)], False),
        ("a NULL among other rows, shuffled", [(None, 1), ("a", 2)], [("a", 2), (None, 1)], False),
        ("an int against the equal float", [(3,)], [(3.0,)], False),
        ("columns in another order", [(b, a, c) for a, b, c in gold], gold, False),
    ]
    return cases


@checker("ch5.same_result")
def check_same_result(same_result: Callable[[list[tuple], list[tuple], bool], bool]) -> None:
    """same_result(pred_rows, gold_rows, ordered) -> bool, as the library's results_equal (EX's comparison)."""
    from chapters.ch5_applications.sql_eval import results_equal

    for what, pred, gold, ordered in result_cases():
        got = run(same_result, list(pred), list(gold), ordered, what=f"same_result on {what}")
        want = results_equal(pred, gold, ordered)
        if not isinstance(got, bool):
            raise Mismatch(f"same_result should return True or False, got {got!r} on {what}")
        if got != want:
            raise Mismatch(f"on {what} (ordered={ordered}): you say {got}, execution accuracy says {want}")


# ----------------------------------------------------------------------------------- M2 merge


def delta_cases() -> list[tuple[str, torch.Tensor, int, float]]:
    """(description, mean update [out, in], rank r, LoRA scale s) of several shapes and ranks."""
    g = torch.Generator().manual_seed(11)
    cases = []
    for out_f, in_f, r, rank_true, s in ((12, 8, 3, 8, 2.0), (8, 20, 4, 2, 0.5), (30, 16, 16, 16, 1.0),
                                         (16, 16, 1, 5, 4.0)):
        delta = torch.randn(out_f, rank_true, generator=g) @ torch.randn(rank_true, in_f, generator=g) / rank_true
        cases.append((f"a {out_f} x {in_f} update of rank {min(rank_true, out_f, in_f)}, r = {r}, s = {s}",
                      delta, r, s))
    return cases


@checker("ch5.factorize")
def check_factorize(factorize: Callable[[torch.Tensor, int, float], tuple[torch.Tensor, torch.Tensor]]) -> None:
    """factorize(delta, r, scale) -> (A [r, in], B [out, r]) with scale B A = the best rank-r approximation."""
    from chapters.ch5_applications.finsql import factorize as library

    for what, delta, r, s in delta_cases():
        got = run(factorize, delta.clone(), r, s, what=f"factorize on {what}")
        if not isinstance(got, tuple) or len(got) != 2:
            raise Mismatch(f"factorize should return the pair (A, B), got {type(got).__name__}")
        A, B = (torch.as_tensor(t).detach().double() for t in got)
        out_f, in_f = delta.shape
        if A.shape != (r, in_f) or B.shape != (out_f, r):
            raise Mismatch(f"on {what}: A is {tuple(A.shape)} and B {tuple(B.shape)}, expected A [{r}, {in_f}] "
                           f"and B [{out_f}, {r}]")
        A_ref, B_ref = library(delta, r, s)
        want = s * B_ref.double() @ A_ref.double()
        got_delta = s * B @ A
        if torch.allclose(got_delta / s, want, atol=1e-4) and abs(s - 1) > 1e-9:
            raise Mismatch(f"on {what}: B A equals the truncated update, so s B A is s times too large: divide "
                           "the factors by the square root of the scale")
        close(got_delta, want, f"s B A on {what}", atol=1e-4, rtol=1e-4)
