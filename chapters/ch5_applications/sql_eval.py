"""Executing model-written SQL safely, scoring it, and FinSQL's output calibration.

Paper: Zhang, Mao et al., "FinSQL: Model-Agnostic LLMs-based Text-to-SQL Framework for Financial Analysis",
SIGMOD 2024, arXiv 2401.10506 (its sections on output calibration and metrics).

A text-to-SQL model writes arbitrary strings, and an evaluation runs them against a database. So the
evaluation connection must be unable to change anything and unable to run for ever:

    0. only a statement that starts with SELECT or WITH is sent to SQLite at all;
    1. the file is opened read-only (SQLite URI `mode=ro`), and `PRAGMA query_only` is switched on;
    2. an authorizer allows only reading (SELECT, column reads, ordinary functions, recursive CTEs) and
       denies everything else: writes, DDL, ATTACH/DETACH, PRAGMA, transactions, load_extension;
    3. a progress handler aborts a statement after a fixed number of virtual-machine instructions (a
       count, so the cut-off is deterministic, unlike a wall-clock timer): a huge cross join or an endless
       recursive CTE ends as an error, not a hang;
    4. size limits (Python >= 3.11): no attached database, strings and blobs of at most 1 MB, SQL text
       of at most 10 kB; and at most `max_rows` result rows are read;
    5. every exception is caught and returned as an error string: a bad query is counted, never fatal.

Metrics. Execution accuracy (EX): the predicted query runs and returns the gold query's result (a
multiset of rows, floats rounded to 6 digits; as an ordered list when the gold query has ORDER BY).
Exact match (EM): the two queries are equal after normalisation (case, white space, spacing around
punctuation, quotes, a trailing semicolon; string literals are compared verbatim). EM is stricter than
EX: two different queries can return the same rows (a correct query that joins tables in another order
scores in EX but not in EM), and a query can match the gold text up to white space only.

Output calibration (FinSQL section "output calibration"):
- `repair`: rule-based fixes of frequent small errors (dangling keywords at the end, unbalanced
  parentheses or quotes, a misspelt table or column replaced by the nearest schema name). A query that
  already executes is returned unchanged, and a repair is kept only if the repaired query executes;
  otherwise the original is returned. So repair(repair(q)) == repair(q) for every q.
- `self_consistency`: several candidate queries (sampled) are repaired and executed; failing ones are
  dropped; the candidates vote with their execution results, the result with most votes wins, ties go to
  the candidate with the highest likelihood. Our choice: empty results vote only if no candidate returns
  rows (an empty answer to a question about existing data is more likely a wrong filter than the truth).
"""

from __future__ import annotations

import difflib
import re
import sqlite3
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

READ_ONLY_ACTIONS = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                               sqlite3.SQLITE_RECURSIVE})
DENIED_FUNCTIONS = frozenset({"load_extension", "readfile", "writefile", "edit"})
SQL_KEYWORDS = frozenset(
    "select from where and or not in is null like between group by order having limit offset desc asc join "
    "inner left outer cross on using as distinct count avg sum min max case when then else end union all "
    "except intersect exists with recursive".split()
)


@dataclass(frozen=True)
class ExecResult:
    ok: bool
    rows: tuple[tuple, ...] = ()
    error: str = ""


