"""Each metric against a case worked out by hand (the arithmetic is in the comments), AUC also against sklearn."""

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from chapters.ch3_selective.glue_metrics import (
    accuracy,
    auc,
    confusion,
    f1,
    matthews,
    pearson,
    ranks,
    roc_auc,
    roc_auc_ovr,
    spearman,
    task_table,
)

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


def test_auc_hand_computed_cases():
    # 4 (positive, negative) pairs; 3 ordered right: positive 0.35 is below negative 0.4
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts one half
    # pairs: (0.5 vs 0.2) 1, (0.5 vs 0.5) 1/2, (0.9 vs 0.2) 1, (0.9 vs 0.5) 1 -> 3.5 / 4
    assert roc_auc([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.9]) == 0.875
    assert roc_auc([1, 1, 0], [0.9, 0.8, 0.1]) == 1.0 and roc_auc([1, 1, 0], [0.1, 0.2, 0.9]) == 0.0
    # one-vs-rest, class by class:
    #   class 0: scores 0.8 (pos), 0.1, 0.1, 0.2 -> 1
    #   class 1: scores 0.1, 0.3 (pos), 0.3, 0.2 -> (1 + 1/2 + 1) / 3 = 2.5 / 3
    #   class 2: scores 0.1, 0.6, 0.6 (pos), 0.6 (pos) -> each positive beats 0.1 and ties 0.6: 2 (1 + 1/2) / 4
    proba = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.3, 0.6], [0.1, 0.3, 0.6], [0.2, 0.2, 0.6]])
    y = torch.tensor([0, 1, 2, 2])
    assert roc_auc_ovr(y, proba) == pytest.approx((1.0 + 2.5 / 3 + 0.75) / 3, abs=1e-15)


def test_auc_matches_sklearn_with_ties():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        y = torch.randint(0, 2, (200,), generator=gen)
        s = (torch.rand(200, generator=gen) + 0.3 * y).mul(10).round() / 10  # few distinct values: many ties
        assert roc_auc(y, s) == pytest.approx(roc_auc_score(y.numpy(), s.numpy()), abs=1e-12)
        y3 = torch.randint(0, 3, (150,), generator=gen)
        proba = (torch.rand(150, 3, generator=gen, dtype=torch.float64) * 4).round().add(1e-3).softmax(-1)
        want = roc_auc_score(y3.numpy(), proba.numpy(), multi_class="ovr", average="macro")
        assert roc_auc_ovr(y3, proba) == pytest.approx(want, abs=1e-12)
        assert auc(y3, proba) == roc_auc_ovr(y3, proba)
        two = torch.stack([1 - s, s], 1)
        assert auc(y, two) == roc_auc(y, s)


def test_auc_bad_input():
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="entries"):
        roc_auc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="labels 0/1"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="proba must be"):
        roc_auc_ovr([0, 1, 2], torch.rand(2, 3))
    with pytest.raises(ValueError, match="labels must be in"):
        roc_auc_ovr([0, 1, 3], torch.rand(3, 3))


def test_suite_table_on_a_tiny_model():
    from chapters.ch3_selective.glue_metrics import suite_table
    from minimal.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=2048, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    table = suite_table(model, {"sentiment": ["accuracy", "matthews"]}, max_examples=10)
    assert table.startswith("| task |") and "| sentiment | accuracy " in table and "| average |" in table
