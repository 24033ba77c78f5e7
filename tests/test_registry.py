"""The registry and the leaderboard. Each method's contract (applies, trains only what it says, counts,
merges, saves, any dtype, atomic) is checked for every registered method in tests/test_contract.py."""

import json

import pytest
import torch

from chapters import leaderboard
from chapters.registry import Method, get_method, register
from minimal.data import get_task
from minimal.gpt import GPT, GPTConfig
from minimal.peft import count_trainable


@pytest.fixture
def small_vocab_gpt() -> GPT:
    torch.manual_seed(0)  # the shipped vocabulary (tasks use it), tiny everything else
    return GPT(GPTConfig(vocab_size=2048, block_size=64, n_layer=2, n_head=2, n_embd=32))


def test_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="registered twice"):
        register(Method("full", "ch1", lambda m: None))
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")


def test_leaderboard_writes_table_json_and_plot(tmp_path):
    leaderboard.main(["--methods", "zero-shot", "last-block", "--tasks", "sentiment", "--steps", "3",
                      "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "leaderboard.json").read_text(encoding="utf-8"))
    assert [(r["method"], r["task"]) for r in rows] == [("zero-shot", "sentiment"), ("last-block", "sentiment")]
    assert rows[0]["trainable"] == 0 and rows[1]["trainable"] == 12 * 128 * 128 + 13 * 128 + 2 * 128
    md = (tmp_path / "leaderboard.md").read_text(encoding="utf-8")
    assert "| zero-shot | ch1 | 0 |" in md and "| last-block |" in md
    assert (tmp_path / "leaderboard.png").stat().st_size > 0
    with pytest.raises(ValueError, match="unknown task"):
        leaderboard.main(["--tasks", "nope", "--out", str(tmp_path)])


@pytest.mark.parametrize("name", ["fish-dip"])
def test_gradient_masking_methods_state_the_entries_they_update(name, small_vocab_gpt):
    """requires_grad covers whole tensors; the stated count is the mask's size (0.5% of the entries)."""
    method = get_method(name)
    hooks = method.apply(small_vocab_gpt, get_task("sentiment"))
    total = count_trainable(small_vocab_gpt).total
    assert hooks.n_trainable is not None
    assert 0 < hooks.n_trainable <= 0.005 * total < count_trainable(small_vocab_gpt).trainable


def test_applications_runs_each_recipe_and_writes_a_table(tmp_path):
    seen = []

    def sql(seed):
        seen.append(("sql", seed))
        return {"execution_accuracy": 0.25, "n_test": 40}

    def tab(seed):
        seen.append(("tab", seed))
        return {"iris": {"ia3": 0.875}, "wine": {"ia3": 0.5}}

    md = leaderboard.applications(3, tmp_path, {"sql": sql, "tab": tab})
    assert seen == [("sql", 3), ("tab", 3)]
    assert "| execution_accuracy | 0.2500 |" in md and "| n_test | 40 |" in md
    assert "| iris / ia3 | 0.8750 |" in md and "| wine / ia3 | 0.5000 |" in md
    saved = json.loads((tmp_path / "applications.json").read_text(encoding="utf-8"))
    assert saved == {"sql": {"execution_accuracy": 0.25, "n_test": 40},
                     "tab": {"iris": {"ia3": 0.875}, "wine": {"ia3": 0.5}}}
    assert (tmp_path / "applications.md").read_text(encoding="utf-8") == md


def test_leaderboard_scores_an_evenly_spaced_test_subset_covering_every_family():
    task = get_task("family")
    assert len(task.test) > leaderboard.MAX_TEST
    first = {ex.answer for ex in task.test[:leaderboard.MAX_TEST]}
    sub = leaderboard.test_subset(task)
    assert len(sub.test) == leaderboard.MAX_TEST and len({id(ex) for ex in sub.test}) == leaderboard.MAX_TEST
    assert all(any(ex is t for t in task.test) for ex in sub.test)
    assert {ex.answer for ex in sub.test} == set(task.choices)  # every class, unlike the first 100 rows
    assert first != set(task.choices)  # the reason for the subset: the split is ordered by family
    assert sub.train is task.train
    small = leaderboard.test_subset(task, n=len(task.test) + 5)
    assert small.test == task.test
