"""Small "financial" SQLite databases and templated text-to-SQL questions, for the FinSQL demo.

FinSQL (Zhang, Mao et al., SIGMOD 2024, arXiv 2401.10506) is evaluated on BULL, three production databases
(fund, stock, macro-economy) whose tables are wide and whose column names are abbreviations explained in a
glossary. This file builds four databases in that spirit with the standard library's `sqlite3`, from a seed
and nothing else (the same seed gives byte-identical content):

    database   entity table (key, attribute)   wide table (key, yr, 56 metric columns)   side table
    stock      firm (tkr, sector)              fin  (financial statements)               px   (prices)
    fund       fund (fid, style)               perf (fund performance)                   flow (money flows)
    macro      ctry (cid, region)              ind  (macro indicators)                   mkt  (markets)
    bank       bank (bid, zone)                stat (bank ratios)                        net  (branch network)

A wide table has 14 base metrics, each in 4 variants (`rev`, `rev_yoy` growth, `rev_est` estimate, `rev_q4`
fourth quarter): 56 abbreviated columns plus the key and the year, with a `glossary(tbl, col, meaning)`
table that spells every abbreviation out. The full schema is about 310 tokens of our tokenizer, more than
twice the 128-token context of the shipped model: that is why FinSQL links the schema first.

Questions come from 9 templates shared by all databases (lookup, arg-max, arg-min, count with a threshold,
average, best year, group-by with a JOIN, JOIN with a filter, attribute lookup), each with 3 phrasings.
SQL keywords are lower case (SQLite does not care, and our BPE tokenizer spends one token on `select` but
six on `SELECT`). Every gold query is executed while the questions are generated: a question is kept only
if its answer is non-empty, has no NULL and is unambiguous (no tie at the top of an ORDER BY ... LIMIT 1).

Held-out split: by a hash of the gold SQL, so one query never appears in two splits. Training questions use
phrasings 0 and 1 only (what a practitioner wrote); test questions use any of the 3 phrasings, so a third
of them are worded in a way no training question is (what users ask). Paraphrase augmentation
(`finsql.py`) is meant to close that gap.
"""

from __future__ import annotations

import hashlib
import random
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

YEARS = tuple(range(2019, 2024))
VARIANTS = (("", "{m}"), ("_yoy", "{m} growth"), ("_est", "estimated {m}"), ("_q4", "fourth quarter {m}"))
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Metric:
    abbr: str  # column name (abbreviated)
    meaning: str  # glossary text, also the words questions use
    lo: float  # values are uniform in [lo, hi], one decimal
    hi: float


@dataclass(frozen=True)
class DatabaseSpec:
    name: str
    noun: str  # singular entity noun used in questions ("company")
    nouns: str  # plural
    entity_table: str
    entity_meaning: str
    key: str  # key column of the entity (text), shared by every table
    key_meaning: str
    names: tuple[str, ...]  # key values
    attr: str  # categorical attribute of the entity (for GROUP BY and JOIN filters)
    attr_values: tuple[str, ...]
    wide_table: str
    wide_meaning: str
    metrics: tuple[Metric, ...]  # base metrics of the wide table (x4 variants)
    side_table: str
    side_meaning: str
    side_metrics: tuple[Metric, ...]


def _m(spec: str) -> tuple[Metric, ...]:
    """'abbr:meaning:lo:hi; ...' -> metrics (a compact way to write the tables below)."""
    out = []
    for item in spec.split(";"):
        abbr, meaning, lo, hi = (s.strip() for s in item.split(":"))
        out.append(Metric(abbr, meaning, float(lo), float(hi)))
    return tuple(out)


