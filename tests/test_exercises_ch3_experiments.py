"""ch3_selective_experiments.ipynb exercise checkers: the reference solutions pass, typical mistakes fail."""

import math

import pytest

from chapters.exercises import check
from tests.helpers import check_fails as fails
from tests.helpers import check_passes as passes


def test_hiwi_count(capsys):
    r, n = 4, 128
    passes("ch3.hiwi_count", 4 * (2 * r * n + r + n), capsys)
    fails("ch3.hiwi_count", 4 * 2 * r * n, capsys)  # the adapter's biases forgotten
    fails("ch3.hiwi_count", 2 * r * n + r + n, capsys)  # one block only
    fails("ch3.hiwi_count", 4 * (2 * r * n + r + n) + 4 * n, capsys)  # the frozen bias counted too


def jaccard(a, b):
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    return inter / union if union else 0.0


def test_mask_overlap(capsys):
    passes("ch3.mask_overlap", jaccard, capsys)
    fails("ch3.mask_overlap", lambda a, b: sum(int((a[n] & b[n]).sum()) for n in a)
          / max(1, sum(int(a[n].sum()) for n in a)), capsys)  # divided by |a|
    fails("ch3.mask_overlap", lambda a, b: sum(jaccard({n: a[n]}, {n: b[n]}) for n in a) / len(a), capsys)  # per tensor
    fails("ch3.mask_overlap", lambda a, b: sum(int((a[n] & b[n]).sum()) for n in a)
          / sum(int(a[n].sum() + b[n].sum()) for n in a), capsys, "Jaccard overlap")  # |a| + |b| as the union


def confusion(pred, gold):
    tp = sum(p == 1 and g == 1 for p, g in zip(pred, gold))
    fp = sum(p == 1 and g == 0 for p, g in zip(pred, gold))
    fn = sum(p == 0 and g == 1 for p, g in zip(pred, gold))
    return tp, fp, fn, len(gold) - tp - fp - fn


def mcc(pred, gold):
    tp, fp, fn, tn = confusion(pred, gold)
    denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return (tp * tn - fp * fn) / math.sqrt(denom) if denom else 0.0


def test_matthews(capsys):
    passes("ch3.matthews", mcc, capsys)

    def no_guard(pred, gold):
        tp, fp, fn, tn = confusion(pred, gold)
        return (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    fails("ch3.matthews", no_guard, capsys, "raised ZeroDivisionError")

    def no_sqrt(pred, gold):
        tp, fp, fn, tn = confusion(pred, gold)
        denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
        return (tp * tn - fp * fn) / denom if denom else 0.0
    fails("ch3.matthews", no_sqrt, capsys, "MCC")
    fails("ch3.matthews", lambda pred, gold: sum(p == g for p, g in zip(pred, gold)) / len(gold), capsys)


def pearson(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def mean_ranks(x):
    return [sum(v < xi for v in x) + (sum(v == xi for v in x) + 1) / 2 for xi in x]


def test_spearman(capsys):
    passes("ch3.spearman", lambda x, y: pearson(mean_ranks(x), mean_ranks(y)), capsys)

    def ordinal(x):  # ties broken by position instead of sharing the mean rank
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0] * len(x)
        for pos, i in enumerate(order):
            r[i] = pos + 1
        return r
    fails("ch3.spearman", lambda x, y: pearson(ordinal(x), ordinal(y)), capsys, "with ties")
    fails("ch3.spearman", pearson, capsys)  # Pearson of the values


@pytest.mark.parametrize("name", ["ch3.mask_overlap", "ch3.matthews", "ch3.spearman"])
def test_unfilled_stubs_say_not_implemented(name, capsys):
    def stub(*args):
        raise NotImplementedError
    assert not check(name, stub)
    assert "not implemented yet" in capsys.readouterr().out


def test_unanswered_prediction_says_not_implemented(capsys):
    assert not check("ch3.hiwi_count", None)
    assert "not implemented yet" in capsys.readouterr().out
