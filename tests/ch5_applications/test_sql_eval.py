"""The SQL evaluator: read-only and bounded, metrics, repair (idempotent, conservative), self-consistency."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest

from chapters.ch5_applications.sql_databases import build_database, load_task
from chapters.ch5_applications.sql_eval import (
    ReadOnlyExecutor,
    exact_match,
    normalize_sql,
    repair,
    result_key,
    results_equal,
    score_predictions,
    self_consistency,
)

NAMES = ["fin", "firm", "px", "tkr", "yr", "rev", "rev_est", "sector", "close", "vol"]


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    return load_task("stock", tmp_path_factory.mktemp("db"))


@pytest.fixture()
def db(tmp_path):
    """A private copy of the stock database (tests that attack it cannot hurt the others)."""
    return build_database("stock", tmp_path / "stock.sqlite")


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dump(path) -> list[str]:
    con = sqlite3.connect(path)
    try:
        return list(con.iterdump())
    finally:
        con.close()


MALICIOUS = [
    "DROP TABLE fin",
    "drop table if exists firm",
    "DELETE FROM fin",
    "delete from fin where 1 = 1",
    "insert into firm values ('evil', 'x')",
    "UPDATE fin SET rev = 0",
    "create table owned (x)",
    "create view v as select 1",
    "alter table fin rename to gone",
    "ATTACH DATABASE '{dir}/evil.sqlite' AS evil",
    "PRAGMA query_only = OFF",
    "PRAGMA writable_schema = ON",
    "pragma journal_mode = delete",
    "VACUUM",
    "vacuum into '{dir}/copy.sqlite'",
    "BEGIN IMMEDIATE",
    "select 1; drop table fin",
    "select load_extension('evil')",
    "reindex",
    "analyze",
    "savepoint s1",
    # these start like a query, so they get past the first gate and reach SQLite's authorizer
    "with t as (select 1) delete from fin",
    "with t as (select 1) insert into firm select * from firm",
    "WITH t AS (SELECT 1) UPDATE fin SET rev = 0",
    "/* comment */ select 1; delete from fin",
]


def test_malicious_sql_fails_and_leaves_the_database_untouched(db) -> None:
    before_bytes, before_dump = sha(db), dump(db)
    files_before = sorted(p.name for p in db.parent.iterdir())
    with ReadOnlyExecutor(db) as ex:
        for sql in MALICIOUS:
            res = ex.execute(sql.format(dir=db.parent))
            assert not res.ok and res.error, sql
        assert ex.n_errors == len(MALICIOUS)
        assert ex.execute("select count(*) from fin").rows == ((50,),)  # still usable afterwards
    assert sha(db) == before_bytes and dump(db) == before_dump
    assert sorted(p.name for p in db.parent.iterdir()) == files_before  # nothing attached or copied


def test_each_inner_layer_refuses_writes_on_its_own(db) -> None:
    """Bypass the executor's first gate: the connection itself (read-only file, query_only, authorizer)
    still refuses every write, and so does a plain mode=ro connection without the authorizer."""
    before = sha(db)
    with ReadOnlyExecutor(db) as ex:
        for sql in ["drop table fin", "delete from fin", "pragma query_only = off", "create table t (x)"]:
            with pytest.raises(sqlite3.DatabaseError):
                ex.con.execute(sql)
    plain = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            plain.execute("delete from fin")
    finally:
        plain.close()
    assert sha(db) == before


def test_runaway_queries_are_cut_off(db) -> None:
    with ReadOnlyExecutor(db, max_steps=200_000) as ex:
        huge = ex.execute("select count(*) from fin a, fin b, fin c, fin d")  # 50^4 rows
        assert not huge.ok and "interrupted" in huge.error
        endless = ex.execute("with recursive c(x) as (select 1 union all select x + 1 from c) select max(x) from c")
        assert not endless.ok and "interrupted" in endless.error
        assert ex.execute("select count(*) from fin a, fin b").rows == ((2500,),)  # a small join still runs
    with ReadOnlyExecutor(db, max_rows=10) as ex:
        res = ex.execute("select * from fin")
        assert not res.ok and "result rows" in res.error
        blob = ex.execute("select randomblob(100000000)")
        assert not blob.ok


def test_bad_sql_is_counted_not_raised(db) -> None:
    with ReadOnlyExecutor(db) as ex:
        for bad in ["select nope from fin", "selec rev from fin", "select rev from", "", "select * from nowhere"]:
            assert not ex.execute(bad).ok
        assert not ex.execute(None).ok  # not even a string
        assert ex.n_errors == 6


def test_executor_argument_checks(tmp_path, db) -> None:
    with pytest.raises(FileNotFoundError):
        ReadOnlyExecutor(tmp_path / "missing.sqlite")
    with pytest.raises(ValueError, match="positive"):
        ReadOnlyExecutor(db, max_steps=0)


def test_normalize_and_exact_match() -> None:
    gold = "select sector, avg(rev) from fin join firm using (tkr) where yr = 2021 group by sector"
    messy = 'SELECT  Sector ,AVG( rev )\nFROM fin JOIN firm USING(tkr) WHERE yr=2021 GROUP BY sector ;'
    assert exact_match(messy, gold)
    assert not exact_match(gold.replace("2021", "2022"), gold)
    assert normalize_sql("select tkr from fin where tkr = 'Nova  X'") == "select tkr from fin where tkr = 'Nova  X'"
    assert not exact_match("select tkr from fin where tkr = 'NOVA'", "select tkr from fin where tkr = 'nova'")
    assert normalize_sql('select "a"') == "select 'a'"


def test_results_equal() -> None:
    assert results_equal([(1, "a"), (2, "b")], [(2, "b"), (1, "a")])
    assert not results_equal([(1, "a"), (2, "b")], [(2, "b"), (1, "a")], ordered=True)
    assert results_equal([(0.1 + 0.2,)], [(0.3,)])
    assert not results_equal([(1,), (1,)], [(1,)])  # multisets, not sets
    assert result_key([(1,), (2,)]) == result_key([(2,), (1,)])


def test_execution_accuracy_versus_exact_match(stock) -> None:
    gold = "select tkr from fin where yr = 2021 order by rev desc limit 1"
    same_rows = "select tkr from fin where yr = 2021 and rev = (select max(rev) from fin where yr = 2021)"
    wrong = "select tkr from fin where yr = 2021 order by rev limit 1"
    with ReadOnlyExecutor(stock.path) as ex:
        score = score_predictions([gold, same_rows, wrong, "select oops"], [gold] * 4, ex)
    assert score.ex == pytest.approx(2 / 4) and score.em == pytest.approx(1 / 4)
    assert score.errors == 1 and score.n == 4
    with ReadOnlyExecutor(stock.path) as ex:
        with pytest.raises(ValueError, match="gold query fails"):
            score_predictions(["select 1"], ["select nope"], ex)
        with pytest.raises(ValueError, match="as many"):
            score_predictions(["select 1"], [], ex)


def test_gold_queries_score_perfectly(stock) -> None:
    golds = [e.sql for e in stock.test]
    with ReadOnlyExecutor(stock.path) as ex:
        assert score_predictions(golds, golds, ex).as_dict() == {"EX": 1.0, "EM": 1.0, "errors": 0, "n": len(golds)}


BROKEN = {
    "select rev from fin where yr = 2021 and": "select rev from fin where yr = 2021",
    "select tkr from fin where yr = 2021 order by": "select tkr from fin where yr = 2021",
    "select avg(rev from fin where yr = 2021": "select avg(rev) from fin where yr = 2021",
    "select rev from fin where tkr = 'nova": "select rev from fin where tkr = 'nova'",
    "select rve from fin where tkr = 'nova'": "select rev from fin where tkr = 'nova'",
    "select sector from firm where tkr = 'nova'))": "select sector from firm where tkr = 'nova'",
    "select rev frm fin where yr = 2021,": "select rev from fin where yr = 2021",
}


def test_repair_fixes_frequent_errors(stock) -> None:
    with ReadOnlyExecutor(stock.path) as ex:
        for broken, fixed in BROKEN.items():
            assert not ex.execute(broken).ok
            assert repair(broken, ex, NAMES) == fixed


def test_repair_never_changes_a_query_that_executes(stock) -> None:
    queries = [e.sql for e in stock.train] + ["select rev from fin where yr = 1900",  # runs, empty result
                                               "select tkr, rev from fin order by rev"]
    with ReadOnlyExecutor(stock.path) as ex:
        for sql in queries:
            assert repair(sql, ex, NAMES) == sql


def test_repair_is_idempotent_and_gives_up_cleanly(stock) -> None:
    hopeless = ["select from where", "drop table fin", "xyz", "select (((",
                "select rev from fin where tkr = 'a' and yr ="]
    with ReadOnlyExecutor(stock.path) as ex:
        for sql in list(BROKEN) + hopeless:
            once = repair(sql, ex, NAMES)
            assert repair(once, ex, NAMES) == once
        assert repair("drop table fin", ex, NAMES) == "drop table fin"  # unfixable: returned as it was
        with pytest.raises(TypeError):
            repair(3, ex, NAMES)


def test_self_consistency_picks_the_modal_result(stock) -> None:
    a = "select tkr from fin where yr = 2021 order by rev desc limit 1"
    a2 = "select tkr from fin where yr = 2021 and rev = (select max(rev) from fin where yr = 2021)"
    b = "select tkr from fin where yr = 2021 order by rev limit 1"
    with ReadOnlyExecutor(stock.path) as ex:
        vote = self_consistency([(b, -1.0), (a, -5.0), (a2, -6.0), ("select broken", -0.1)], ex)
        assert vote.sql == a and vote.votes == 2 and vote.n_ok == 3  # two agree; the failing one is dropped
        tie = self_consistency([(a, -3.0), (b, -2.0)], ex)  # one vote each: the more likely wins
        assert tie.sql == b and tie.votes == 1
        empty = self_consistency([("select tkr from fin where yr = 1900", -0.1),
                                  ("select tkr from fin where yr = 1901", -0.2), (b, -9.0)], ex)
        assert empty.sql == b  # empty answers do not outvote a real one
        repaired = self_consistency([("select rev from fin where yr = 2021 and", -1.0)], ex, NAMES)
        assert repaired.sql == "select rev from fin where yr = 2021" and repaired.votes == 1
        none = self_consistency([("nonsense", -2.0), ("more nonsense", -1.0)], ex)
        assert none.sql == "more nonsense" and none.votes == 0 and none.n_ok == 0
        with pytest.raises(ValueError):
            self_consistency([], ex)
