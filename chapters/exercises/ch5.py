"""Checkers for chapter 5's exercises in `ch5_applications.ipynb` (TabLLM: AUC, serialisation, rank classification).

The text-to-SQL notebook's checkers are in `ch5_sql.py`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch

from chapters.exercises import Mismatch, checker, close, equal, run

# The hand example of the one-vs-rest AUC exercise: 6 rows, 3 classes, one tie (0.6 in the third column).
OVR_LABELS = [0, 1, 2, 0, 1, 2]
OVR_PROBA = [[0.6, 0.3, 0.1],
             [0.2, 0.5, 0.3],
             [0.1, 0.3, 0.6],
             [0.3, 0.1, 0.6],
             [0.4, 0.4, 0.2],
             [0.2, 0.2, 0.6]]


def as_number(answer: Any, what: str) -> float:
    """A predicted number (int, float or Fraction) as a float; None means not answered yet."""
    if answer is None or answer is ...:
        raise NotImplementedError
    if isinstance(answer, bool) or not isinstance(answer, (int, float, Fraction)):
        raise Mismatch(f"{what} should be a number, got {answer!r}")
    return float(answer)


# ----------------------------------------------------------------------------------- AUC


@checker("ch5.ovr_auc")
def check_ovr_auc(answer: Any) -> None:
    """The one-vs-rest macro AUC of the 6-row example (OVR_LABELS, OVR_PROBA), computed by hand."""
    from chapters.ch3_selective.glue_metrics import auc

    got = as_number(answer, "the AUC")
    y, p = torch.tensor(OVR_LABELS), torch.tensor(OVR_PROBA, dtype=torch.float64)
    want = auc(y, p)
    if abs(got - want) > 1e-6:
        strict = sum(float((p[y == c, c][:, None] > p[y != c, c][None]).double().mean()) for c in range(3)) / 3
        hint = (" (a tie counts one half, not zero)" if abs(got - strict) < 1e-6 else
                " (average the three one-vs-rest AUCs: class c against the rest, scored by column c)")
        raise Mismatch(f"you have {got:.6g}, the library's one-vs-rest AUC is different{hint}")


def auc_cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(description, labels 0/1, scores) pairs: continuous scores, heavy ties, tiny and unbalanced sets."""
    g = torch.Generator().manual_seed(5)
    cases = []
    for n, levels, shift in ((40, None, 0.3), (200, 6, 0.2), (7, 3, 0.5), (300, 2, 0.1), (25, None, -0.4)):
        y = torch.randint(0, 2, (n,), generator=g)
        y[0], y[1] = 0, 1  # both classes present
        s = torch.rand(n, generator=g, dtype=torch.float64) + shift * y
        if levels is not None:
            s = (s * levels).floor()  # few distinct values: many ties
        ties = "continuous scores" if levels is None else f"scores with {len(torch.unique(s))} distinct values"
        cases.append((f"{n} rows ({int(y.sum())} positive), {ties}", y, s))
    cases.append(("4 rows, every score equal", torch.tensor([0, 1, 0, 1]), torch.full((4,), 0.5, dtype=torch.float64)))
    return cases


@checker("ch5.roc_auc")
def check_roc_auc(roc_auc: Callable[[torch.Tensor, torch.Tensor], float]) -> None:
    """roc_auc(y_true, score) -> P(a positive scores above a negative), ties 1/2, as the library's roc_auc."""
    from chapters.ch3_selective.glue_metrics import roc_auc as library_roc_auc

    for what, y, s in auc_cases():
        got = run(roc_auc, y.clone(), s.clone(), what=f"roc_auc on {what}")
        try:
            got = float(got)
        except (TypeError, ValueError) as err:
            raise Mismatch(f"roc_auc should return a number, got {type(got).__name__}") from err
        want = library_roc_auc(y, s)
        if abs(got - want) > 1e-9:
            hint = ""
            if abs(got - (1 - want)) < 1e-9 and abs(want - 0.5) > 1e-9:
                hint = " (that is 1 - AUC: are positives and negatives swapped?)"
            elif len(torch.unique(s)) < len(s):
                hint = " (this case has tied scores: a tied pair counts one half; average the ranks of equal scores)"
            raise Mismatch(f"on {what}: you return {got:.6f}, the AUC is {want:.6f}{hint}")


# ----------------------------------------------------------------------------------- serialisation


