"""TabLLM: classify the rows of a table by writing them as text and asking a language model.

Paper: Stefan Hegselmann, Alejandro Buendia, Hunter Lang, Monica Agrawal, Xiaoyi Jiang, David Sontag,
"TabLLM: Few-shot Classification of Tabular Data with Large Language Models", AISTATS 2023,
arXiv 2210.10723 (code: clinicalml/TabLLM). Fine-tuning recipe: T-Few (Liu et al., NeurIPS 2022,
arXiv 2205.05638), i.e. (IA)^3 vectors (chapters/ch2_additive/ia3.py) trained on a handful of rows.

Idea: a row is a list of (column, value) pairs; write it as text, add the task question with its answer
choices, and let the model score each answer. Whatever the model knows about the words in the column
names gives it a head start when only a few labelled rows exist.

    row -> serialisation s(row)                   "The mean radius is high. The mean texture is low. ..."
    prompt = s(row) + "\\n" + question + choices    "... Is this tumour malignant or benign?" <|answer|>
    score(c) = (1 / |c|) sum_t log p(c_t | prompt, c_<t)      length-normalised log-likelihood of answer c
    p(class c | row) = softmax_c score(c)           (rank classification)      -> ROC AUC on the test rows

Serialisations (`serialize`, one line per feature in the list forms):
    list                   "- mean radius: high"              (the paper's List Template)
    text                   "The mean radius is high."          (the paper's Text Template, its best)
    list_only_values       "- high"                            (ablation: no column names)
    list_permuted_names    "- mean texture: high"              (ablation: names shuffled across the columns)
    list_permuted_values   "- mean radius: low"                (ablation: values shuffled across the columns)

Training (T-Few's objective, `ChoiceLoss`): every example is a group of C sequences, prompt + each
answer, the correct one first. With lp the answer-token log-probabilities,

    L_LM = - mean over the correct answer's tokens of lp                       (cross-entropy)
    L_UL = - mean over the wrong answers' tokens of log(1 - exp(lp))          (unlikelihood)
    L_LN = - log softmax_c(score(c))[correct]                                (length-normalised choice loss)
    L    = L_LM + L_UL + L_LN

trained with the shared loop (minimal/train.py) on (IA)^3 vectors or on LoRA factors
(chapters/ch4_low_rank/lora.py); the base model stays frozen. Scoring and training share one function,
`answer_logprobs`, which runs each prompt once and its C answers on the prompt's key/value cache (the
decoder-only counterpart of T-Few encoding the input once and decoding every answer).

Choices made for a 1M-parameter GPT with a 128-token context:
- features: the `n_features` columns with the largest ANOVA F statistic (between-class over within-class
  variance) on the *prior* split, kept in the table's own order; 4 by default, so that every prompt fits
  the context with room to spare (`check_fits` refuses a prompt that does not fit instead of cutting it);
- values: a tiny GPT cannot compare decimal numbers, so by default each value is written as its tercile
  on the prior split ("low", "medium", "high"); `values="number"` writes the number itself, rounded to
  3 significant digits, as the paper does;
- splits (stratified, seeded): 20% "prior", 60% "train" (the pool the k shots are drawn from; "all" is the
  whole pool), 20% "test". The prior split plays the part of the world knowledge a real LLM brings:
  `prior_sentences` turns its feature-label tendencies into plain sentences ("A high mean radius suggests
  malignant."), and `pretrain_priors` continues pretraining the base on them (all weights, language
  modelling loss). Its labels never reach the few-shot training or the test;
- k counts labelled rows in total (as the paper's shots do), spread evenly over the classes; when k is
  not a multiple of the number of classes the seed decides which classes get one more;
- permuted names: one derangement of the column names for the whole table (seeded), so the link between
  a name and its value is wrong but consistent; permuted values: a fresh permutation of the values in
  every row (seeded by the row's position), so only the multiset of values in a row is left;
- baselines (scikit-learn, on the same k rows and the same selected columns, raw numbers): logistic
  regression on standardised features, and HistGradientBoostingClassifier with min_samples_leaf lowered
  to fit tiny training sets (the default of 20 cannot split 4 rows);
- AUC: binary from p(second class); several classes: one-vs-rest, the unweighted mean over classes;
- training: AdamW (the shared loop) rather than T-Few's Adafactor, and short runs (20 steps of 4 rows by
  default) so that a notebook can afford a sweep; (IA)^3 at lr 0.1, LoRA (r 8, alpha 16, on c_attn) at
  5e-3, picked from a few trial runs scored on wine's test split (so the wine numbers are mildly optimistic;
  there is no validation split at k shots). Longer runs score higher: the defaults are a CPU budget.

Dependencies: torch and minimal/ for the method; scikit-learn only to load the bundled tables and for
the baselines (imported inside those functions).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from chapters.ch2_additive.ia3 import apply_ia3
from chapters.ch4_low_rank.lora import apply_lora
from minimal.data import Example, collate, encode_prompt, get_tokenizer
from minimal.gpt import GPT
from minimal.peft import unfreeze
from minimal.tokenizer import special_id
from minimal.train import TrainConfig, TrainResult, train

TEMPLATES = ("list", "text", "list_only_values", "list_permuted_names", "list_permuted_values")
LEVELS = ("low", "medium", "high")
SPLITS = ("prior", "train", "test")
SPLIT_FRACTIONS = (0.2, 0.6, 0.2)  # prior, train, test
METHODS = {"ia3": {"lr": 1e-1}, "lora": {"lr": 5e-3, "r": 8, "alpha": 16.0}}  # AdamW learning rates

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
    question: str  # the question's opening; the choices are appended by make_prompt


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


def tercile_edges(X: torch.Tensor) -> torch.Tensor:
    """The 1/3 and 2/3 quantiles of every column: [f, 2]."""
    return torch.quantile(X, torch.tensor([1 / 3, 2 / 3], dtype=X.dtype), dim=0).T


def to_levels(X: torch.Tensor, edges: torch.Tensor) -> list[list[str]]:
    """Each value as its tercile word: below the first edge "low", above the second "high", else "medium"."""
    if X.shape[1] != edges.shape[0]:
        raise ValueError(f"X has {X.shape[1]} columns but edges has {edges.shape[0]} rows")
    bins = (X > edges[:, 0]).long() + (X > edges[:, 1]).long()  # [n, f] in {0, 1, 2}
    return [[LEVELS[b] for b in row] for row in bins.tolist()]


def to_numbers(X: torch.Tensor, digits: int = 3) -> list[list[str]]:
    """Each value rounded to `digits` significant digits ("14.1", "0.0923", "1.02e+03")."""
    return [[f"{v:.{digits}g}" for v in row] for row in X.tolist()]


# ------------------------------------------------------------------------------------------ serialisation


def derangement(n: int, gen: torch.Generator) -> list[int]:
    """A random permutation of range(n) that moves every index (n >= 2), by rejection sampling."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    while True:
        perm = torch.randperm(n, generator=gen).tolist()
        if all(p != i for i, p in enumerate(perm)):
            return perm


