"""The kernel notebook's checkers: the reference answers pass, typical wrong answers fail with a message."""

from collections import defaultdict

import pytest
import torch

from chapters.ch4_low_rank.kernels import banks
from chapters.ch4_low_rank.kernels.reference import lora_epilogue
from chapters.exercises import check


def passes(name, answer, capsys):
    ok = check(name, answer)
    out = capsys.readouterr().out
    return ok, out


# ---- ch4.kernel_split_epilogue


def test_epilogue_reference_passes(capsys):
    assert passes("ch4.kernel_split_epilogue", lora_epilogue, capsys) == (True, "ch4.kernel_split_epilogue: passed\n")


def test_epilogue_written_by_hand_passes(capsys):
    def mine(acc, t, B, s):
        return acc + (s * t).to(B.dtype).float() @ B.float().T

    assert passes("ch4.kernel_split_epilogue", mine, capsys)[0]


@pytest.mark.parametrize(
    "wrong",
    [
        lambda acc, t, B, s: acc + t @ B.float().T,  # scale missing
        lambda acc, t, B, s: s * (acc + t @ B.float().T),  # scale applied to the accumulator too
        lambda acc, t, B, s: (s * t) @ B.float().T,  # accumulator dropped
        lambda acc, t, B, s: acc + (s * t) @ B.float(),  # B not transposed: a shape error
    ],
)
def test_epilogue_wrong_answers_fail(wrong, capsys):
    ok, out = passes("ch4.kernel_split_epilogue", wrong, capsys)
    assert not ok and "not yet" in out


# ---- ch4.kernel_roofline_ratio


def test_roofline_ratio_by_hand_passes(capsys):
    base = 2 * 4096**3 / 790e12  # compute-bound
    shrink = 2 * (4096 * 4096 + 16 * 4096 + 4096 * 16) / 4.8e12  # reads x (and A), writes t
    expand = 2 * (4096 * 16 + 4096 * 16 + 2 * 4096 * 4096) / 4.8e12  # reads t, B, y; writes y
    assert passes("ch4.kernel_roofline_ratio", (base + shrink + expand) / base, capsys)[0]


@pytest.mark.parametrize("wrong", [1.0, 1.28, 1.044, "1.12"])
def test_roofline_ratio_wrong_answers_fail(wrong, capsys):
    ok, out = passes("ch4.kernel_roofline_ratio", wrong, capsys)
    assert not ok and "not yet" in out


# ---- ch4.kernel_bank_conflict


def ways_by_hand(words):
    per_bank = defaultdict(set)
    for w in words:
        if w >= 0:
            per_bank[w % 32].add(w)
    return max((len(v) for v in per_bank.values()), default=0)


def test_bank_conflict_answers_pass(capsys):
    assert passes("ch4.kernel_bank_conflict", banks.conflict_ways, capsys)[0]
    assert passes("ch4.kernel_bank_conflict", ways_by_hand, capsys)[0]


def accesses_not_words(words):  # counts a broadcast as a conflict
    counts = defaultdict(int)
    for w in words:
        if w >= 0:
            counts[w % 32] += 1
    return max(counts.values(), default=0)


def idle_counted(words):  # -1 lands in bank 31
    per_bank = defaultdict(set)
    for w in words:
        per_bank[w % 32].add(w)
    return max(len(v) for v in per_bank.values())


def wrong_bank(words):  # bank = word // 32
    per_bank = defaultdict(set)
    for w in words:
        if w >= 0:
            per_bank[w // 32].add(w)
    return max((len(v) for v in per_bank.values()), default=0)


@pytest.mark.parametrize("wrong", [accesses_not_words, idle_counted, wrong_bank])
def test_bank_conflict_wrong_answers_fail(wrong, capsys):
    ok, out = passes("ch4.kernel_bank_conflict", wrong, capsys)
    assert not ok and "ways for" in out


# ---- ch4.kernel_padding_ways


def test_padding_ways(capsys):
    assert passes("ch4.kernel_padding_ways", [2, 2, 1, 2], capsys)[0]
    for wrong in ([16, 2, 1, 1], [1, 1, 1, 1], [2, 2, 1]):
        ok, out = passes("ch4.kernel_padding_ways", wrong, capsys)
        assert not ok and "not yet" in out


def test_stubs_report_not_implemented(capsys):
    def stub(*args):
        raise NotImplementedError

    for name in ("ch4.kernel_split_epilogue", "ch4.kernel_bank_conflict"):
        ok, out = passes(name, stub, capsys)
        assert not ok and "not implemented yet" in out
    for name in ("ch4.kernel_roofline_ratio", "ch4.kernel_padding_ways"):  # the `...` placeholder
        ok, out = passes(name, ..., capsys)
        assert not ok and "not implemented yet" in out
    assert torch.is_tensor(lora_epilogue(torch.zeros(2, 3), torch.zeros(2, 1), torch.zeros(3, 1), 1.0))
