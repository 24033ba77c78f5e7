"""TabLLM's experiment: bundled tables, stratified splits, feature selection, k shots, priors, baselines."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from sklearn.feature_selection import f_classif

from chapters.ch2_additive.ia3 import IA3Linear
from chapters.ch4_low_rank.lora import apply_lora
from chapters.ch5_applications import tabllm as T
from chapters.ch5_applications import tabllm_recipe as R
from chapters.registry import get_method
from tests.ch5_applications.tabllm_setup import lm, toy_table

# ------------------------------------------------------------------------------------------ tables and splits


@pytest.mark.parametrize("name, shape, n_classes", [("breast_cancer", (569, 30), 2), ("wine", (178, 13), 3),
                                                    ("iris", (150, 4), 3)])
def test_bundled_tables_load_offline_and_every_prompt_fits(name: str, shape: tuple, n_classes: int) -> None:
    table = R.load_table(name)
    assert tuple(table.X.shape) == shape and len(table.classes) == n_classes == len(torch.unique(table.y))
    task = R.build_task(table)
    for template in T.TEMPLATES:
        for split in R.SPLITS:
            assert T.check_fits(task.prompts(split, template), task.classes, 128) <= 128


def test_split_rows_is_stratified_disjoint_and_seeded() -> None:
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    parts = R.split_rows(y, seed=3)
    everything = torch.cat(list(parts.values()))
    assert sorted(everything.tolist()) == list(range(100))  # a partition of the rows
    assert torch.bincount(y[parts["prior"]]).tolist() == [10, 6, 4]
    assert torch.bincount(y[parts["test"]]).tolist() == [10, 6, 4]
    assert torch.bincount(y[parts["train"]]).tolist() == [30, 18, 12]
    again, other = R.split_rows(y, seed=3), R.split_rows(y, seed=4)
    assert all(torch.equal(parts[s], again[s]) for s in R.SPLITS)
    assert not torch.equal(parts["test"], other["test"])
    with pytest.raises(ValueError, match="fractions"):
        R.split_rows(y, fractions=(0.5, 0.5, 0.5))


def test_f_statistic_matches_sklearn_and_selects_the_signal() -> None:
    table = toy_table()
    ours = R.f_statistic(table.X, table.y)
    theirs, _ = f_classif(table.X.numpy(), table.y.numpy())
    torch.testing.assert_close(ours, torch.tensor(theirs), rtol=1e-9, atol=0)
    assert R.select_features(table.X, table.y, 2) == [0, 1]
    with pytest.raises(ValueError, match="n_features"):
        R.select_features(table.X, table.y, 4)


def test_build_task_uses_the_prior_split_only() -> None:
    table = toy_table(90)
    task = R.build_task(table, n_features=2)
    assert task.columns == ["size", "shade"]
    edges = T.tercile_edges(task.X("prior"))
    assert task.values["test"] == T.to_levels(task.X("test"), edges)  # edges from the prior rows
    numbers = R.build_task(table, n_features=2, values="number")
    assert numbers.values["test"] == T.to_numbers(task.X("test"))
    with pytest.raises(ValueError, match="values"):
        R.build_task(table, values="bins")
    with pytest.raises(ValueError, match="unknown table"):
        R.build_task("titanic")
    with pytest.raises(TypeError, match="table name or a Table"):
        R.build_task(3)


# ------------------------------------------------------------------------------------------ k-shot sampling


def test_k_shot_is_balanced_deterministic_and_within_the_pool() -> None:
    y = torch.tensor([0] * 40 + [1] * 25 + [2] * 10)
    for k in (3, 4, 16, 30):
        rows = R.sample_k_shot(y, k, seed=5)
        counts = torch.bincount(y[rows], minlength=3)
        assert len(rows) == k == len(set(rows.tolist())) and int(counts.max() - counts.min()) <= 1
        assert counts.min() == k // 3
        assert torch.equal(rows, R.sample_k_shot(y, k, seed=5))
    assert not torch.equal(R.sample_k_shot(y, 16, seed=5), R.sample_k_shot(y, 16, seed=6))
    assert torch.equal(R.sample_k_shot(y, "all"), torch.arange(75))


def test_k_shot_bad_input() -> None:
    y = torch.tensor([0] * 5 + [1] * 3)
    with pytest.raises(ValueError, match="fewer than one row per class"):
        R.sample_k_shot(y, 1)
    with pytest.raises(ValueError, match="only 3 exist"):
        R.sample_k_shot(y, 8)
    with pytest.raises(ValueError, match="'all'"):
        R.sample_k_shot(y, "many")
    with pytest.raises(TypeError, match="int"):
        R.sample_k_shot(y, 4.0)


# ------------------------------------------------------------------------------------------ few shot


def test_few_shot_leaves_the_base_untouched() -> None:
    task = R.build_task(toy_table(), n_features=2)
    base = lm(4)
    state = {n: p.clone() for n, p in base.state_dict().items()}
    model = R.few_shot(base, task, 4, get_method("ia3").apply, R.IA3_LR, template="list", steps=2)
    assert any(isinstance(m, IA3Linear) for m in model.modules())
    assert not any(isinstance(m, IA3Linear) for m in base.modules())
    assert all(torch.equal(state[n], p) for n, p in base.state_dict().items())


def test_few_shot_is_deterministic_for_lora_and_refuses_a_wrapper() -> None:
    task = R.build_task(toy_table(), n_features=2)
    lora = get_method("lora")
    a = R.few_shot(lm(3), task, 6, lora.apply, lora.lr, template="list", steps=3, seed=4)
    b = R.few_shot(lm(3), task, 6, partial(apply_lora, r=8, alpha=16, targets=("c_attn",)), 5e-3, template="list",
                   steps=3, seed=4)  # the registry's settings, written out
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert set(pa) == set(pb) and all(torch.equal(pa[n], pb[n]) for n in pa)
    with pytest.raises(TypeError, match="Hooks"):
        R.few_shot(lm(), task, 4, lambda model: (model, None), 0.1, steps=2)


# ------------------------------------------------------------------------------------------ priors and baselines


def test_prior_sentences_state_the_tendencies_of_the_prior_split() -> None:
    task = R.build_task(toy_table(120), n_features=3)
    sentences = R.prior_sentences(task)
    assert "A high size suggests large." in sentences and "A low size suggests small." in sentences
    assert "A low shade suggests large." in sentences and "A high shade suggests small." in sentences
    assert not any("noise" in s for s in R.prior_sentences(task, min_lift=1.6))  # noise has no strong lift


def test_pretrain_priors_trains_all_weights_on_the_sentences() -> None:
    model, before = lm(5), lm(5)
    sentences = ["A high size suggests large.", "A low size suggests small."]
    result = R.pretrain_priors(model, sentences, steps=15, batch_size=4, lr=3e-3)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))
    assert result.final_loss < result.history[0]["loss"]
    with pytest.raises(ValueError, match="no prior sentences"):
        R.pretrain_priors(model, [])


def test_baselines_on_a_separable_table() -> None:
    task = R.build_task(toy_table(120), n_features=2)
    for kind in R.BASELINES:
        assert R.baseline_auc(task, 16, kind, seed=0) > 0.9
    with pytest.raises(ValueError, match="unknown baseline"):
        R.baseline_auc(task, 16, "svm")
