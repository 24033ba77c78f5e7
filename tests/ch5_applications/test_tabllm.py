"""TabLLM: serialisations, rank classification, hand-written AUC, k-shot sampling, T-Few training."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from sklearn.feature_selection import f_classif
from sklearn.metrics import roc_auc_score

from chapters.ch2_additive.ia3 import IA3Linear
from chapters.ch5_applications import tabllm as T
from minimal.data import Example, collate, encode_prompt, get_tokenizer
from minimal.tokenizer import special_id
from tests.helpers import tiny_config, tiny_gpt

COLUMNS = ["age", "blood pressure", "heart rate", "weight"]
VALUES = ["39", "high", "72", "low"]
VOCAB = get_tokenizer().n_vocab  # 2048


def lm(seed: int = 0):
    """A tiny random GPT over the shipped tokenizer's vocabulary, with room for the TabLLM prompts."""
    return tiny_gpt(seed, tiny_config(vocab_size=VOCAB, block_size=128))


def toy_table(n: int = 60, seed: int = 0) -> T.Table:
    """Two classes; column 0 is high exactly for class 1, column 1 is low for class 1, column 2 is noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    X = torch.rand(n, 3, generator=gen, dtype=torch.float64)
    X[:, 0] += 2.0 * y
    X[:, 1] -= 2.0 * y
    return T.Table("toy", ("size", "shade", "noise"), X, y, ("small", "large"), "Is this thing")


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


# ------------------------------------------------------------------------------------------ tables and splits


@pytest.mark.parametrize("name, shape, n_classes", [("breast_cancer", (569, 30), 2), ("wine", (178, 13), 3),
                                                    ("iris", (150, 4), 3)])
def test_bundled_tables_load_offline_and_every_prompt_fits(name: str, shape: tuple, n_classes: int) -> None:
    table = T.load_table(name)
    assert tuple(table.X.shape) == shape and len(table.classes) == n_classes == len(torch.unique(table.y))
    task = T.build_task(table)
    for template in T.TEMPLATES:
        for split in T.SPLITS:
            assert T.check_fits(task.prompts(split, template), task.classes, 128) <= 128


def test_split_rows_is_stratified_disjoint_and_seeded() -> None:
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    parts = T.split_rows(y, seed=3)
    everything = torch.cat(list(parts.values()))
    assert sorted(everything.tolist()) == list(range(100))  # a partition of the rows
    assert torch.bincount(y[parts["prior"]]).tolist() == [10, 6, 4]
    assert torch.bincount(y[parts["test"]]).tolist() == [10, 6, 4]
    assert torch.bincount(y[parts["train"]]).tolist() == [30, 18, 12]
    again, other = T.split_rows(y, seed=3), T.split_rows(y, seed=4)
    assert all(torch.equal(parts[s], again[s]) for s in T.SPLITS)
    assert not torch.equal(parts["test"], other["test"])
    with pytest.raises(ValueError, match="fractions"):
        T.split_rows(y, fractions=(0.5, 0.5, 0.5))


def test_f_statistic_matches_sklearn_and_selects_the_signal() -> None:
    table = toy_table()
    ours = T.f_statistic(table.X, table.y)
    theirs, _ = f_classif(table.X.numpy(), table.y.numpy())
    torch.testing.assert_close(ours, torch.tensor(theirs), rtol=1e-9, atol=0)
    assert T.select_features(table.X, table.y, 2) == [0, 1]
    with pytest.raises(ValueError, match="n_features"):
        T.select_features(table.X, table.y, 4)


def test_build_task_uses_the_prior_split_only() -> None:
    table = toy_table(90)
    task = T.build_task(table, n_features=2)
    assert task.columns == ["size", "shade"]
    edges = T.tercile_edges(task.X("prior"))
    assert task.values["test"] == T.to_levels(task.X("test"), edges)  # edges from the prior rows
    numbers = T.build_task(table, n_features=2, values="number")
    assert numbers.values["test"] == T.to_numbers(task.X("test"))
    with pytest.raises(ValueError, match="values"):
        T.build_task(table, values="bins")
    with pytest.raises(ValueError, match="unknown table"):
        T.build_task("titanic")
    with pytest.raises(TypeError, match="table name or a Table"):
        T.build_task(3)


# ------------------------------------------------------------------------------------------ k-shot sampling


def test_k_shot_is_balanced_deterministic_and_within_the_pool() -> None:
    y = torch.tensor([0] * 40 + [1] * 25 + [2] * 10)
    for k in (3, 4, 16, 30):
        rows = T.sample_k_shot(y, k, seed=5)
        counts = torch.bincount(y[rows], minlength=3)
        assert len(rows) == k == len(set(rows.tolist())) and int(counts.max() - counts.min()) <= 1
        assert counts.min() == k // 3
        assert torch.equal(rows, T.sample_k_shot(y, k, seed=5))
    assert not torch.equal(T.sample_k_shot(y, 16, seed=5), T.sample_k_shot(y, 16, seed=6))
    assert torch.equal(T.sample_k_shot(y, "all"), torch.arange(75))


def test_k_shot_bad_input() -> None:
    y = torch.tensor([0] * 5 + [1] * 3)
    with pytest.raises(ValueError, match="fewer than one row per class"):
        T.sample_k_shot(y, 1)
    with pytest.raises(ValueError, match="only 3 exist"):
        T.sample_k_shot(y, 8)
    with pytest.raises(ValueError, match="'all'"):
        T.sample_k_shot(y, "many")
    with pytest.raises(TypeError, match="int"):
        T.sample_k_shot(y, 4.0)


# ------------------------------------------------------------------------------------------ AUC


def test_auc_hand_computed_cases() -> None:
    # 4 (positive, negative) pairs; 3 ordered right: positive 0.35 is below negative 0.4
    assert T.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert T.roc_auc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts one half
    # pairs: (0.5 vs 0.2) 1, (0.5 vs 0.5) 1/2, (0.9 vs 0.2) 1, (0.9 vs 0.5) 1 -> 3.5 / 4
    assert T.roc_auc([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.9]) == 0.875
    assert T.roc_auc([1, 1, 0], [0.9, 0.8, 0.1]) == 1.0 and T.roc_auc([1, 1, 0], [0.1, 0.2, 0.9]) == 0.0
    # one-vs-rest, class by class:
    #   class 0: scores 0.8 (pos), 0.1, 0.1, 0.2 -> 1
    #   class 1: scores 0.1, 0.3 (pos), 0.3, 0.2 -> (1 + 1/2 + 1) / 3 = 2.5 / 3
    #   class 2: scores 0.1, 0.6, 0.6 (pos), 0.6 (pos) -> each positive beats 0.1 and ties 0.6: 2 (1 + 1/2) / 4
    proba = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.3, 0.6], [0.1, 0.3, 0.6], [0.2, 0.2, 0.6]])
    y = torch.tensor([0, 1, 2, 2])
    assert T.roc_auc_ovr(y, proba) == pytest.approx((1.0 + 2.5 / 3 + 0.75) / 3, abs=1e-15)


def test_auc_matches_sklearn_with_ties() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        y = torch.randint(0, 2, (200,), generator=gen)
        s = (torch.rand(200, generator=gen) + 0.3 * y).mul(10).round() / 10  # few distinct values: many ties
        assert T.roc_auc(y, s) == pytest.approx(roc_auc_score(y.numpy(), s.numpy()), abs=1e-12)
        y3 = torch.randint(0, 3, (150,), generator=gen)
        proba = (torch.rand(150, 3, generator=gen, dtype=torch.float64) * 4).round().add(1e-3).softmax(-1)
        want = roc_auc_score(y3.numpy(), proba.numpy(), multi_class="ovr", average="macro")
        assert T.roc_auc_ovr(y3, proba) == pytest.approx(want, abs=1e-12)
        assert T.auc(y3, proba) == T.roc_auc_ovr(y3, proba)
        two = torch.stack([1 - s, s], 1)
        assert T.auc(y, two) == T.roc_auc(y, s)


def test_auc_bad_input() -> None:
    with pytest.raises(ValueError, match="both classes"):
        T.roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="entries"):
        T.roc_auc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="labels 0/1"):
        T.roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        T.roc_auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="proba must be"):
        T.roc_auc_ovr([0, 1, 2], torch.rand(2, 3))
    with pytest.raises(ValueError, match="labels must be in"):
        T.roc_auc_ovr([0, 1, 3], torch.rand(3, 3))


# ------------------------------------------------------------------------------------------ rank classification


class Wrapped(torch.nn.Module):
    """A causal LM that is not our GPT class: choice_scores takes its generic path (no shared prompt cache)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, idx):
        return self.model(idx)


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
    with pytest.raises(ValueError, match="no prompts"):
        T.choice_scores(model, [], choices)