SPECS: dict[str, DatabaseSpec] = {
    "stock": DatabaseSpec(
        "stock", "company", "companies", "firm", "listed companies", "tkr", "company ticker",
        ("orbit", "atlas", "ember", "signal", "stone", "glass", "winter", "delta", "nova", "apex"),
        "sector", ("tech", "energy", "retail", "health"),
        "fin", "financial statements",
        _m("rev:revenue:50:900; cogs:cost of goods sold:20:600; gp:gross profit:10:400; opex:operating expense:5:200;"
           " ebit:operating profit:-20:300; ni:net income:-30:250; eps:earnings per share:-2:12;"
           " ta:total assets:100:3000; tl:total liabilities:50:2000; eq:shareholder equity:20:1500;"
           " cash:cash holdings:5:500; debt:total debt:0:1200; capex:capital expenditure:2:250; div:dividend:0:6"),
        "px", "stock prices",
        _m("close:closing price:5:400; vol:trading volume:1:90; hi:high price:6:450; lo:low price:3:380"),
    ),
    "fund": DatabaseSpec(
        "fund", "fund", "funds", "fund", "mutual funds", "fid", "fund code",
        ("pine", "willow", "aspen", "cedar", "maple", "birch", "elm", "oak", "hazel", "alder"),
        "style", ("growth", "value", "income", "index"),
        "perf", "fund performance",
        _m("ret:annual return:-25:45; nav:net asset value:0.5:9; aum:assets under management:10:5000;"
           " fee:management fee:0.1:2.5; ter:total expense ratio:0.1:3; shrp:sharpe ratio:-1:3;"
           " mdd:maximum drawdown:2:60; beta:market beta:0.2:1.8; alpha:excess return:-10:12;"
           " trk:tracking error:0.1:9; turn:portfolio turnover:5:300; yld:distribution yield:0:8;"
           " hold:number of holdings:20:900; cashw:cash weight:0:25"),
        "flow", "fund flows",
        _m("subs:subscriptions:0:900; reds:redemptions:0:900; nflow:net flow:-400:400; acct:investor accounts:1:500"),
    ),
    "macro": DatabaseSpec(
        "macro", "country", "countries", "ctry", "countries", "cid", "country name",
        ("india", "peru", "japan", "spain", "chile", "france", "italy", "canada", "kenya", "norway"),
        "region", ("asia", "europe", "america", "africa"),
        "ind", "macro indicators",
        _m("gdp:gross domestic product:50:5000; gdpc:gdp per capita:1:90; cpi:consumer price inflation:-1:25;"
           " unemp:unemployment rate:2:25; rate:policy interest rate:0:20; msup:money supply:10:9000;"
           " expo:exports:5:900; impo:imports:5:900; cab:current account balance:-90:90;"
           " gdebt:government debt:10:250; bdef:budget deficit:-5:15; fxr:exchange rate:0.5:150;"
           " pop:population:3:1400; ppi:producer price index:80:180"),
        "mkt", "financial markets",
        _m("sidx:stock index level:500:9000; by10:ten year bond yield:0:15; cds:credit default swap spread:10:900;"
           " fxv:currency volatility:2:30"),
    ),
    "bank": DatabaseSpec(
        "bank", "bank", "banks", "bank", "commercial banks", "bid", "bank name",
        ("harbor", "summit", "beacon", "falcon", "anchor", "castle", "meadow", "river", "bridge", "tower"),
        "zone", ("north", "south", "east", "west"),
        "stat", "bank statistics",
        _m("npl:nonperforming loan ratio:0.2:9; car:capital adequacy ratio:8:25; roa:return on assets:-1:3;"
           " roe:return on equity:-10:25; nim:net interest margin:0.5:5; ldr:loan to deposit ratio:40:120;"
           " cir:cost to income ratio:25:80; lcr:liquidity coverage ratio:90:300; dep:total deposits:10:3000;"
           " loan:total loans:10:2500; nii:net interest income:1:150; prov:loan loss provisions:0:60;"
           " tier:tier one capital:2:400; lev:leverage ratio:2:12"),
        "net", "branch network",
        _m("nbr:number of branches:5:900; staff:number of employees:1:90; atm:number of atms:10:3000;"
           " mob:mobile banking users:0:50"),
    ),
}
SOURCE_DBS = ("stock", "fund", "macro")  # one LoRA plug-in each
TARGET_DB = "bank"  # held out: few-shot transfer


# ------------------------------------------------------------------------------------------ schema


