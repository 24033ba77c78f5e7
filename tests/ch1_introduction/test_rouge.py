"""ROUGE-L by hand: every expected number below is worked out in the comment beside it."""

from __future__ import annotations

import itertools
import random

import pytest

from chapters.ch1_introduction.rouge import lcs_length, max_rouge_l, rouge_l, tokenize


def test_tokenize_lowercases_and_splits_on_non_alphanumerics() -> None:
    assert tokenize("Sort these 3 numbers, NOW!") == ["sort", "these", "3", "numbers", "now"]
    assert tokenize("snake_case-word") == ["snake", "case", "word"]
    assert tokenize("  ...  ") == []


def test_one_substitution() -> None:
    # c = the cat sat on the mat (6 tokens), r = the cat is on the mat (6 tokens)
    # LCS = "the cat on the mat" = 5  ->  P = 5/6, R = 5/6, F = 2 (5/6)(5/6) / (10/6) = 5/6
    s = rouge_l("the cat sat on the mat", "the cat is on the mat")
    assert s.precision == pytest.approx(5 / 6)
    assert s.recall == pytest.approx(5 / 6)
    assert s.fmeasure == pytest.approx(5 / 6)


def test_word_order_matters() -> None:
    # c = police killed the gunman, r = the gunman killed police (4 tokens each)
    # common subsequences in order: "the gunman" (2); "killed police" is not in order in c -> LCS = 2
    # P = R = 2/4 = 0.5, F = 0.5
    s = rouge_l("police killed the gunman", "the gunman killed police")
    assert s.fmeasure == pytest.approx(0.5)


def test_different_lengths() -> None:
    # c = sort the list of numbers (5), r = sort a list of numbers in ascending order (8)
    # LCS = "sort list of numbers" = 4  ->  P = 4/5 = 0.8, R = 4/8 = 0.5
    # F = 2 * 0.8 * 0.5 / (0.8 + 0.5) = 0.8 / 1.3 = 8/13 = 0.6154
    s = rouge_l("Sort the list of numbers", "Sort a list of numbers in ascending order")
    assert s.precision == pytest.approx(0.8)
    assert s.recall == pytest.approx(0.5)
    assert s.fmeasure == pytest.approx(8 / 13)
    # swapping candidate and reference swaps P and R; F is symmetric
    t = rouge_l("Sort a list of numbers in ascending order", "Sort the list of numbers")
    assert (t.precision, t.recall) == pytest.approx((0.5, 0.8))
    assert t.fmeasure == pytest.approx(8 / 13)


def test_gaps_are_allowed() -> None:
    # a b c d e vs a x c y e: LCS = a c e = 3 (not contiguous); F = 2*3 / (5 + 5) = 0.6
    assert lcs_length(list("abcde"), list("axcye")) == 3
    assert rouge_l(list("abcde"), list("axcye")).fmeasure == pytest.approx(0.6)


def test_identical_disjoint_and_empty() -> None:
    assert rouge_l("Hello, World!", "hello world").fmeasure == 1.0  # same tokens after normalisation
    assert rouge_l("alpha beta", "gamma delta").fmeasure == 0.0  # LCS = 0
    assert rouge_l("", "gamma delta").fmeasure == 0.0  # empty candidate: no division by zero


def test_threshold_case_of_self_instruct() -> None:
    # c = write a poem about the sea (6), r = write a short poem about the sea (7)
    # LCS = 6 (all of c) -> F = 2*6 / (6 + 7) = 12/13 = 0.923 >= 0.7: Self-Instruct would drop it
    assert rouge_l("write a poem about the sea", "write a short poem about the sea").fmeasure == pytest.approx(12 / 13)
    # c = write a poem about the sea (6), r = list three facts about the moon (6)
    # LCS = "about the" = 2 -> F = 4/12 = 0.333 < 0.7: kept
    assert rouge_l("write a poem about the sea", "list three facts about the moon").fmeasure == pytest.approx(1 / 3)


def test_max_over_pool() -> None:
    pool = ["list three facts about the moon", "write a short poem about the sea"]
    assert max_rouge_l("write a poem about the sea", pool) == pytest.approx(12 / 13)
    assert max_rouge_l("anything", []) == 0.0


def _brute_force_lcs(a: list[str], b: list[str]) -> int:
    """Longest subsequence of a (tried from the longest down) that is also a subsequence of b."""
    def is_subsequence(s: tuple[str, ...], t: list[str]) -> bool:
        it = iter(t)
        return all(x in it for x in s)

    for k in range(len(a), 0, -1):
        if any(is_subsequence(s, b) for s in itertools.combinations(a, k)):
            return k
    return 0


def test_lcs_agrees_with_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 7))]
        assert lcs_length(a, b) == _brute_force_lcs(a, b) == lcs_length(b, a)