def test_shared_prompt_path_equals_the_full_path_with_gradients() -> None:
    prompts = ["- size: high", "- size: low\n- shade: medium\nIs it?", "a b c d e f", "- shade: low"]
    choices = ["small", "fairly large", "x"]
    idx, labels = T.choice_batch(prompts, [0, 1, 2, 1], choices, 6, 128, torch.Generator().manual_seed(1))
    model = lm(6)
    from chapters.ch2_additive.ia3 import apply_ia3
    apply_ia3(model)
    grads = []
    for m in (model, Wrapped(model)):
        logp, mask = T.answer_logprobs(m, idx, labels)
        grads.append(torch.autograd.grad(logp.sum(), [p for p in model.parameters() if p.requires_grad]))
        if m is model:
            shared, shared_mask = logp.detach(), mask
    torch.testing.assert_close(shared, logp.detach(), rtol=0, atol=1e-5)
    assert torch.equal(shared_mask, mask) and int(mask.sum()) > 0
    assert bool((shared[~mask] == 0).all())
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    other_prompt = idx.clone()
    other_prompt[0, 1, 0] += 1  # the second sequence of group 0 no longer shares the prompt
    no_answer = labels.clone()
    no_answer[1, 2] = -100
    for bad_idx, bad_labels in ((other_prompt, labels), (idx, no_answer)):
        with pytest.raises(ValueError, match="one prompt shared"):
            T.answer_logprobs(model, bad_idx, bad_labels)


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


