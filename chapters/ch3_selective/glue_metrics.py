"""GLUE-style metrics, written by hand (evaluation context for chapter 3).

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence


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