class ReadOnlyExecutor:
    """Runs one SELECT at a time on a read-only, sandboxed connection to a SQLite file."""

    def __init__(self, path: str | Path, max_steps: int = 2_000_000, max_rows: int = 1000,
                 check_every: int = 1000) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no SQLite database at {path}")
        if max_steps <= 0 or max_rows <= 0 or check_every <= 0:
            raise ValueError(f"max_steps, max_rows and check_every must be positive, got "
                             f"{max_steps}, {max_rows}, {check_every}")
        self.path, self.max_steps, self.max_rows, self.check_every = path, max_steps, max_rows, check_every
        self.con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        self.con.execute("PRAGMA query_only = ON")  # before the authorizer, which denies every PRAGMA
        if hasattr(self.con, "setlimit"):  # Python >= 3.11
            self.con.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
            self.con.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1_000_000)
            self.con.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, 10_000)
        self.con.set_authorizer(self._authorize)
        self._ticks = 0
        self.con.set_progress_handler(self._progress, check_every)
        self.n_errors = 0  # failed executions so far (bad SQL is counted, never raised)

    @staticmethod
    def _authorize(action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None) -> int:
        if action not in READ_ONLY_ACTIONS:
            return sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in DENIED_FUNCTIONS:
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    def _progress(self) -> int:
        self._ticks += 1
        return int(self._ticks * self.check_every > self.max_steps)  # non-zero aborts the statement

    def execute(self, sql: str) -> ExecResult:
        """Run `sql`; never raises for a bad query (the error comes back in the result)."""
        if not isinstance(sql, str):
            self.n_errors += 1
            return ExecResult(False, error=f"TypeError: SQL must be a string, got {type(sql).__name__}")
        self._ticks = 0
        first = re.match(r"\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*([A-Za-z]+)", sql, flags=re.DOTALL)
        if not first or first.group(1).lower() not in ("select", "with"):
            self.n_errors += 1
            return ExecResult(False, error="not a query: only SELECT or WITH statements are run")
        try:
            cursor = self.con.execute(sql)
            rows = cursor.fetchmany(self.max_rows + 1)
            cursor.close()
            if len(rows) > self.max_rows:
                raise sqlite3.DataError(f"more than {self.max_rows} result rows")
            return ExecResult(True, tuple(tuple(r) for r in rows))
        except Exception as exc:  # noqa: BLE001 - every failure of a model's query is data, not a crash
            self.n_errors += 1
            if self.con.in_transaction:
                self.con.rollback()
            return ExecResult(False, error=f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> ReadOnlyExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ metrics


def normalize_sql(sql: str) -> str:
    """Canonical text for exact match. Outside string literals: lower case, one space between tokens,
    none after '(' or before ')' or '(' or ',', one around comparison operators. Literals are kept
    verbatim; double quotes become single quotes; a trailing semicolon is dropped."""
    parts = re.split(r"('(?:[^']|'')*'?)", sql.strip().rstrip(";").strip().replace('"', "'"))
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:  # not a quoted literal
            part = part.lower()
            part = re.sub(r"\s*(<=|>=|<>|!=|=|<|>|\+|-|\*|/)\s*", r" \1 ", part)
            part = re.sub(r"\s*,\s*", ", ", part)
            part = re.sub(r"\s*\(\s*", "(", part)
            part = re.sub(r"\s*\)", ")", part)
            part = " ".join(part.split())
        if part:
            out.append(part)
    return " ".join(out)


def exact_match(pred: str, gold: str) -> bool:
    return normalize_sql(pred) == normalize_sql(gold)


def _canonical(rows: Iterable[tuple]) -> list[tuple]:
    return [tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in rows]


def results_equal(pred: Sequence[tuple], gold: Sequence[tuple], ordered: bool = False) -> bool:
    """Same rows (floats to 6 digits); as lists if `ordered`, else as multisets."""
    p, g = _canonical(pred), _canonical(gold)
    return p == g if ordered else Counter(p) == Counter(g)


def result_key(rows: Sequence[tuple]) -> tuple:
    """A hashable, order-free summary of a result, for voting."""
    return tuple(sorted(Counter(_canonical(rows)).items(), key=repr))


@dataclass
class Score:
    ex: float  # execution accuracy
    em: float  # exact match
    errors: int  # predictions that failed to execute
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"EX": self.ex, "EM": self.em, "errors": self.errors, "n": self.n}


def score_predictions(preds: Sequence[str], golds: Sequence[str], executor: ReadOnlyExecutor) -> Score:
    """EX, EM and the number of failing predictions of `preds` against `golds` on one database."""
    if len(preds) != len(golds) or not golds:
        raise ValueError(f"need as many predictions as gold queries (at least one), got {len(preds)} and {len(golds)}")
    ex = em = errors = 0
    for pred, gold in zip(preds, golds):
        gold_res = executor.execute(gold)
        if not gold_res.ok:
            raise ValueError(f"gold query fails ({gold_res.error}): {gold}")
        res = executor.execute(pred)
        errors += not res.ok
        ex += res.ok and results_equal(res.rows, gold_res.rows, ordered=" order by " in gold.lower())
        em += exact_match(pred, gold)
    n = len(golds)
    return Score(ex / n, em / n, errors, n)


# ------------------------------------------------------------------------------------------ calibration


