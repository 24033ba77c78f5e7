"""TabLLM: classify the rows of a table by writing them as text and asking a language model.

Paper: Stefan Hegselmann, Alejandro Buendia, Hunter Lang, Monica Agrawal, Xiaoyi Jiang, David Sontag,
"TabLLM: Few-shot Classification of Tabular Data with Large Language Models", AISTATS 2023,
arXiv 2210.10723 (code: clinicalml/TabLLM). Fine-tuning recipe: T-Few (Liu et al., NeurIPS 2022,
arXiv 2205.05638): (IA)^3 vectors (chapters/ch2_additive/ia3.py) trained with T-Few's loss
(chapters/ch2_additive/t_few.py) on a handful of rows.

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

Training (`fit`): apply a method first ((IA)^3 as in the paper, or LoRA, or any method whose apply returns
Hooks), then `fit` trains its parameters on the labelled prompts with T-Few's loss (ChoiceLoss: cross-
entropy + unlikelihood + length-normalised choice loss) in the shared loop (minimal/train.py). Scoring and
training share `t_few.answer_logprobs`, which runs each prompt once and its answers on its key/value cache.
The experiment on scikit-learn's tables (splits, priors, baselines) is in tabllm_recipe.py.

Choices made for a 1M-parameter GPT with a 128-token context:
- values: a tiny GPT cannot compare decimal numbers, so a value may be written as its tercile on
  reference rows ("low", "medium", "high": `tercile_edges`, `to_levels`); `to_numbers` writes the number
  itself, rounded to 3 significant digits, as the paper does;
- `check_fits` refuses a prompt that does not fit the context instead of cutting it;
- permuted names: one derangement of the column names for the whole table (seeded), so the link between
  a name and its value is wrong but consistent; permuted values: a fresh permutation of the values in
  every row (seeded by the row's id), so only the multiset of values in a row is left;
- training: AdamW (the shared loop) rather than T-Few's Adafactor.

Copy: minimal/gpt.py, minimal/hooks.py, minimal/peft.py, minimal/tokenizer.py, minimal/data.py, minimal/train.py, data/tokenizer.tiktoken, chapters/ch2_additive/t_few.py, chapters/ch5_applications/tabllm.py
"""  # noqa: E501

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from chapters.ch2_additive.t_few import ChoiceLoss, answer_logprobs, answer_scores
from minimal.data import Example, collate, encode_prompt, get_tokenizer
from minimal.hooks import Hooks
from minimal.train import TrainConfig, TrainResult, train

TEMPLATES = ("list", "text", "list_only_values", "list_permuted_names", "list_permuted_values")
LEVELS = ("low", "medium", "high")


# ------------------------------------------------------------------------------------------ values as words


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


# ------------------------------------------------------------------------------------------ scoring


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
        scores.append(answer_scores(logp, mask).cpu())  # [b, C]
    scores = torch.cat(scores)
    return scores.to(torch.promote_types(scores.dtype, torch.float32))  # float32, or float64 for a float64 model


def rank_classify(model: nn.Module, prompts: Sequence[str], choices: Sequence[str]) -> torch.Tensor:
    """p(class | row) = softmax over the choices of the length-normalised scores: [N, C], rows sum to 1."""
    return choice_scores(model, prompts, choices).softmax(-1)


# ------------------------------------------------------------------------------------------ training


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


def fit(model: nn.Module, prompts: Sequence[str], targets: Sequence[int], choices: Sequence[str], lr: float,
        hooks: Hooks | None = None, steps: int = 30, batch_size: int = 8, seed: int = 0,
        progress: bool | None = False) -> TrainResult:
    """Train what `model` trains (apply a method first, e.g. `hooks = apply_ia3(model)`) with T-Few's loss
    on the labelled prompts (targets: the index of each prompt's correct choice); `model` changes in place."""
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(f"need as many targets as prompts (and at least one), got {len(prompts)}, {len(targets)}")
    if any(not 0 <= t < len(choices) for t in targets):
        raise ValueError(f"targets must index the {len(choices)} choices, got {sorted(set(targets))}")
    block = model.config.block_size
    check_fits(prompts, choices, block)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=max(1, steps // 10), seed=seed, log_every=0,
                      progress=progress)
    return train(ChoiceLoss(model), lambda g: choice_batch(prompts, targets, choices, batch_size, block, g), cfg,
                 hooks=hooks, desc="tabllm")