@dataclass(frozen=True)
class Table:
    name: str
    meaning: str
    columns: tuple[str, ...]
    glossary: dict[str, str]  # column -> meaning
    keys: tuple[str, ...] = ()  # the columns that identify a row (and join tables)


def wide_columns(spec: DatabaseSpec) -> list[tuple[str, str, Metric]]:
    """(column, meaning, base metric) of the wide table's metric columns: 14 metrics x 4 variants = 56."""
    return [(m.abbr + suffix, text.format(m=m.meaning), m) for m in spec.metrics for suffix, text in VARIANTS]


def schema_of(spec: DatabaseSpec) -> dict[str, Table]:
    """The three tables of a database with their glossaries, in a fixed order."""
    key_gloss = {spec.key: spec.key_meaning, "yr": "year"}
    wide = wide_columns(spec)
    return {
        spec.entity_table: Table(spec.entity_table, spec.entity_meaning, (spec.key, spec.attr),
                                 {spec.key: spec.key_meaning, spec.attr: spec.attr}, (spec.key,)),
        spec.wide_table: Table(spec.wide_table, spec.wide_meaning, (spec.key, "yr") + tuple(c for c, _, _ in wide),
                               key_gloss | {c: text for c, text, _ in wide}, (spec.key, "yr")),
        spec.side_table: Table(spec.side_table, spec.side_meaning,
                               (spec.key, "yr") + tuple(m.abbr for m in spec.side_metrics),
                               key_gloss | {m.abbr: m.meaning for m in spec.side_metrics}, (spec.key, "yr")),
    }


def _value(rng: random.Random, metric: Metric, suffix: str) -> float:
    if suffix == "_yoy":  # a growth rate in percent, whatever the metric
        return round(rng.uniform(-20.0, 40.0), 1)
    return round(rng.uniform(metric.lo, metric.hi), 1)


def build_database(name: str, path: str | Path, seed: int = 0) -> Path:
    """Write database `name` (a key of SPECS) to the SQLite file `path` (replaced if it exists)."""
    if name not in SPECS:
        raise ValueError(f"unknown database {name!r}; choose one of {sorted(SPECS)}")
    spec, path = SPECS[name], Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    rng = random.Random(f"{name}-{seed}")
    tables = schema_of(spec)
    con = sqlite3.connect(path)
    try:
        for t in tables.values():
            cols = ", ".join(f"{c} {'TEXT' if c in (spec.key, spec.attr) else 'INTEGER' if c == 'yr' else 'REAL'}"
                             for c in t.columns)
            con.execute(f"CREATE TABLE {t.name} ({cols})")
        con.execute("CREATE TABLE glossary (tbl TEXT, col TEXT, meaning TEXT)")
        con.executemany("INSERT INTO glossary VALUES (?, ?, ?)",
                        [(t.name, c, t.glossary[c]) for t in tables.values() for c in t.columns])
        attrs = [spec.attr_values[i % len(spec.attr_values)] for i in range(len(spec.names))]
        rng.shuffle(attrs)
        con.executemany(f"INSERT INTO {spec.entity_table} VALUES (?, ?)", list(zip(spec.names, attrs)))
        for table, metrics in ((spec.wide_table, [(m, s) for m in spec.metrics for s, _ in VARIANTS]),
                               (spec.side_table, [(m, "") for m in spec.side_metrics])):
            rows = [(k, y, *[_value(rng, m, s) for m, s in metrics]) for k in spec.names for y in YEARS]
            con.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * (2 + len(metrics)))})", rows)
        con.commit()
    finally:
        con.close()
    return path


def build_all(directory: str | Path, seed: int = 0, names: tuple[str, ...] = tuple(SPECS)) -> dict[str, Path]:
    """Build the databases into `directory` as NAME.sqlite; returns {name: path}."""
    return {n: build_database(n, Path(directory) / f"{n}.sqlite", seed) for n in names}


# ------------------------------------------------------------------------------------------ questions


@dataclass(frozen=True)
class SQLExample:
    db: str
    question: str
    sql: str  # gold query, lower-case keywords
    template: str
    phrasing: int  # index into the template's phrasings
    tables: tuple[str, ...]  # gold schema items
    columns: tuple[str, ...]  # "table.column"


