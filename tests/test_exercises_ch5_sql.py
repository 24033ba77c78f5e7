"""Chapter 5 (ch5_text_to_sql.ipynb) exercise checkers: the reference solutions pass, typical mistakes fail."""

from collections import Counter

import torch

from chapters.exercises import check
from tests.helpers import check_fails as fails
from tests.helpers import check_passes as passes


def test_unfilled_stubs_say_not_implemented(capsys):
    def stub(*args):
        raise NotImplementedError

    for name in ("ch5.same_result", "ch5.factorize"):
        assert not check(name, stub)
        assert "not implemented yet" in capsys.readouterr().out
    assert not check("ch5.plugin_count", None)
    assert "not implemented yet" in capsys.readouterr().out


# ---------------------------------------------------------------------------- plug-in size

def test_plugin_count(capsys):
    L, d, r = 4, 128, 16
    passes("ch5.plugin_count", L * r * ((d + 3 * d) + (d + 4 * d)), capsys)
    fails("ch5.plugin_count", L * r * (3 * d + 4 * d), capsys, "both factors")  # B only
    fails("ch5.plugin_count", r * ((d + 3 * d) + (d + 4 * d)), capsys, "one block")
    fails("ch5.plugin_count", 73728.0, capsys, "an int")


# ---------------------------------------------------------------------------- execution accuracy

def same_result(pred, gold, ordered=False):
    def canon(rows):
        return [tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in rows]
    p, g = canon(pred), canon(gold)
    return p == g if ordered else Counter(p) == Counter(g)


def test_same_result_reference_passes(capsys):
    passes("ch5.same_result", same_result, capsys)


def test_same_result_as_sets_fails(capsys):
    def as_sets(pred, gold, ordered=False):
        return set(pred) == set(gold) if not ordered else same_result(pred, gold, True)
    fails("ch5.same_result", as_sets, capsys)


def test_same_result_without_rounding_fails(capsys):
    def exact(pred, gold, ordered=False):
        return list(pred) == list(gold) if ordered else Counter(pred) == Counter(gold)
    fails("ch5.same_result", exact, capsys, "9th digit")


def test_same_result_ignoring_order_by_fails(capsys):
    fails("ch5.same_result", lambda p, g, o=False: same_result(p, g, False), capsys, "ORDER BY")


def test_same_result_always_ordered_fails(capsys):
    fails("ch5.same_result", lambda p, g, o=False: same_result(p, g, True), capsys, "another order")


# ---------------------------------------------------------------------------- M2 factorisation

def factorize(delta, r, scale):
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = (S[:r] / scale).sqrt()
    return (root[:, None] * Vh[:r]).to(delta.dtype), (U[:, :r] * root).to(delta.dtype)


def test_factorize_reference_passes(capsys):
    passes("ch5.factorize", factorize, capsys)


def test_factorize_all_in_b_passes(capsys):
    def unbalanced(delta, r, scale):  # another split of the same product is also right
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        return Vh[:r], U[:, :r] * S[:r] / scale
    passes("ch5.factorize", unbalanced, capsys)


def test_factorize_scale_forgotten_fails(capsys):
    def no_scale(delta, r, scale):
        return factorize(delta, r, 1.0)
    fails("ch5.factorize", no_scale, capsys, "square root of the scale")


def test_factorize_smallest_singular_values_fails(capsys):
    def smallest(delta, r, scale):
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        root = (S[-r:] / scale).sqrt()
        return root[:, None] * Vh[-r:], U[:, -r:] * root
    fails("ch5.factorize", smallest, capsys, "s B A")


def test_factorize_swapped_factors_fails(capsys):
    fails("ch5.factorize", lambda d, r, s: factorize(d, r, s)[::-1], capsys, "expected A")
