"""The synthetic financial databases: deterministic, wide with a glossary, and every gold query answers."""

from __future__ import annotations

import sqlite3
from collections import Counter

import pytest

from chapters.ch5_applications.sql_databases import (
    SPECS,
    TEMPLATES,
    TRAIN_PHRASINGS,
    build_database,
    load_task,
    make_questions,
    schema_of,
    split_of,
)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    where = tmp_path_factory.mktemp("dbs")
    return {name: load_task(name, where) for name in SPECS}


def dump(path) -> list[str]:
    con = sqlite3.connect(path)
    try:
        return list(con.iterdump())
    finally:
        con.close()


def test_build_is_deterministic_and_seed_dependent(tmp_path) -> None:
    a = build_database("stock", tmp_path / "a.sqlite", seed=0)
    b = build_database("stock", tmp_path / "b.sqlite", seed=0)
    c = build_database("stock", tmp_path / "c.sqlite", seed=1)
    assert dump(a) == dump(b)
    assert dump(a) != dump(c)
    build_database("stock", a, seed=0)  # rebuilding over an existing file replaces it, same content
    assert dump(a) == dump(b)


def test_questions_are_deterministic(tasks, tmp_path) -> None:
    path = build_database("fund", tmp_path / "fund.sqlite")
    assert make_questions("fund", path) == make_questions("fund", path)
    assert tasks["fund"].train + tasks["fund"].test != [] and sorted(
        e.sql for e in make_questions("fund", path)) == sorted(e.sql for e in tasks["fund"].train + tasks["fund"].test)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_wide_table_has_abbreviated_columns_and_glossary(tasks, name) -> None:
    task, spec = tasks[name], SPECS[name]
    con = sqlite3.connect(task.path)
    try:
        wide = [row[1] for row in con.execute(f"pragma table_info({spec.wide_table})")]
        glossary = {(t, c): m for t, c, m in con.execute("select tbl, col, meaning from glossary")}
        tables = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
    finally:
        con.close()
    assert 50 <= len(wide) <= 100
    assert tables == set(task.tables) | {"glossary"}
    for t in task.tables.values():  # the database's own columns are exactly the schema's, each explained
        for c in t.columns:
            assert glossary[(t.name, c)], (t.name, c)
    assert len(glossary) == sum(len(t.columns) for t in task.tables.values())
    assert glossary[(spec.wide_table, spec.metrics[0].abbr + "_yoy")] == spec.metrics[0].meaning + " growth"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_gold_query_executes_with_a_defined_answer(tasks, name) -> None:
    task = tasks[name]
    con = sqlite3.connect(f"file:{task.path}?mode=ro", uri=True)
    try:
        for ex in task.train + task.test:
            rows = con.execute(ex.sql).fetchall()
            assert rows, ex.sql
            assert all(v is not None for row in rows for v in row), ex.sql
            for table in ex.tables:
                assert f" {table}" in ex.sql
            for item in ex.columns:
                assert item.split(".")[1] in ex.sql
    finally:
        con.close()


def test_argmax_gold_answer_matches_python(tasks) -> None:
    """The arg-max template's answer, recomputed in Python from all rows of the table."""
    task = tasks["stock"]
    con = sqlite3.connect(task.path)
    try:
        for ex in [e for e in task.train + task.test if e.template == "argmax"][:10]:
            col = ex.sql.split("order by ")[1].split()[0]
            table = ex.sql.split(" from ")[1].split()[0]
            year = int(ex.sql.split("yr = ")[1].split()[0])
            rows = con.execute(f"select tkr, yr, {col} from {table}").fetchall()
            best = max((r for r in rows if r[1] == year), key=lambda r: r[2])[0]
            assert con.execute(ex.sql).fetchall() == [(best,)]
    finally:
        con.close()


def test_splits_are_disjoint_and_phrasings_held_out(tasks) -> None:
    for task in tasks.values():
        train_sql = {e.sql for e in task.train}
        test_sql = {e.sql for e in task.test}
        assert train_sql and test_sql and not train_sql & test_sql
        assert all(split_of(e.sql) == "train" for e in task.train)
        assert {e.phrasing for e in task.train} <= set(TRAIN_PHRASINGS)
        assert 2 in {e.phrasing for e in task.test}  # some test questions are worded like no training one
        assert 0.1 < len(task.test) / (len(task.train) + len(task.test)) < 0.3


def test_templates_cover_the_sql_features(tasks) -> None:
    sql = " ".join(e.sql for e in tasks["stock"].train)
    for feature in ("select", "where", "order by", "desc", "limit 1", "group by", "join", "count(*)", "avg("):
        assert feature in sql
    counts = Counter(e.template for e in tasks["stock"].train + tasks["stock"].test)
    assert set(counts) == set(TEMPLATES)


def test_questions_quote_the_literals_the_sql_uses(tasks) -> None:
    for ex in tasks["macro"].train:
        for literal in [p for i, p in enumerate(ex.sql.split("'")) if i % 2]:
            assert f"'{literal}'" in ex.question


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown database"):
        build_database("nope", "x.sqlite")
    with pytest.raises(ValueError, match="unknown database"):
        make_questions("nope", "x.sqlite")
    with pytest.raises(ValueError, match="per_template"):
        make_questions("stock", "x.sqlite", per_template=0)
    assert set(schema_of(SPECS["bank"])) == {"bank", "stat", "net"}


def test_paths_that_are_awkward_in_a_uri(tmp_path) -> None:
    """The read-only connections are opened by URI: spaces, '#' and '?' in the path must not break them."""
    from chapters.ch5_applications.schema_linking import SchemaLinker
    from chapters.ch5_applications.sql_eval import ReadOnlyExecutor

    task = load_task("macro", tmp_path / "my dbs #1 ?x")
    with ReadOnlyExecutor(task.path) as ex:
        assert ex.execute(task.test[0].sql).ok
    assert SchemaLinker.from_database(task.tables, task.path).values["ctry.region"] == set(SPECS["macro"].attr_values)