# Every template: the phrasings (slots in braces) and the gold SQL. Slots: {desc} column meaning, {col} its
# name, {tbl} its table, {ent} an entity, {yr} a year, {v} a threshold, {noun}/{nouns}, {key}, {attr},
# {aval} an attribute value, {etbl} the entity table.
TEMPLATES: dict[str, tuple[tuple[str, ...], str]] = {
    "lookup": (("what was the {desc} of '{ent}' in {yr}", "{desc} of '{ent}' in {yr}",
                "show the {desc} for '{ent}' in {yr}"),
               "select {col} from {tbl} where {key} = '{ent}' and yr = {yr}"),
    "argmax": (("which {noun} had the highest {desc} in {yr}", "{noun} with the highest {desc} in {yr}",
                "which {noun} had the largest {desc} in {yr}"),
               "select {key} from {tbl} where yr = {yr} order by {col} desc limit 1"),
    "argmin": (("which {noun} had the lowest {desc} in {yr}", "{noun} with the lowest {desc} in {yr}",
                "which {noun} had the smallest {desc} in {yr}"),
               "select {key} from {tbl} where yr = {yr} order by {col} limit 1"),
    "count": (("how many {nouns} had {desc} above {v} in {yr}", "number of {nouns} with {desc} above {v} in {yr}",
               "how many {nouns} had {desc} over {v} in {yr}"),
              "select count(*) from {tbl} where yr = {yr} and {col} > {v}"),
    "average": (("what was the average {desc} in {yr}", "average {desc} in {yr}", "mean {desc} in {yr}"),
                "select avg({col}) from {tbl} where yr = {yr}"),
    "best_year": (("in which year did '{ent}' have the highest {desc}", "year with the highest {desc} for '{ent}'",
                   "in which year was the {desc} of '{ent}' largest"),
                  "select yr from {tbl} where {key} = '{ent}' order by {col} desc limit 1"),
    "group": (("average {desc} by {attr} in {yr}", "what was the average {desc} per {attr} in {yr}",
               "mean {desc} for each {attr} in {yr}"),
              "select {attr}, avg({col}) from {tbl} join {etbl} using ({key}) where yr = {yr} group by {attr}"),
    "join_filter": (("which '{aval}' {nouns} had {desc} above {v} in {yr}",
                     "'{aval}' {nouns} with {desc} above {v} in {yr}",
                     "list '{aval}' {nouns} with {desc} over {v} in {yr}"),
                    "select {key} from {tbl} join {etbl} using ({key}) where {attr} = '{aval}' and yr = {yr} "
                    "and {col} > {v}"),
    "attribute": (("which {attr} is '{ent}' in", "what is the {attr} of '{ent}'", "show the {attr} of '{ent}'"),
                  "select {attr} from {etbl} where {key} = '{ent}'"),
}
TRAIN_PHRASINGS = (0, 1)  # the third phrasing of every template appears only in test questions


def split_of(sql: str, test_fraction: float = TEST_FRACTION) -> str:
    """'train' or 'test', from a hash of the gold SQL (stable across runs and machines)."""
    h = int(hashlib.sha256(sql.encode("utf-8")).hexdigest()[:8], 16) / 16**8
    return "test" if h < test_fraction else "train"


