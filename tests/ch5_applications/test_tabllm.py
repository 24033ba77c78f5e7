"""TabLLM's method: serialisations, prompts, rank classification, T-Few training of an applied method."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from chapters.ch2_additive.ia3 import IA3Linear, apply_ia3
from chapters.ch3_selective.glue_metrics import auc
from chapters.ch5_applications import tabllm as T
from chapters.ch5_applications import tabllm_recipe as R
from minimal.data import encode_prompt, get_tokenizer
from minimal.hooks import Hooks
from minimal.peft import freeze
from minimal.tokenizer import special_id
from tests.ch5_applications.tabllm_setup import lm, toy_table
from tests.helpers import Wrapped

COLUMNS = ["age", "blood pressure", "heart rate", "weight"]
VALUES = ["39", "high", "72", "low"]


def pairs_of_list(text: str) -> list[tuple[str, str]]:
    return [tuple(m) for m in re.findall(r"^- (.+): (.+)$", text, flags=re.MULTILINE)]


# ------------------------------------------------------------------------------------------ serialisation


def test_list_and_text_hold_every_pair_exactly_once() -> None:
    listed = T.serialize(COLUMNS, VALUES, "list")
    assert listed.splitlines() == [f"- {c}: {v}" for c, v in zip(COLUMNS, VALUES)]
    assert pairs_of_list(listed) == list(zip(COLUMNS, VALUES))
    text = T.serialize(COLUMNS, VALUES, "text")
    sentences = re.findall(r"The (.+?) is (.+?)\.", text)
    assert sentences == list(zip(COLUMNS, VALUES))
    for c, v in zip(COLUMNS, VALUES):
        assert text.count(f"The {c} is {v}.") == 1


def test_only_values_has_no_column_name() -> None:
    text = T.serialize(COLUMNS, VALUES, "list_only_values")
    assert text.splitlines() == [f"- {v}" for v in VALUES]
    for c in COLUMNS:
        assert c not in text


@pytest.mark.parametrize("template", ["list_permuted_names", "list_permuted_values"])
def test_permuted_templates_are_permutations(template: str) -> None:
    perm = [2, 0, 3, 1]
    pairs = pairs_of_list(T.serialize(COLUMNS, VALUES, template, perm))
    names, values = [p[0] for p in pairs], [p[1] for p in pairs]
    assert Counter(names) == Counter(COLUMNS) and Counter(values) == Counter(VALUES)  # multisets kept
    if template == "list_permuted_names":
        assert values == VALUES and names == [COLUMNS[p] for p in perm]
    else:
        assert names == COLUMNS and values == [VALUES[p] for p in perm]
    assert not set(pairs) & set(zip(COLUMNS, VALUES))  # a derangement breaks every pair


def test_derangement_moves_everything_and_is_seeded() -> None:
    for seed in range(20):
        perm = T.derangement(5, torch.Generator().manual_seed(seed))
        assert sorted(perm) == list(range(5)) and all(p != i for i, p in enumerate(perm))
    assert T.derangement(6, torch.Generator().manual_seed(3)) == T.derangement(6, torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="at least 2"):
        T.derangement(1, torch.Generator())


def test_serialize_rows_permutation_scope() -> None:
    rows = [[f"v{i}{j}" for j in range(4)] for i in range(6)]
    named = T.serialize_rows(COLUMNS, rows, "list_permuted_names", seed=1)
    orders = {tuple(p[0] for p in pairs_of_list(t)) for t in named}
    assert len(orders) == 1 and orders != {tuple(COLUMNS)}  # one derangement for the whole table
    valued = T.serialize_rows(COLUMNS, rows, "list_permuted_values", seed=1)
    perms = {tuple(int(p[1][2]) for p in pairs_of_list(t)) for t in valued}
    assert len(perms) > 1  # a fresh permutation per row
    assert valued == T.serialize_rows(COLUMNS, rows, "list_permuted_values", seed=1)  # deterministic
    assert valued != T.serialize_rows(COLUMNS, rows, "list_permuted_values", seed=2)


def test_serialize_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown template"):
        T.serialize(COLUMNS, VALUES, "table")
    with pytest.raises(ValueError, match="one value per column"):
        T.serialize(COLUMNS, VALUES[:3], "list")
    with pytest.raises(ValueError, match="needs perm"):
        T.serialize(COLUMNS, VALUES, "list_permuted_names")
    with pytest.raises(ValueError, match="needs perm"):
        T.serialize(COLUMNS, VALUES, "list_permuted_values", perm=[0, 0, 1, 2])
    with pytest.raises(ValueError, match="takes no perm"):
        T.serialize(COLUMNS, VALUES, "text", perm=[1, 0, 3, 2])
    with pytest.raises(ValueError, match="row_ids"):
        T.serialize_rows(COLUMNS, [VALUES], "list", row_ids=[0, 1])
    with pytest.raises(ValueError, match="two answer choices"):
        T.make_prompt("x", "Is it", ["yes"])


def test_prompt_lists_choices_and_refuses_to_cut() -> None:
    prompt = T.make_prompt("- age: 39", "Is this person", ["young", "middle-aged", "old"])
    assert prompt == "- age: 39\nIs this person young, middle-aged or old?"
    n = T.check_fits([prompt], ["young", "old"], 128)
    enc = get_tokenizer()
    assert n == len(encode_prompt(prompt)) + len(enc.encode("young")) + 1
    with pytest.raises(ValueError, match="context holds"):
        T.check_fits([prompt * 20], ["young", "old"], 128)


def test_levels_and_numbers() -> None:
    X = torch.tensor([[0.0, 10.0], [1.0, 20.0], [2.0, 30.0], [3.0, 40.0], [4.0, 50.0], [5.0, 60.0]],
                     dtype=torch.float64)
    edges = T.tercile_edges(X)
    torch.testing.assert_close(edges[0], torch.tensor([5 / 3, 10 / 3], dtype=torch.float64))
    assert [r[0] for r in T.to_levels(X, edges)] == ["low", "low", "medium", "medium", "high", "high"]
    assert T.to_numbers(torch.tensor([[14.127, 0.092345, 1023.5]], dtype=torch.float64)) == [
        ["14.1", "0.0923", "1.02e+03"]]
    with pytest.raises(ValueError, match="columns"):
        T.to_levels(X, edges[:1])


# ------------------------------------------------------------------------------------------ rank classification


def test_choice_scores_are_length_normalised_log_likelihoods() -> None:
    model = lm()
    enc = get_tokenizer()
    prompts = ["- size: high\nIs this thing small or large?", "- size: low", "- size: medium", "- shade: low"]
    choices = ["small", "rather large", "x"]
    scores = T.choice_scores(model, prompts, choices)
    assert scores.shape == (4, 3)
    for i, p in enumerate(prompts):
        for c, choice in enumerate(choices):
            ids = encode_prompt(p)
            answer = enc.encode(choice) + [special_id(enc, "<|endoftext|>")]
            with torch.no_grad():
                logp = model(torch.tensor([ids + answer])).logits[0].log_softmax(-1)  # [T, V]
            want = sum(logp[len(ids) - 1 + t, a].item() for t, a in enumerate(answer)) / len(answer)
            assert scores[i, c].item() == pytest.approx(want, abs=1e-5)
    proba = T.rank_classify(model, prompts, choices)
    torch.testing.assert_close(proba.sum(-1), torch.ones(4))
    torch.testing.assert_close(T.choice_scores(Wrapped(model), prompts, choices), scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(proba, scores.softmax(-1))
    wide = T.choice_scores(lm().double(), prompts, choices)  # a float64 model keeps float64 scores
    assert wide.dtype == torch.float64
    torch.testing.assert_close(wide.float(), scores, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no prompts"):
        T.choice_scores(model, [], choices)


def test_choice_batch_puts_the_correct_answer_first() -> None:
    prompts, choices = ["a", "b", "c"], ["x", "y", "z"]
    idx, labels = T.choice_batch(prompts, [2, 0, 1], choices, 5, 128, torch.Generator().manual_seed(0))
    assert idx.shape[:2] == labels.shape[:2] == (5, 3)
    enc = get_tokenizer()
    sep = special_id(enc, "<|answer|>")
    for b in range(5):
        answers = [enc.decode([t for t in labels[b, c].tolist() if t != -100][:-1]) for c in range(3)]
        tokens = idx[b, 0].tolist()
        prompt = enc.decode(tokens[:tokens.index(sep)])
        correct = choices[[2, 0, 1][prompts.index(prompt)]]
        assert answers[0] == correct and sorted(answers) == sorted(choices)


# ------------------------------------------------------------------------------------------ training


def toy_prompts(task: R.TabularTask, n: int = 12) -> tuple[list[str], list[int]]:
    rows = R.sample_k_shot(task.y("train"), n, seed=0)
    return task.prompts("train", "list", rows), task.y("train")[rows].tolist()


def test_ia3_training_changes_only_ia3_vectors_and_learns() -> None:
    task = R.build_task(toy_table(), n_features=2)
    prompts, targets = toy_prompts(task)
    model, before = lm(2), lm(2)
    steps = []
    hooks = apply_ia3(model)
    hooks.step_end = lambda m, step, opt: steps.append(step)  # fit hands the method's hooks to the loop
    result = T.fit(model, prompts, targets, task.classes, 1e-1, hooks, steps=25, batch_size=6, seed=0)
    assert steps == list(range(25))
    frozen = {n: p for n, p in model.named_parameters() if not n.endswith(".scale")}
    reference = dict(before.named_parameters())
    for name, p in frozen.items():
        assert torch.equal(p, reference[name.replace(".base.", ".")]), name  # bit-identical
    scales = [m.scale for m in model.modules() if isinstance(m, IA3Linear)]
    assert len(scales) == 2 * model.config.n_layer
    assert all(not torch.equal(s, torch.ones_like(s)) for s in scales)  # every vector moved
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(
        n for n in dict(model.named_parameters()) if n.endswith(".scale"))
    assert result.final_loss < result.history[0]["loss"] - 0.3
    y = torch.tensor(targets)
    # it learns the toy rule: the random model ranks the rows badly, the trained one well
    assert auc(y, T.rank_classify(before, prompts, task.classes)) < 0.6
    assert auc(y, T.rank_classify(model, prompts, task.classes)) > 0.9


def test_fit_refuses_bad_input() -> None:
    task = R.build_task(toy_table(), n_features=2)
    prompts, targets = toy_prompts(task, 6)
    with pytest.raises(ValueError, match="as many targets"):
        T.fit(lm(), prompts, targets[:-1], task.classes, 0.1, steps=2)
    with pytest.raises(ValueError, match="index the 2 choices"):
        T.fit(lm(), prompts, [2] * len(prompts), task.classes, 0.1, steps=2)
    with pytest.raises(ValueError, match="context holds"):
        T.fit(lm(), [p * 20 for p in prompts], targets, task.classes, 0.1, steps=2)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        T.fit(freeze(lm()), prompts, targets, task.classes, 0.1, Hooks(), steps=2)