def test_choice_loss_terms_by_hand() -> None:
    model = lm(1)
    enc = get_tokenizer()
    eot = special_id(enc, "<|endoftext|>")
    choices = ["small", "fairly large", "huge"]
    examples = [Example("- size: high", c) for c in choices]  # the correct answer first
    idx, labels = collate(examples, 128)
    out = T.ChoiceLoss(model)(idx.unsqueeze(0), labels.unsqueeze(0))
    per_choice = []
    for choice in choices:
        ids = encode_prompt("- size: high")
        answer = enc.encode(choice) + [eot]
        with torch.no_grad():
            logp = model(torch.tensor([ids + answer])).logits[0].log_softmax(-1)
        per_choice.append(torch.stack([logp[len(ids) - 1 + t, a] for t, a in enumerate(answer)]))
    lm_loss = -per_choice[0].mean()
    wrong = torch.cat(per_choice[1:])
    ul = -torch.log1p(-wrong.exp()).mean()
    ln = -torch.stack([p.mean() for p in per_choice]).log_softmax(0)[0]
    torch.testing.assert_close(out.lm, lm_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.ul, ul, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.ln, ln, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss.detach(), lm_loss + ul + ln, rtol=0, atol=1e-5)
    generic = T.ChoiceLoss(Wrapped(model))(idx.unsqueeze(0), labels.unsqueeze(0))  # no shared prompt cache
    torch.testing.assert_close(generic.loss, out.loss, rtol=0, atol=1e-5)
    only_lm = T.ChoiceLoss(model, unlikelihood=False, length_norm=False)(idx.unsqueeze(0), labels.unsqueeze(0))
    torch.testing.assert_close(only_lm.loss.detach(), lm_loss, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, C >= 2, T\]"):
        T.ChoiceLoss(model)(idx, labels)


