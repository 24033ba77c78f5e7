"""Schema linking and prompt construction for text-to-SQL, in the manner of FinSQL.

Paper: Chao Zhang, Yuren Mao, Yijiang Fan, Yu Mi, Yunjun Gao, Lu Chen, Dongfang Lou, Jinshu Lin,
"FinSQL: Model-Agnostic LLMs-based Text-to-SQL Framework for Financial Analysis", SIGMOD 2024,
arXiv 2401.10506.

The problem: a financial database has tables of 50-100 abbreviated columns. Serialised in full, the schema
of one of our databases is about 310 tokens, more than twice the 128-token context of the shipped model.
FinSQL scores every (question, table) and (question, column) pair, keeps the top-k1 tables and, inside
each, the top-k2 columns, and puts only that pruned schema in the prompt. Because a wide table does not fit
the scorer's input either, its columns are cut into groups that are scored independently ("in parallel").

FinSQL's scorer is a trained cross-encoder. Ours is lexical, with nothing to train, so that it is exact and
testable:

    document of a column = its name split on "_" + its glossary meaning    (e.g. "rev est estimated revenue")
    lexical(q, column)   = cos(tfidf(q), tfidf(document))
    value(q, column)     = 0.5 if a word or number of q is one of the column's values, else 0
                           (value matching: 'tech' -> sector, 2021 -> yr, 'nova' -> tkr)
    score(q, column)     = lexical + value
    score(q, table)      = cos(tfidf(q), tfidf(table name + meaning)) + max lexical score of its non-key
                           columns (keys and years are in every table: they say nothing about which one)
    idf(w)               = log((1 + N) / (1 + df(w))) + 1   over the N column documents of the database

The top-k1 tables are kept; in each, its key columns (needed for joins, as most linkers keep primary and
foreign keys) and the best k2 - #keys other columns, so at most k2 columns per table.

A column's score depends only on the question and that column, so scoring the columns in groups of any
size gives exactly the same ranking as scoring them all at once (a test checks it); the group size is
what a real cross-encoder would need (its maximum input length), here it only shapes the loop.

Prompt: the linked tables in score order, each with its linked columns (best first, then the keys), then
the question:

     fin: rev rev_est tkr yr | firm: sector tkr
    what was the revenue of 'nova' in 2021

The model reads the columns from the prompt instead of memorising them, and the first listed column is
usually the one asked about, which a small model can learn to copy. Every name is preceded by a space, as
in the SQL, so that it is cut into the same tokens in both places.
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from chapters.ch5_applications.sql_databases import Table

VALUE_BONUS = 0.5  # added to a column's score when the question contains one of its values
STOPWORDS = frozenset(
    "a an the of in on for by to with and or what was is are were which who how many much did does do had have "
    "has show list give me per each than above over below under year's its it that this".split()
)


def stem(word: str) -> str:
    """A tiny stemmer: plural -ies -> -y, plural -s dropped (companies -> company, funds -> fund)."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def words(text: str) -> list[str]:
    """Lower-case alphanumeric words, column names split on '_', stop words removed, stemmed."""
    return [stem(w) for w in re.findall(r"[a-z0-9]+", text.lower().replace("_", " ")) if w not in STOPWORDS]


@dataclass(frozen=True)
class LinkedSchema:
    tables: tuple[str, ...]  # top-k1 tables, best first
    columns: dict[str, tuple[str, ...]]  # table -> its top-k2 columns, best first
    scores: dict[str, float]  # "table.column" -> score, for every column of the linked tables

    def items(self) -> set[str]:
        """{"table.column", ...} of the linked schema."""
        return {f"{t}.{c}" for t in self.tables for c in self.columns[t]}