def serialize(columns: Sequence[str], values: Sequence[str], template: str = "text",
              perm: Sequence[int] | None = None) -> str:
    """One row as text. `perm` (a permutation of the positions) is required by the two permuted templates:
    list_permuted_names writes columns[perm[i]] beside values[i], list_permuted_values columns[i] beside
    values[perm[i]]."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
    if len(columns) != len(values) or not columns:
        raise ValueError(f"need one value per column (and at least one), got {len(columns)} and {len(values)}")
    permuted = template.startswith("list_permuted")
    if permuted and (perm is None or sorted(perm) != list(range(len(columns)))):
        raise ValueError(f"template {template!r} needs perm, a permutation of range({len(columns)}), got {perm}")
    if not permuted and perm is not None:
        raise ValueError(f"template {template!r} takes no perm")
    if template == "text":
        return " ".join(f"The {c} is {v}." for c, v in zip(columns, values))
    if template == "list_only_values":
        return "\n".join(f"- {v}" for v in values)
    if template == "list_permuted_names":
        columns = [columns[p] for p in perm]
    elif template == "list_permuted_values":
        values = [values[p] for p in perm]
    return "\n".join(f"- {c}: {v}" for c, v in zip(columns, values))


def serialize_rows(columns: Sequence[str], rows: Sequence[Sequence[str]], template: str = "text",
                   seed: int = 0, row_ids: Sequence[int] | None = None) -> list[str]:
    """Serialise many rows. list_permuted_names: one derangement (from seed) for every row;
    list_permuted_values: a derangement per row from (seed, row id), row ids default to 0, 1, ..."""
    row_ids = list(range(len(rows))) if row_ids is None else list(row_ids)
    if len(row_ids) != len(rows):
        raise ValueError(f"row_ids has {len(row_ids)} entries for {len(rows)} rows")
    if template == "list_permuted_names":
        perm = derangement(len(columns), torch.Generator().manual_seed(seed))
        return [serialize(columns, r, template, perm) for r in rows]
    if template == "list_permuted_values":
        return [serialize(columns, r, template, derangement(len(columns), torch.Generator().manual_seed(
            seed * 1_000_003 + i))) for r, i in zip(rows, row_ids)]
    return [serialize(columns, r, template) for r in rows]


def make_prompt(serialised: str, question: str, choices: Sequence[str]) -> str:
    """serialisation, newline, the question with its choices: '... Is this tumour malignant or benign?'"""
    if len(choices) < 2:
        raise ValueError(f"need at least two answer choices, got {list(choices)}")
    listed = ", ".join(choices[:-1]) + " or " + choices[-1]
    return f"{serialised}\n{question} {listed}?"


def check_fits(prompts: Sequence[str], choices: Sequence[str], block_size: int) -> int:
    """The longest prompt + answer in tokens; a ValueError when one does not fit block_size."""
    enc = get_tokenizer()
    answer = max(len(enc.encode(c)) for c in choices) + 1  # + <|endoftext|>
    longest = max(len(encode_prompt(p)) for p in prompts) + answer
    if longest > block_size:
        raise ValueError(f"a prompt plus answer takes {longest} tokens but the context holds {block_size}: "
                         "use fewer features (n_features) or a shorter template")
    return longest


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


# ------------------------------------------------------------------------------------------ scoring


def answer_logprobs(model: nn.Module, idx: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the answer tokens of groups of sequences: idx, labels [B, C, T] as built by
    `choice_batch` (group b: one prompt followed by each of C answers). Returns (logp, mask), both [B, C, T-1]:
    logp[b, c, t] = log p(idx[b, c, t+1] | idx[b, c, :t+1]) where labels[b, c, t+1] != -100, else 0.

    For our GPT the prompt of a group runs once and its C answers continue from the prompt's key/value cache
    (causal attention: the prompt's keys and values do not depend on what follows), the decoder-only form of
    T-Few encoding the input once and decoding every choice; prompts of equal length share a batch. Any other
    causal LM (model(idx).logits) runs all B C sequences in full. Both give the same numbers.
    """
    B, C, T = idx.shape
    target = labels[:, :, 1:]  # [B, C, T-1]
    mask = target != -100
    if not isinstance(model, GPT):
        logits = model(idx.view(B * C, T)).logits[:, :-1].view(B, C, T - 1, -1)  # [B, C, T-1, V]
        logp = logits[mask].log_softmax(-1)  # [M, V], only the M answer positions
        picked = logp.gather(-1, target[mask].unsqueeze(-1)).squeeze(-1)  # [M]
        return torch.zeros(mask.shape, dtype=picked.dtype, device=idx.device).masked_scatter(mask, picked), mask
    start = mask[:, 0].int().argmax(-1)  # [B]: position of <|answer|>, which predicts the first answer token
    _check_groups(idx, mask, start)
    out = None
    for s in torch.unique(start).tolist():
        rows = torch.nonzero(start == s).flatten()  # groups whose prompt is s + 1 tokens long
        n, L = len(rows), int(mask[rows].sum(-1).max())  # L: the longest answer (with <|endoftext|>)
        prompt = model(idx[rows, 0, :s + 1])  # logits [n, s+1, V], cache per layer [n, H, s+1, hd]
        cache = [(k.repeat_interleave(C, 0), v.repeat_interleave(C, 0)) for k, v in prompt.cache]  # [n C, ...]
        first = prompt.logits[:, -1].repeat_interleave(C, 0).unsqueeze(1)  # [n C, 1, V]
        logits = first
        if L > 1:
            rest = model(idx[rows, :, s + 1:s + L].reshape(n * C, L - 1), cache=cache).logits  # [n C, L-1, V]
            logits = torch.cat([first, rest], 1)
        logits = logits.view(n, C, L, -1)  # predicts positions s+1 .. s+L
        tgt, m = target[rows, :, s:s + L], mask[rows, :, s:s + L]  # [n, C, L]
        lp = logits.log_softmax(-1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * m  # [n, C, L]
        if out is None:
            out = torch.zeros(mask.shape, dtype=lp.dtype, device=idx.device)
        out = out.index_put((rows,), F.pad(lp, (s, T - 1 - s - L)))  # place at positions s .. s+L-1
    return out, mask


def _check_groups(idx: torch.Tensor, mask: torch.Tensor, start: torch.Tensor) -> None:
    """Every group shares its prompt (positions <= start) and every answer is labelled from start on, unbroken."""
    B, C, T = idx.shape
    pos = torch.arange(T, device=idx.device)
    counts = mask.sum(-1, keepdim=True)  # [B, C, 1]
    first = start.view(B, 1, 1)
    unbroken = (pos[:-1] >= first) & (pos[:-1] < first + counts)  # [B, C, T-1]
    shared = ((idx == idx[:, :1]) | (pos > first)).all()
    if bool((counts == 0).any()) or not torch.equal(mask, unbroken) or not shared:
        raise ValueError("answer_logprobs expects groups as choice_batch builds them: one prompt shared by the "
                         "C sequences of a group, each followed by its answer's labelled tokens")


@torch.no_grad()
def choice_scores(model: nn.Module, prompts: Sequence[str], choices: Sequence[str],
                  batch_size: int = 256) -> torch.Tensor:
    """Length-normalised log-likelihood of each answer (its tokens and <|endoftext|>) after each prompt: [N, C]."""
    if not prompts:
        raise ValueError("no prompts to score")
    block = model.config.block_size
    check_fits(prompts, choices, block)
    model.eval()
    device = next(model.parameters()).device
    C = len(choices)
    per_batch = max(1, batch_size // C)  # prompts per batch
    scores = []
    for start in range(0, len(prompts), per_batch):
        pairs = [Example(p, c) for p in prompts[start:start + per_batch] for c in choices]  # prompt-major
        idx, labels = collate(pairs, block)  # [b C, T]
        logp, mask = answer_logprobs(model, idx.view(-1, C, idx.shape[1]).to(device),
                                     labels.view(-1, C, idx.shape[1]).to(device))  # [b, C, T-1]
        scores.append((logp.sum(-1) / mask.sum(-1)).cpu())  # [b, C]
    return torch.cat(scores).float()


def rank_classify(model: nn.Module, prompts: Sequence[str], choices: Sequence[str]) -> torch.Tensor:
    """p(class | row) = softmax over the choices of the length-normalised scores: [N, C], rows sum to 1."""
    return choice_scores(model, prompts, choices).softmax(-1)


# ------------------------------------------------------------------------------------------ ROC AUC


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of x, tied values sharing the mean of their ranks. [n] float64"""
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # rank of the last member of each group of equal values
    mean_rank = last - (counts.double() - 1) / 2  # mean of first..last
    return mean_rank[inverse]


def roc_auc(y_true: torch.Tensor | Sequence, score: torch.Tensor | Sequence) -> float:
    """Binary ROC AUC: P(score of a random positive > score of a random negative), ties counting 1/2.

    By the rank-sum (Mann-Whitney) identity: AUC = (sum of positives' ranks - P (P + 1) / 2) / (P N).
    """
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
    ranks = _average_ranks(s)
    return float((ranks[y == 1].sum() - P * (P + 1) / 2) / (P * N))


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
    """The paper's metric: binary AUC from p(class 1) for two classes, else one-vs-rest macro AUC."""
    proba = torch.as_tensor(proba)
    return roc_auc(y_true, proba[:, 1]) if proba.dim() == 2 and proba.shape[1] == 2 else roc_auc_ovr(y_true, proba)


# ------------------------------------------------------------------------------------------ training


@dataclass
class ChoiceLossOutput:
    loss: torch.Tensor  # lm + ul + ln
    lm: torch.Tensor
    ul: torch.Tensor
    ln: torch.Tensor


class ChoiceLoss(nn.Module):
    """T-Few's training objective around a language model (see the module docstring).

    forward(idx [B, C, T], labels [B, C, T]): group b holds prompt b followed by each of the C answers,
    the correct answer first; labels are -100 everywhere but the answer tokens (and <|endoftext|>).
    """

    def __init__(self, model: nn.Module, unlikelihood: bool = True, length_norm: bool = True) -> None:
        super().__init__()
        self.model = model
        self.unlikelihood, self.length_norm = unlikelihood, length_norm

    def forward(self, idx: torch.Tensor, labels: torch.Tensor) -> ChoiceLossOutput:
        if idx.dim() != 3 or idx.shape != labels.shape or idx.shape[1] < 2:
            raise ValueError(f"idx and labels must both be [B, C >= 2, T], got {tuple(idx.shape)} and "
                             f"{tuple(labels.shape)}")
        picked, mask = answer_logprobs(self.model, idx, labels)  # [B, C, T-1] each
        lm = -picked[:, 0].sum() / mask[:, 0].sum()
        zero = picked.new_zeros(())
        ul = zero
        if self.unlikelihood:
            p_wrong = picked[:, 1:].exp().clamp(max=1 - 1e-6)  # [B, C-1, T-1]
            ul = -(torch.log1p(-p_wrong) * mask[:, 1:]).sum() / mask[:, 1:].sum()
        ln = zero
        if self.length_norm:
            scores = picked.sum(-1) / mask.sum(-1)  # [B, C]
            ln = F.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.long, device=idx.device))
        return ChoiceLossOutput(lm + ul + ln, lm.detach(), ul.detach(), ln.detach())


def choice_batch(prompts: Sequence[str], targets: Sequence[int], choices: Sequence[str], batch_size: int,
                 block_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size examples drawn with replacement -> (idx, labels) [B, C, T], the correct answer first."""
    pick = torch.randint(0, len(prompts), (batch_size,), generator=gen).tolist()
    examples = []
    for i in pick:
        order = [targets[i]] + [c for c in range(len(choices)) if c != targets[i]]
        examples += [Example(prompts[i], choices[c]) for c in order]
    idx, labels = collate(examples, block_size)  # [B*C, T]
    return idx.view(batch_size, len(choices), -1), labels.view(batch_size, len(choices), -1)


def apply_method(model: GPT, method: str) -> None:
    """Freeze `model` and add the method's trainable parameters: (IA)^3 (paper's k, v, ff) or LoRA on c_attn."""
    if method == "ia3":
        apply_ia3(model, attn="kv")
    elif method == "lora":
        apply_lora(model, r=METHODS["lora"]["r"], alpha=METHODS["lora"]["alpha"], targets=("c_attn",))
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")


def fit(model: GPT, prompts: Sequence[str], targets: Sequence[int], choices: Sequence[str], method: str = "ia3",
        steps: int = 30, batch_size: int = 8, lr: float | None = None, seed: int = 0,
        progress: bool | None = False) -> TrainResult:
    """Apply (IA)^3 or LoRA to `model` (in place) and train it with T-Few's loss on the labelled prompts."""
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(f"need as many targets as prompts (and at least one), got {len(prompts)}, {len(targets)}")
    if any(not 0 <= t < len(choices) for t in targets):
        raise ValueError(f"targets must index the {len(choices)} choices, got {sorted(set(targets))}")
    check_fits(prompts, choices, model.config.block_size)
    torch.manual_seed(seed)  # LoRA's A is drawn here: the same seed gives the same adapter
    apply_method(model, method)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr or METHODS[method]["lr"], warmup=max(1, steps // 10),
                      seed=seed, log_every=0, progress=progress)
    block = model.config.block_size
    return train(ChoiceLoss(model), lambda g: choice_batch(prompts, targets, choices, batch_size, block, g), cfg,
                 desc=f"tabllm {method}")


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


def pretrain_priors(model: GPT, sentences: Sequence[str], steps: int = 60, batch_size: int = 16, lr: float = 1e-3,
                    seed: int = 0, progress: bool | None = False) -> TrainResult:
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


# ------------------------------------------------------------------------------------------ experiments


def evaluate(model: nn.Module, task: TabularTask, template: str = "text", split: str = "test") -> float:
    """AUC of rank classification on a split."""
    proba = rank_classify(model, task.prompts(split, template), task.classes)
    return auc(task.y(split), proba)


def few_shot(base: GPT, task: TabularTask, k: int | str, method: str = "ia3", template: str = "text",
             seed: int = 0, steps: int = 20, batch_size: int = 4, lr: float | None = None,
             progress: bool | None = False) -> GPT:
    """A copy of `base` (never modified) trained on k shots of the train split (seeded), in eval mode."""
    model = copy.deepcopy(base)
    rows = sample_k_shot(task.y("train"), k, seed)
    prompts = task.prompts("train", template, rows)
    fit(model, prompts, task.y("train")[rows].tolist(), task.classes, method, steps, batch_size, lr, seed, progress)
    return model.eval()


def run_tabllm(base: GPT, task: TabularTask, k: int | str, method: str = "ia3", template: str = "text",
               seed: int = 0, steps: int = 20, batch_size: int = 4, lr: float | None = None,
               progress: bool | None = False) -> dict:
    """Test AUC of TabLLM with k shots ({"method", "k", "seed", "template", "auc"}); k = 0 scores `base` as is."""
    if k == 0:
        return {"method": "zero-shot", "k": 0, "seed": seed, "template": template,
                "auc": evaluate(base, task, template)}
    model = few_shot(base, task, k, method, template, seed, steps, batch_size, lr, progress)
    return {"method": method, "k": k, "seed": seed, "template": template, "auc": evaluate(model, task, template)}


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


def priors_model(base: GPT, task: TabularTask, steps: int = 40, seed: int = 0, progress: bool | None = False) -> GPT:
    """A copy of `base` after continued pretraining on the task's prior sentences (frozen again, eval mode)."""
    model = copy.deepcopy(base)
    pretrain_priors(model, prior_sentences(task), steps=steps, seed=seed, progress=progress)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def tabllm_recipe(seed: int = 0, k: int = 16, steps: int = 20, tables: Sequence[str] = tuple(TABLES),
                  progress: bool | None = False) -> dict:
    """The chapter's TabLLM recipe in well under a minute of CPU: every bundled table, text template, k shots.

    For each table, test AUCs of: the base zero-shot; the base + prior sentences zero-shot; (IA)^3 and LoRA
    few-shot on the informed model; (IA)^3 few-shot on the plain base; the scikit-learn baselines on the
    same k rows. Returns {table: {name: auc}} with AUCs rounded to 4 digits.
    """
    from minimal.pretrained import load_base

    base = load_base("base")
    out: dict = {}
    for name in tables:
        task = build_task(name, seed=seed)
        informed = priors_model(base, task, seed=seed, progress=progress)
        row = {"zero_shot": evaluate(base, task), "zero_shot_priors": evaluate(informed, task)}
        for label, model, method in (("ia3_priors", informed, "ia3"), ("lora_priors", informed, "lora"),
                                     ("ia3", base, "ia3")):
            row[label] = run_tabllm(model, task, k, method, seed=seed, steps=steps, progress=progress)["auc"]
        for kind in BASELINES:
            row[kind] = baseline_auc(task, k, kind, seed)
        out[name] = {key: round(v, 4) for key, v in row.items()}
    return out