# ------------------------------------------------------------------------------------------ training


def toy_prompts(task: T.TabularTask, n: int = 12) -> tuple[list[str], list[int]]:
    rows = T.sample_k_shot(task.y("train"), n, seed=0)
    return task.prompts("train", "list", rows), task.y("train")[rows].tolist()


def test_ia3_training_changes_only_ia3_vectors_and_learns() -> None:
    task = T.build_task(toy_table(), n_features=2)
    prompts, targets = toy_prompts(task)
    model, before = lm(2), lm(2)
    result = T.fit(model, prompts, targets, task.classes, "ia3", steps=25, batch_size=6, seed=0)
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
    assert T.auc(y, T.rank_classify(before, prompts, task.classes)) < 0.6
    assert T.auc(y, T.rank_classify(model, prompts, task.classes)) > 0.9


def test_fit_is_deterministic_for_lora_and_refuses_bad_input() -> None:
    task = T.build_task(toy_table(), n_features=2)
    prompts, targets = toy_prompts(task, 6)
    a, b = lm(3), lm(3)
    T.fit(a, prompts, targets, task.classes, "lora", steps=3, seed=4)
    T.fit(b, prompts, targets, task.classes, "lora", steps=3, seed=4)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    with pytest.raises(ValueError, match="unknown method"):
        T.fit(lm(), prompts, targets, task.classes, "bitfit", steps=2)
    with pytest.raises(ValueError, match="as many targets"):
        T.fit(lm(), prompts, targets[:-1], task.classes, "ia3", steps=2)
    with pytest.raises(ValueError, match="index the 2 choices"):
        T.fit(lm(), prompts, [2] * len(prompts), task.classes, "ia3", steps=2)


def test_few_shot_leaves_the_base_untouched() -> None:
    task = T.build_task(toy_table(), n_features=2)
    base = lm(4)
    state = {n: p.clone() for n, p in base.state_dict().items()}
    model = T.few_shot(base, task, 4, "ia3", template="list", steps=2)
    assert any(isinstance(m, IA3Linear) for m in model.modules())
    assert not any(isinstance(m, IA3Linear) for m in base.modules())
    assert all(torch.equal(state[n], p) for n, p in base.state_dict().items())


# ------------------------------------------------------------------------------------------ priors and baselines


def test_prior_sentences_state_the_tendencies_of_the_prior_split() -> None:
    task = T.build_task(toy_table(120), n_features=3)
    sentences = T.prior_sentences(task)
    assert "A high size suggests large." in sentences and "A low size suggests small." in sentences
    assert "A low shade suggests large." in sentences and "A high shade suggests small." in sentences
    assert not any("noise" in s for s in T.prior_sentences(task, min_lift=1.6))  # noise has no strong lift


def test_pretrain_priors_trains_all_weights_on_the_sentences() -> None:
    model, before = lm(5), lm(5)
    sentences = ["A high size suggests large.", "A low size suggests small."]
    result = T.pretrain_priors(model, sentences, steps=15, batch_size=4, lr=3e-3)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))
    assert result.final_loss < result.history[0]["loss"]
    with pytest.raises(ValueError, match="no prior sentences"):
        T.pretrain_priors(model, [])


def test_baselines_on_a_separable_table() -> None:
    task = T.build_task(toy_table(120), n_features=2)
    for kind in T.BASELINES:
        assert T.baseline_auc(task, 16, kind, seed=0) > 0.9
    with pytest.raises(ValueError, match="unknown baseline"):
        T.baseline_auc(task, 16, "svm")