def _gold_items(template: str, slots: dict[str, str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Tables and table.columns the gold query of `template` touches."""
    tbl, etbl, key = slots["tbl"], slots["etbl"], slots["key"]
    if template == "attribute":
        return (etbl,), (f"{etbl}.{key}", f"{etbl}.{slots['attr']}")
    cols = [f"{tbl}.{slots['col']}", f"{tbl}.yr"]
    if template in ("lookup", "argmax", "argmin", "best_year", "join_filter", "group"):
        cols.append(f"{tbl}.{key}")
    if template in ("group", "join_filter"):
        return (tbl, etbl), tuple(cols + [f"{etbl}.{key}", f"{etbl}.{slots['attr']}"])
    return (tbl,), tuple(cols)


def _answer_ok(con: sqlite3.Connection, sql: str, tie_check: str | None) -> bool:
    """The gold answer exists and has no NULL (a count is positive); `tie_check` (a query returning
    (rows, distinct values) of an ORDER BY column) must show no tie, so LIMIT 1 has one right answer."""
    rows = con.execute(sql).fetchall()
    if not rows or any(v is None for row in rows for v in row):
        return False
    if sql.startswith("select count(*)") and rows[0][0] == 0:
        return False
    if tie_check is not None:
        n, distinct = con.execute(tie_check).fetchone()
        return n == distinct
    return True


def make_questions(name: str, path: str | Path, per_template: int = 30, seed: int = 0) -> list[SQLExample]:
    """Questions with gold SQL for database `name` built at `path`; every gold query is executed here.

    Up to `per_template` distinct queries per template (fewer when the template has fewer distinct slot
    fillings). Each query gets one phrasing: 0 or 1 if it falls in the train split, any of 0-2 in test.
    """
    if name not in SPECS:
        raise ValueError(f"unknown database {name!r}; choose one of {sorted(SPECS)}")
    if per_template <= 0:
        raise ValueError(f"per_template must be positive, got {per_template}")
    spec, rng = SPECS[name], random.Random(f"questions-{name}-{seed}")
    metric_cols = [(spec.wide_table, c, text) for c, text, _ in wide_columns(spec)]
    metric_cols += [(spec.side_table, m.abbr, m.meaning) for m in spec.side_metrics]
    con = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    out: list[SQLExample] = []
    try:
        for template, (phrasings, sql_format) in TEMPLATES.items():
            seen: set[str] = set()
            for _ in range(per_template * 20):  # attempts; most succeed
                if len(seen) >= per_template:
                    break
                tbl, col, desc = rng.choice(metric_cols)
                yr, ent = rng.choice(YEARS), rng.choice(spec.names)
                slots = dict(tbl=tbl, col=col, desc=desc, ent=ent, yr=str(yr), noun=spec.noun, nouns=spec.nouns,
                             key=spec.key, attr=spec.attr, aval=rng.choice(spec.attr_values), etbl=spec.entity_table)
                if template in ("count", "join_filter"):  # a threshold taken from the data, so counts vary
                    (val,) = rng.choice(con.execute(f"select {col} from {tbl} where yr = ?", (yr,)).fetchall())
                    slots["v"] = str(int(val))
                sql = sql_format.format(**slots)
                where = f"{spec.key} = '{ent}'" if template == "best_year" else f"yr = {yr}"
                tie_check = (f"select count({col}), count(distinct {col}) from {tbl} where {where}"
                             if template in ("argmax", "argmin", "best_year") else None)
                if sql in seen or not _answer_ok(con, sql, tie_check):
                    continue
                seen.add(sql)
                split = split_of(sql)
                phrasing = rng.choice(TRAIN_PHRASINGS if split == "train" else range(len(phrasings)))
                gold_tables, gold_cols = _gold_items(template, slots)
                out.append(SQLExample(name, phrasings[phrasing].format(**slots), sql, template, phrasing,
                                      gold_tables, gold_cols))
    finally:
        con.close()
    return out


@dataclass
class SQLTask:
    """One database with its file, schema and question splits."""

    name: str
    path: Path
    tables: dict[str, Table]
    splits: dict[str, list[SQLExample]] = field(default_factory=dict)

    @property
    def train(self) -> list[SQLExample]:
        return self.splits["train"]

    @property
    def test(self) -> list[SQLExample]:
        return self.splits["test"]


def load_task(name: str, directory: str | Path, seed: int = 0, per_template: int = 30) -> SQLTask:
    """Build database `name` in `directory` and its questions, split into train and test."""
    path = build_database(name, Path(directory) / f"{name}.sqlite", seed)
    examples = make_questions(name, path, per_template=per_template, seed=seed)
    splits = {"train": [e for e in examples if split_of(e.sql) == "train"],
              "test": [e for e in examples if split_of(e.sql) == "test"]}
    return SQLTask(name, path, schema_of(SPECS[name]), splits)