DANGLING_WORDS = frozenset("and or not where order group by join using on limit from select having".split())


def _strip_dangling(sql: str) -> str:
    """Drop trailing tokens that cannot end a query (and, where, order by, a comma, '=', '(' ...)."""
    while True:
        sql = sql.rstrip()
        if sql and sql[-1] in ",=<>(":
            sql = sql[:-1]
            continue
        word = re.search(r"(?:^|\s)([A-Za-z_]+)$", sql)
        if word and word.group(1).lower() in DANGLING_WORDS:
            sql = sql[: word.start(1)]
            continue
        return sql


def _balance(sql: str) -> str:
    """Close an aggregate's parenthesis ('avg(rev from' -> 'avg(rev) from'), close an open quote, then drop
    unmatched ')' and close unmatched '(' at the end."""
    sql = re.sub(r"\b(avg|sum|min|max|count)\(\s*([A-Za-z_][A-Za-z0-9_]*|\*)(?![\w\s]*\))", r"\1(\2)", sql,
                 flags=re.IGNORECASE)
    if sql.count("'") % 2:
        sql += "'"
    out, depth = [], 0
    for part in re.split(r"('(?:[^']|'')*')", sql):
        if part.startswith("'"):
            out.append(part)
            continue
        kept = []
        for ch in part:
            if ch == ")" and depth == 0:
                continue
            depth += (ch == "(") - (ch == ")")
            kept.append(ch)
        out.append("".join(kept))
    return "".join(out) + ")" * depth


def _fix_names(sql: str, names: Sequence[str]) -> str:
    """Replace identifiers that are not keywords, functions or schema names by the closest of those names
    (a misspelt column 'rve' -> 'rev', or keyword 'frm' -> 'from')."""
    known = set(names)
    names = list(names) + sorted(SQL_KEYWORDS)

    def fix(match: re.Match) -> str:
        word = match.group(0)
        if word.lower() in SQL_KEYWORDS or word in known:
            return word
        close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
        return close[0] if close else word

    parts = re.split(r"('(?:[^']|'')*')", sql)
    return "".join(p if p.startswith("'") else re.sub(r"\b[A-Za-z_][A-Za-z0-9_]*\b(?!\s*\()", fix, p) for p in parts)


def repair(sql: str, executor: ReadOnlyExecutor, names: Sequence[str] = ()) -> str:
    """Rule-based repair: unchanged if `sql` executes; the repaired query if that executes; else `sql`.

    names: table and column names of the database, for replacing misspelt identifiers.
    """
    if not isinstance(sql, str):
        raise TypeError(f"sql must be a string, got {type(sql).__name__}")
    if executor.execute(sql).ok:
        return sql
    fixed = sql.strip().rstrip(";")
    fixed = _balance(_strip_dangling(fixed))
    fixed = _strip_dangling(fixed)
    if names:
        fixed = _fix_names(fixed, list(names))
    return fixed if fixed != sql and executor.execute(fixed).ok else sql


@dataclass(frozen=True)
class Vote:
    sql: str  # the chosen query
    votes: int  # candidates that agreed with its result
    n_ok: int  # candidates that executed


def self_consistency(candidates: Sequence[tuple[str, float]], executor: ReadOnlyExecutor,
                     names: Sequence[str] = (), drop_empty: bool = True) -> Vote:
    """Majority vote over execution results of (sql, log-likelihood) candidates; ties -> highest likelihood.

    Failing candidates are repaired (`repair`) and dropped if they still fail. If none executes, the most
    likely candidate is returned as it is (votes = 0).
    """
    if not candidates:
        raise ValueError("self_consistency needs at least one candidate")
    runs = []
    for sql, logp in candidates:
        fixed = repair(sql, executor, names)
        res = executor.execute(fixed)
        if res.ok:
            runs.append((fixed, float(logp), result_key(res.rows), len(res.rows) > 0))
    if not runs:
        best = max(candidates, key=lambda c: c[1])
        return Vote(best[0], 0, 0)
    voters = [r for r in runs if r[3]] if drop_empty and any(r[3] for r in runs) else runs
    counts = Counter(r[2] for r in voters)
    # most votes first, then the most likely member; the winner is that member's query
    best = max(voters, key=lambda r: (counts[r[2]], r[1]))
    return Vote(best[0], counts[best[2]], len(runs))
