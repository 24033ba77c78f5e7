"""Each metric against a case worked out by hand (the arithmetic is in the comments)."""

import math

import pytest

from chapters.ch3_selective.glue_metrics import accuracy, confusion, f1, matthews, pearson, ranks, spearman, task_table

PRED = [1, 1, 0, 1, 0, 0, 1, 0]
GOLD = [1, 0, 0, 1, 1, 0, 1, 0]  # TP = 3 (i 0, 3, 6), FP = 1 (i 1), FN = 1 (i 4), TN = 3 (i 2, 5, 7)


def test_confusion_and_accuracy():
    assert confusion(PRED, GOLD) == (3, 1, 1, 3)
    assert accuracy(PRED, GOLD) == 6 / 8


def test_f1_by_hand():
    # P = 3/4, R = 3/4 -> F1 = 2 * (9/16) / (3/2) = 3/4
    assert f1(PRED, GOLD) == pytest.approx(0.75)
    # predicting all positive: TP 4, FP 4, FN 0 -> P 1/2, R 1 -> F1 = 2/3
    assert f1([1] * 8, GOLD) == pytest.approx(2 / 3)
    assert f1([0] * 8, GOLD) == 0.0


def test_matthews_by_hand():
    # (3*3 - 1*1) / sqrt(4 * 4 * 4 * 4) = 8 / 16 = 0.5
    assert matthews(PRED, GOLD) == pytest.approx(0.5)
    assert matthews(GOLD, GOLD) == pytest.approx(1.0)
    assert matthews([1 - g for g in GOLD], GOLD) == pytest.approx(-1.0)
    assert matthews([1] * 8, GOLD) == 0.0  # a constant prediction: a zero factor, MCC defined as 0


def test_pearson_and_spearman_by_hand():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 9.0]
    # means 2.5 and 5; cov = (-1.5)(-3) + (-0.5)(-1) + (0.5)(0) + (1.5)(4) = 11; vx = 5, vy = 26
    assert pearson(x, y) == pytest.approx(11 / math.sqrt(5 * 26))
    assert spearman(x, y) == pytest.approx(1.0)  # monotone
    assert spearman(x, [4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert ranks([10.0, 20.0, 20.0, 5.0]) == [2.0, 3.5, 3.5, 1.0]  # the tie shares ranks 3 and 4


def test_errors_and_table():
    with pytest.raises(ValueError, match="differ in length"):
        accuracy([1], [1, 0])
    with pytest.raises(ValueError, match="no examples"):
        accuracy([], [])
    with pytest.raises(ValueError, match="constant"):
        pearson([1.0, 1.0], [1.0, 2.0])
    table = task_table({"cola-like": (PRED, GOLD, ["matthews"]), "mrpc-like": (PRED, GOLD, ["accuracy", "f1"])})
    assert "| cola-like | matthews 0.500 | 0.500 |" in table
    assert "| mrpc-like | accuracy 0.750, f1 0.750 | 0.750 |" in table
    assert table.endswith("| average | | 0.625 |")
    with pytest.raises(ValueError, match="unknown metric"):
        task_table({"t": (PRED, GOLD, ["bleu"])})


def test_suite_table_on_a_tiny_model():
    import torch

    from chapters.ch3_selective.glue_metrics import suite_table
    from minimal.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=2048, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    table = suite_table(model, {"sentiment": ["accuracy", "matthews"]}, max_examples=10)
    assert table.startswith("| task |") and "| sentiment | accuracy " in table and "| average |" in table