class SchemaLinker:
    """TF-IDF + value-matching scorer over one database's tables and columns (see the module docstring)."""

    def __init__(self, tables: dict[str, Table], values: dict[str, set[str]] | None = None) -> None:
        if not tables:
            raise ValueError("SchemaLinker needs at least one table")
        self.tables = tables
        self.values = values or {}  # "table.column" -> set of its values as lower-case strings
        docs = {f"{t.name}.{c}": words(f"{c} {t.glossary.get(c, '')}") for t in tables.values() for c in t.columns}
        df = Counter(w for doc in docs.values() for w in set(doc))
        n = len(docs)
        self.idf = {w: math.log((1 + n) / (1 + k)) + 1 for w, k in df.items()}
        self.unseen_idf = math.log(1 + n) + 1  # a question word no column has: df = 0
        self.column_vecs = {item: self._vector(doc) for item, doc in docs.items()}
        self.table_vecs = {t.name: self._vector(words(f"{t.name} {t.meaning}")) for t in tables.values()}

    @classmethod
    def from_database(cls, tables: dict[str, Table], path: str | Path, max_distinct: int = 50) -> SchemaLinker:
        """Read the values of the TEXT and INTEGER columns with few distinct values (keys, years, categories)."""
        values: dict[str, set[str]] = {}
        con = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        try:
            for t in tables.values():
                for c in t.columns:
                    rows = con.execute(f"select distinct {c} from {t.name} limit {max_distinct + 1}").fetchall()
                    if len(rows) <= max_distinct and all(isinstance(v, (str, int)) for (v,) in rows):
                        values[f"{t.name}.{c}"] = {str(v).lower() for (v,) in rows}
        finally:
            con.close()
        return cls(tables, values)

    def _vector(self, ws: list[str]) -> dict[str, float]:
        """L2-normalised tf-idf vector (a word no column has gets the largest idf, df = 0)."""
        tf = Counter(ws)
        vec = {w: k * self.idf.get(w, self.unseen_idf) for w, k in tf.items()}
        norm = math.sqrt(sum(v * v for v in vec.values())) or 1.0
        return {w: v / norm for w, v in vec.items()}

    @staticmethod
    def _cos(a: dict[str, float], b: dict[str, float]) -> float:
        return sum(v * b[w] for w, v in a.items() if w in b)

    def score_group(self, question: str, items: list[str]) -> dict[str, tuple[float, float]]:
        """(lexical, value) scores of one group of "table.column" items (what one scorer call would see)."""
        q = self._vector(words(question))
        tokens = set(re.findall(r"[a-z0-9]+", question.lower()))
        return {item: (self._cos(q, self.column_vecs[item]), VALUE_BONUS * bool(tokens & self.values.get(item, set())))
                for item in items}

    def score_columns(self, question: str, group_size: int = 16) -> dict[str, tuple[float, float]]:
        """Every column's score; each table's columns are cut into groups of `group_size`, scored separately."""
        if group_size <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        scores: dict[str, tuple[float, float]] = {}
        for t in self.tables.values():
            items = [f"{t.name}.{c}" for c in t.columns]
            for start in range(0, len(items), group_size):
                scores |= self.score_group(question, items[start:start + group_size])
        return scores

    def link(self, question: str, k1: int = 2, k2: int = 4, group_size: int = 16) -> LinkedSchema:
        """Top-k1 tables and, in each, the top-k2 columns (ties keep schema order)."""
        for name, k in (("k1", k1), ("k2", k2)):
            if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
                raise ValueError(f"{name} must be a positive int, got {k!r}")
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        parts = self.score_columns(question, group_size)
        col_scores = {item: lexical + value for item, (lexical, value) in parts.items()}
        q = self._vector(words(question))
        order = list(self.tables)
        # a table is judged on words and on its own columns: keys are in every table and tell nothing
        table_score = {name: self._cos(q, self.table_vecs[name])
                       + max((parts[f"{name}.{c}"][0] for c in self.tables[name].columns
                              if c not in self.tables[name].keys), default=0.0) for name in order}
        tables = tuple(sorted(order, key=lambda n: (-table_score[n], order.index(n)))[:k1])
        columns = {}
        for name in tables:
            table = self.tables[name]
            cols = [c for c in table.columns if c not in table.keys]
            ranked = sorted(cols, key=lambda c: (-col_scores[f"{name}.{c}"], cols.index(c)))
            keys = table.keys[:k2]
            columns[name] = tuple(ranked[: k2 - len(keys)]) + keys
        kept = {item: s for item, s in col_scores.items() if item.split(".")[0] in tables}
        return LinkedSchema(tables, columns, kept)


# ------------------------------------------------------------------------------------------ prompts


def serialize(tables: dict[str, tuple[str, ...]]) -> str:
    """{table: columns} -> ' fin: rev tkr yr | firm: sector tkr'.

    Every name is preceded by a space, as it is in the SQL ('select rev from fin'), so that our BPE
    tokenizer cuts it into the same tokens in the prompt and in the answer: the model copies tokens.
    """
    return " |".join(f" {t}: {' '.join(cols)}" for t, cols in tables.items())


def linked_prompt(question: str, linked: LinkedSchema) -> str:
    """The pruned schema, a newline, the question."""
    return f"{serialize({t: linked.columns[t] for t in linked.tables})}\n{question}"


def full_prompt(question: str, tables: dict[str, Table]) -> str:
    """The whole schema, a newline, the question (what a prompt without schema linking looks like)."""
    return f"{serialize({t.name: t.columns for t in tables.values()})}\n{question}"


def recall_at_k(gold: list[tuple[str, ...]], linked: list[LinkedSchema], level: str = "column") -> float:
    """Fraction of gold schema items (tables, or "table.column" items) present in the linked schema."""
    if len(gold) != len(linked) or not gold:
        raise ValueError(f"need as many gold item lists as linked schemas (and at least one), "
                         f"got {len(gold)} and {len(linked)}")
    if level not in ("table", "column"):
        raise ValueError(f"level must be 'table' or 'column', got {level!r}")
    hit = total = 0
    for items, ls in zip(gold, linked):
        have = set(ls.tables) if level == "table" else ls.items()
        hit += sum(i in have for i in items)
        total += len(items)
    return hit / total
