"""The repository's evaluation metrics, written by hand: GLUE's (chapter 3) and the ROC AUC of TabLLM (chapter 5).

Paper: Wang, Singh, Michael, Hill, Levy, Bowman, "GLUE: A Multi-Task Benchmark and Analysis Platform for
Natural Language Understanding", ICLR 2019, arXiv 1804.07461. GLUE scores each task with the metric that
suits it: accuracy, F1 of the positive class (MRPC, QQP), Matthews correlation (CoLA, where classes are
unbalanced) and Pearson/Spearman correlation (STS-B, a regression task).

    accuracy  = (TP + TN) / N
    F1        = 2 P R / (P + R),   P = TP / (TP + FP),   R = TP / (TP + FN)
    MCC       = (TP TN - FP FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN))     (0 when a factor is 0)
    Pearson   = cov(x, y) / (std(x) std(y))
    Spearman  = Pearson of the ranks (ties get the mean of the ranks they span)

`task_table` turns per-task predictions into a multi-task table, with the GLUE-style macro average.

ROC AUC, the metric of TabLLM (Hegselmann et al., AISTATS 2023, arXiv 2210.10723), which ranks rows by a
score instead of predicting a class: the probability that a random positive scores above a random
negative, a tie counting one half. By the rank-sum (Mann-Whitney) identity, with P positives, N negatives
and the same tie-averaged `ranks` as Spearman's,

    AUC = (sum of the positives' ranks - P (P + 1) / 2) / (P N)

With more than two classes `roc_auc_ovr` averages the one-vs-rest AUCs (class c against the rest, scored
by p(c)) without weights, as scikit-learn's multi_class="ovr", average="macro" does.

Copy: chapters/ch3_selective/glue_metrics.py
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _check(pred: Sequence, gold: Sequence) -> None:
    if len(pred) != len(gold):
        raise ValueError(f"predictions ({len(pred)}) and references ({len(gold)}) differ in length")
    if not gold:
        raise ValueError("no examples to score")


def accuracy(pred: Sequence, gold: Sequence) -> float:
    _check(pred, gold)
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


def confusion(pred: Sequence, gold: Sequence, positive: object = 1) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) for a binary task, `positive` naming the positive class."""
    _check(pred, gold)
    tp = sum(p == positive and g == positive for p, g in zip(pred, gold))
    fp = sum(p == positive and g != positive for p, g in zip(pred, gold))
    fn = sum(p != positive and g == positive for p, g in zip(pred, gold))
    return tp, fp, fn, len(gold) - tp - fp - fn


def f1(pred: Sequence, gold: Sequence, positive: object = 1) -> float:
    tp, fp, fn, _ = confusion(pred, gold, positive)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)  # equal to 2PR/(P+R)


def matthews(pred: Sequence, gold: Sequence, positive: object = 1) -> float:
    tp, fp, fn, tn = confusion(pred, gold, positive)
    denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return 0.0 if denom == 0 else (tp * tn - fp * fn) / math.sqrt(denom)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    _check(x, y)
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    vx, vy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    if vx == 0 or vy == 0:
        raise ValueError("correlation is undefined for a constant sequence")
    return cov / math.sqrt(vx * vy)


def ranks(x: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they occupy."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    out = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(ranks(x), ranks(y))


def roc_auc(y_true: torch.Tensor | Sequence, score: torch.Tensor | Sequence) -> float:
    """Binary ROC AUC: P(score of a random positive > score of a random negative), ties counting 1/2."""
    y = torch.as_tensor(y_true).flatten()
    s = torch.as_tensor(score, dtype=torch.float64).flatten()
    if len(y) != len(s):
        raise ValueError(f"y_true has {len(y)} entries but score has {len(s)}")
    if not torch.isfinite(s).all():
        raise ValueError("scores must be finite")
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError(f"binary AUC needs labels 0/1, got values {torch.unique(y).tolist()}")
    P, N = int((y == 1).sum()), int((y == 0).sum())
    if P == 0 or N == 0:
        raise ValueError(f"AUC needs both classes, got {P} positives and {N} negatives")
    r = torch.tensor(ranks(s.tolist()), dtype=torch.float64)  # [n], ties share the mean rank
    return float((r[y == 1].sum() - P * (P + 1) / 2) / (P * N))


def roc_auc_ovr(y_true: torch.Tensor | Sequence, proba: torch.Tensor) -> float:
    """One-vs-rest macro AUC: the mean over classes c of roc_auc(y == c, proba[:, c]). proba [n, C]."""
    y = torch.as_tensor(y_true).flatten()
    proba = torch.as_tensor(proba)
    if proba.dim() != 2 or proba.shape[0] != len(y):
        raise ValueError(f"proba must be [n={len(y)}, C], got shape {tuple(proba.shape)}")
    if y.min() < 0 or y.max() >= proba.shape[1]:
        raise ValueError(f"labels must be in [0, {proba.shape[1]}), got {torch.unique(y).tolist()}")
    return sum(roc_auc((y == c).long(), proba[:, c]) for c in range(proba.shape[1])) / proba.shape[1]


def auc(y_true: torch.Tensor | Sequence, proba: torch.Tensor) -> float:
    """TabLLM's metric: binary AUC from p(class 1) for two classes, else the one-vs-rest macro AUC. proba [n, C]."""
    proba = torch.as_tensor(proba)
    return roc_auc(y_true, proba[:, 1]) if proba.dim() == 2 and proba.shape[1] == 2 else roc_auc_ovr(y_true, proba)


METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def task_table(results: dict[str, tuple[Sequence, Sequence, list[str]]]) -> str:
    """Markdown table: {task: (predictions, references, metric names)} -> one row per task + the average.

    The average is GLUE's: the mean over tasks of each task's mean metric.
    """
    lines = ["| task | metrics | task score |", "|---|---|---|"]
    scores = []
    for task, (pred, gold, names) in results.items():
        unknown = [n for n in names if n not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {sorted(METRICS)}")
        values = {n: METRICS[n](pred, gold) for n in names}
        score = sum(values.values()) / len(values)
        scores.append(score)
        lines.append(f"| {task} | " + ", ".join(f"{n} {v:.3f}" for n, v in values.items()) + f" | {score:.3f} |")
    lines.append(f"| average | | {sum(scores) / len(scores):.3f} |")
    return "\n".join(lines)


SUITE = {"sentiment": ["accuracy", "f1", "matthews"], "family": ["accuracy"], "kv_recall": ["accuracy"]}


def suite_table(model, tasks: dict[str, list[str]] | None = None, max_examples: int = 100) -> str:
    """Score a model on the classification tasks of the suite with GLUE-style metrics (binary metrics use the
    task's last choice as the positive class: "good" for sentiment)."""
    from minimal.data import evaluation_subset, get_task
    from minimal.evaluate import choice_logprobs

    results = {}
    for name, metrics in (tasks or SUITE).items():
        task = get_task(name)
        data = evaluation_subset(task.test, max_examples)
        best = choice_logprobs(model, [ex.prompt for ex in data], task.choices, model.config.block_size).argmax(-1)
        positive = task.choices[-1]
        pred = [int(task.choices[i] == positive) if len(task.choices) == 2 else task.choices[i] for i in best.tolist()]
        gold = [int(ex.answer == positive) if len(task.choices) == 2 else ex.answer for ex in data]
        results[name] = (pred, gold, metrics)
    return task_table(results)
