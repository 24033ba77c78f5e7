"""Schema linking: budget (k1 tables, k2 columns), group invariance, value matching, recall, prompts."""

from __future__ import annotations

import pytest

from chapters.ch5_applications.schema_linking import (
    LinkedSchema,
    SchemaLinker,
    full_prompt,
    linked_prompt,
    recall_at_k,
    serialize,
    stem,
    words,
)
from chapters.ch5_applications.sql_databases import Table, load_task
from minimal.tokenizer import get_tokenizer

TOY = {
    "emp": Table("emp", "employees", ("eid", "sal", "dept", "hired"),
                 {"eid": "employee id", "sal": "annual salary", "dept": "department", "hired": "hiring date"},
                 ("eid",)),
    "sales": Table("sales", "sales records", ("eid", "yr", "amt", "units"),
                   {"eid": "employee id", "yr": "year", "amt": "sales amount", "units": "units sold"}, ("eid", "yr")),
}


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    task = load_task("stock", tmp_path_factory.mktemp("db"))
    return task, SchemaLinker.from_database(task.tables, task.path)


def test_words_and_stem() -> None:
    assert stem("companies") == "company" and stem("funds") == "fund" and stem("gross") == "gross"
    assert words("What was the rev_est of 'nova' in 2021?") == ["rev", "est", "nova", "2021"]


def test_linker_respects_k1_and_k2(stock) -> None:
    task, linker = stock
    for k1, k2 in [(1, 1), (1, 3), (2, 2), (2, 4), (3, 6)]:
        for ex in task.test:
            ls = linker.link(ex.question, k1=k1, k2=k2)
            assert 1 <= len(ls.tables) <= k1
            assert all(1 <= len(ls.columns[t]) <= k2 for t in ls.tables)
            assert set(ls.columns) == set(ls.tables)
            for t in ls.tables:  # linked columns exist, and keys are always kept (as many as fit)
                assert set(ls.columns[t]) <= set(task.tables[t].columns)
                assert set(task.tables[t].keys[:k2]) <= set(ls.columns[t])


def test_toy_question_links_the_obvious_column() -> None:
    linker = SchemaLinker(TOY)
    ls = linker.link("total sales amount per department", k1=2, k2=3)
    assert ls.tables[0] == "sales" and ls.columns["sales"][0] == "amt"
    assert ls.columns["emp"][0] == "dept"
    assert linker.link("annual salary of bob", k1=1, k2=2).columns == {"emp": ("sal", "eid")}


def test_group_size_does_not_change_scores(stock) -> None:
    _, linker = stock
    q = "which company had the highest estimated revenue in 2021"
    reference = linker.score_columns(q, group_size=10_000)
    for g in (1, 3, 16):
        assert linker.score_columns(q, group_size=g) == reference
    assert linker.link(q, group_size=1) == linker.link(q, group_size=64)


def test_value_matching_links_an_attribute_named_only_by_its_value(stock) -> None:
    task, linker = stock
    q = "which 'tech' companies had dividend above 3 in 2021"
    scores = linker.score_columns(q)
    assert scores["firm.sector"][1] > 0 and scores["fin.yr"][1] > 0  # 'tech' is a sector, 2021 a year
    assert scores["fin.rev"][1] == 0
    assert "sector" in linker.link(q, k1=2, k2=2).columns["firm"]


def test_recall_hand_computed() -> None:
    ls = LinkedSchema(("a",), {"a": ("x", "y")}, {})
    assert recall_at_k([("a.x", "a.z", "b.w")], [ls]) == pytest.approx(1 / 3)
    assert recall_at_k([("a", "b")], [ls], level="table") == pytest.approx(1 / 2)
    with pytest.raises(ValueError):
        recall_at_k([("a.x",)], [ls, ls])
    with pytest.raises(ValueError):
        recall_at_k([("a.x",)], [ls], level="row")


def test_recall_grows_with_k_and_is_high_at_the_default(stock) -> None:
    task, linker = stock
    gold = [e.columns for e in task.train]
    recalls = [recall_at_k(gold, [linker.link(e.question, k1=2, k2=k) for e in task.train]) for k in (1, 2, 3, 4, 6)]
    assert recalls == sorted(recalls)
    assert recalls[0] < 0.8 and recalls[3] >= 0.95
    one_table = recall_at_k([e.tables for e in task.train], [linker.link(e.question, k1=1) for e in task.train],
                            level="table")
    assert 0.5 < one_table < 1.0  # JOIN questions need two tables


def test_prompts_are_short_only_with_linking(stock) -> None:
    task, linker = stock
    enc = get_tokenizer()
    ex = task.test[0]
    ls = linker.link(ex.question)
    short, full = linked_prompt(ex.question, ls), full_prompt(ex.question, task.tables)
    assert short.endswith("\n" + ex.question) and full.endswith("\n" + ex.question)
    assert len(enc.encode(full)) > 300 > 128 > 70 > len(enc.encode(short))
    parsed = {}
    for part in short.split("\n")[0].split(" |"):
        table, cols = part.split(":")
        parsed[table.strip()] = tuple(cols.split())
    assert parsed == {t: ls.columns[t] for t in ls.tables}  # only the linked schema, in linked order
    assert list(parsed) == list(ls.tables)
    assert serialize({"fin": ("rev", "tkr"), "firm": ("sector",)}) == " fin: rev tkr | firm: sector"


def test_names_tokenize_the_same_in_prompt_and_sql() -> None:
    enc = get_tokenizer()
    prompt_ids = enc.encode(serialize({"fin": ("rev_est", "tkr", "yr")}))
    sql_ids = enc.encode("select rev_est from fin where tkr = 'nova'")
    col = enc.encode(" rev_est")
    assert any(prompt_ids[i:i + len(col)] == col for i in range(len(prompt_ids)))
    assert any(sql_ids[i:i + len(col)] == col for i in range(len(sql_ids)))


def test_bad_input(stock) -> None:
    _, linker = stock
    with pytest.raises(ValueError, match="k1"):
        linker.link("revenue", k1=0)
    with pytest.raises(ValueError, match="k2"):
        linker.link("revenue", k2=1.5)
    with pytest.raises(ValueError, match="question"):
        linker.link("   ")
    with pytest.raises(ValueError, match="group_size"):
        linker.score_columns("revenue", group_size=0)
    with pytest.raises(ValueError, match="at least one table"):
        SchemaLinker({})