def serialization_cases() -> list[tuple[list[str], list[str]]]:
    """(columns, values) rows of the three bundled tables, as words and as numbers, plus a one-column row."""
    from chapters.ch5_applications.tabllm_recipe import build_task

    cases = []
    for i, (name, n_features, values) in enumerate((("wine", 4, "level"), ("iris", 3, "number"),
                                                     ("breast_cancer", 5, "level"), ("wine", 1, "number"))):
        task = build_task(name, n_features=n_features, values=values, seed=i)
        for row in task.values["test"][:2]:
            cases.append((list(task.columns), list(row)))
    return cases


@checker("ch5.serialize_text")
def check_serialize_text(serialize_text: Callable[[list[str], list[str]], str]) -> None:
    """serialize_text(columns, values) -> the Text template, as the library's serialize(..., "text")."""
    from chapters.ch5_applications.tabllm import serialize

    for columns, values in serialization_cases():
        got = run(serialize_text, list(columns), list(values), what=f"serialize_text({columns}, {values})")
        want = serialize(columns, values, "text")
        if not isinstance(got, str):
            raise Mismatch(f"serialize_text should return a string, got {type(got).__name__}")
        equal(got, want, f"the row {dict(zip(columns, values))}")


# ----------------------------------------------------------------------------------- rank classification


@functools.lru_cache(maxsize=1)
def tabllm_prompts() -> tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]:
    """(description, prompts, choices): a few test prompts of each table, answers of 2 and 3 choices."""
    from chapters.ch5_applications.tabllm_recipe import build_task

    out = []
    for name, template in (("wine", "text"), ("breast_cancer", "list"), ("iris", "list_permuted_values")):
        task = build_task(name)
        prompts = task.prompts("test", template)
        out.append((f"{name} ({template} template)", tuple(prompts[::max(1, len(prompts) // 5)][:5]), task.classes))
    return tuple(out)


def answer_scores(model: torch.nn.Module, prompt: str, choices: tuple[str, ...], normalise: bool) -> torch.Tensor:
    """Log-likelihood of each answer (its tokens and <|endoftext|>) after the prompt, summed or averaged: [C]."""
    from minimal.data import Example, collate

    idx, labels = collate([Example(prompt, c) for c in choices], model.config.block_size)  # [C, T]
    logp = model(idx).logits[:, :-1].log_softmax(-1)  # [C, T-1, V]
    target = labels[:, 1:]
    mask = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask  # [C, T-1]
    return picked.sum(-1) / (mask.sum(-1) if normalise else 1)


@checker("ch5.rank_classify")
def check_rank_classify(rank_classify: Callable[[torch.nn.Module, list[str], tuple[str, ...]], torch.Tensor]) -> None:
    """rank_classify(model, prompts, choices) -> p(class | row) [N, C], as the library's rank_classify."""
    from chapters.ch5_applications import tabllm as T
    from minimal.gpt import GPT
    from minimal.pretrained import load_base

    base = load_base("base").eval()  # a fresh copy: the student's function may change the model it is given
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(3)
        other = GPT(base.config).eval()  # random weights: an answer that only works on `base` fails here
    for model_name, model in (("base", base), ("a random GPT", other)):
        for what, prompts, choices in tabllm_prompts():
            where = f"{model_name}, {what}"
            with torch.no_grad():
                got = run(rank_classify, model, list(prompts), choices, what=f"rank_classify on {where}")
                want = T.rank_classify(model, prompts, choices)
            got = torch.as_tensor(got).detach().cpu()
            if got.shape != want.shape:
                raise Mismatch(f"on {where}: shape {tuple(got.shape)}, expected [N prompts, C choices] = "
                               f"{tuple(want.shape)}")
            got = got.double()
            if not torch.allclose(got.sum(-1), torch.ones(len(got), dtype=torch.float64), atol=1e-4):
                raise Mismatch(f"on {where}: rows should sum to 1 (a softmax over the answers), "
                               f"the first sums to {got[0].sum().item():.4f}")
            try:
                close(got, want, f"p(class | row) on {where}", atol=1e-4, rtol=1e-3)
            except Mismatch as err:
                with torch.no_grad():
                    summed = torch.stack([answer_scores(model, p, choices, False) for p in prompts]).softmax(-1)
                if torch.allclose(got, summed.double(), atol=1e-4):
                    raise Mismatch(f"on {where}: your probabilities come from the summed log-likelihood; "
                                   "divide each answer's sum by its number of tokens (its words and "
                                   "<|endoftext|>) before the softmax") from err
                raise
